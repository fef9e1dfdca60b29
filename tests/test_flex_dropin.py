"""attncc.flex_attention as a drop-in for torch's: its BlockMask and mask helpers, kernel_options,
return_aux, create_block_mask's signature, and the shapes torch accepts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import attncc
from attncc.frontend.trace import trace_mask_mod, trace_score_mod
from tests.reference import assert_attention_matches, dense_attention


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return q_idx - kv_idx < 9


def inputs(batch=2, heads=4, kv_heads=2, n=37, m=45, d=16, dv=None, kv_batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=g)
    k = torch.randn(kv_batch or batch, kv_heads, m, d, generator=g)
    v = torch.randn(kv_batch or batch, kv_heads, m, dv or d, generator=g)
    return q, k, v


# --------------------------------------------------------------------------- torch's objects and helpers


def test_torch_block_mask_built_with_and_or_noop_masks():
    q, k, v = inputs()
    mask = torch_flex.and_masks(causal, torch_flex.or_masks(window, torch_flex.noop_mask))
    block_mask = torch_flex.create_block_mask(mask, 2, 4, 37, 45, device="cpu", BLOCK_SIZE=16)
    o, lse = attncc.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, mask_mod=mask), torch.float32)


def test_torch_block_mask_from_blocks_alone_masks_by_its_blocks():
    q, k, v = inputs(batch=1, kv_heads=4)
    listed = torch.tensor([[[1, 2, 1]]], dtype=torch.int32)
    indices = torch.tensor([[[[0, 1, 2], [2, 1, 0], [1, 0, 2]]]], dtype=torch.int32)
    block_mask = torch_flex.BlockMask.from_kv_blocks(listed, indices, BLOCK_SIZE=16, seq_lengths=(37, 45))
    dense = block_mask.to_dense()[0, 0].bool().repeat_interleave(16, 0).repeat_interleave(16, 1)[:37, :45]

    def in_listed_blocks(b, h, q_idx, kv_idx):
        return dense[q_idx, kv_idx]

    o, lse = attncc.flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, mask_mod=in_listed_blocks), torch.float32)


def test_torch_block_mask_of_other_lengths_is_refused():
    q, k, v = inputs()
    block_mask = torch_flex.create_block_mask(causal, None, None, 64, 64, device="cpu")
    with pytest.raises(attncc.InputError, match=r"made for \(Q_LEN, KV_LEN\) = \(64, 64\), the inputs have \(37, 45\)"):
        attncc.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def test_constant_building_methods_and_attributes_trace():
    doc = torch.tensor([0, 0, 1, 1, 2])

    def mask(b, h, q_idx, kv_idx):
        last = doc.shape[0] - q_idx.new_ones(()) - doc.size(0) + doc.ndim + q_idx.ndim  # = 0
        keep = b.new_full((), True, dtype=torch.bool, device=b.device) & (kv_idx.new_zeros(()) == last)
        return keep & (doc[q_idx] == doc[kv_idx]) & (q_idx.new_tensor(3) > kv_idx - q_idx)

    assert str(trace_mask_mod(mask).expr) == "(3 > kv_idx - q_idx) & Eq(doc[q_idx], doc[kv_idx])"

    def score(score, b, h, q_idx, kv_idx):
        bonus = torch.full_like(q_idx, 2.7) + torch.ones_like(score) + (score.dtype == torch.float32)
        return score * torch.zeros_like(score, dtype=torch.int64).new_tensor(2.5) + bonus

    assert str(trace_score_mod(score).expr) == "2*score + 4"  # int fills truncate, as torch's do


@pytest.mark.parametrize(
    "mask, message",
    [
        (lambda b, h, q, kv: q.new_ones((3,)) > 0, r"Tensor.new_ones with size \(3,\) builds a tensor"),
        (lambda b, h, q, kv: q.new_full((), kv) > 0, "Tensor.new_full needs a Python number as its value"),
        (lambda b, h, q, kv: q.T > 0, "Tensor.T is not supported"),
    ],
)
def test_constant_building_refuses_what_a_scalar_mod_cannot_be(mask, message):
    with pytest.raises(attncc.ModError, match=message):
        trace_mask_mod(mask)


# --------------------------------------------------------------------------- torch's signature


def test_kernel_options_choose_the_tiles_and_accept_torch_keys():
    q, k, v = inputs()
    options = {"BLOCK_M": 32, "fwd_BLOCK_N": 16, "bwd_BLOCK_M1": 64, "BLOCK_M2": 64, "bwd_num_warps": 2, "PRESCALE_QK": True, "WRITE_DQ": False,
               "ROWS_GUARANTEED_SAFE": False, "BLOCKS_ARE_CONTIGUOUS": True, "USE_TMA": False, "num_warps": 4,
               "num_stages": 2, "kpack": 2, "waves_per_eu": 1, "matrix_instr_nonkdim": 16, "BACKEND": "AUTO"}  # fmt: skip
    o = attncc.flex_attention(q, k, v, mask_mod=causal, enable_gqa=True, kernel_options=options)
    torch.testing.assert_close(o.double(), dense_attention(q, k, v, mask_mod=causal)[0], atol=2e-6, rtol=2e-6)
    program = next(reversed(attncc.flex._PROGRAMS.values()))
    printed = str(program.graph)
    assert "block_m = 32, block_n = 16" in printed and "bwd_block_m = 64" in printed and "bwd_num_warps = 2" in printed


@pytest.mark.parametrize(
    "options, message",
    [
        ({"BLOCK_K": 64}, "kernel_options key 'BLOCK_K' is unknown; allowed"),
        ({"BLOCK_M1": 32, "BLOCK_M2": 64}, r"kernel_options\['BLOCK_M2'\]=64 disagrees with another key's 32"),
        ({"BLOCK_M": 0}, r"kernel_options\['BLOCK_M'\]=0 is invalid: a positive integer"),
        ({"num_warps": True}, r"kernel_options\['num_warps'\]=True is invalid: a int"),
        ({"PRESCALE_QK": 1}, r"kernel_options\['PRESCALE_QK'\]=1 is invalid: a bool"),
        ({"BACKEND": "FLASH"}, "'FLASH' is not available in attncc"),
        ({"BACKEND": "CUTE"}, r"kernel_options\['BACKEND'\]='CUTE' is invalid; allowed: AUTO, TRITON"),
        ({"BACKEND": "TRITON", "FORCE_USE_FLEX_ATTENTION": True}, "cannot be combined"),
        ([("BLOCK_M", 64)], "kernel_options is a list: a dict"),
    ],
)
def test_kernel_options_errors(options, message):
    q, k, v = inputs(kv_heads=4)
    with pytest.raises(attncc.InputError, match=message):
        attncc.flex_attention(q, k, v, kernel_options=options)


def test_kernel_options_backend_must_agree_with_backend():
    q, k, v = inputs(kv_heads=4)
    with pytest.raises(attncc.InputError, match="backend='pytorch' and kernel_options BACKEND"):
        attncc.flex_attention(q, k, v, kernel_options={"BACKEND": "TRITON"}, backend="pytorch")


def test_return_aux_gives_torchs_aux_output_with_lse_and_max_scores():
    q, k, v = inputs(dv=24)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * 0.5 + (q_idx - kv_idx) * 0.01

    both = torch_flex.AuxRequest(lse=True, max_scores=True)
    o, aux = attncc.flex_attention(q, k, v, score_mod, enable_gqa=True, return_aux=both, mask_mod=causal)
    assert isinstance(aux, torch_flex.AuxOutput)
    reference_o, reference_lse = dense_attention(q, k, v, score_mod=score_mod, mask_mod=causal)
    assert_attention_matches(o, aux.lse, reference_o, reference_lse, torch.float32)
    i, j = torch.arange(37).view(-1, 1), torch.arange(45)
    scores = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) / 4
    expected = torch.where(i >= j, score_mod(scores, 0, 0, i, j), -math.inf).amax(-1)
    torch.testing.assert_close(aux.max_scores.double(), expected, atol=2e-6, rtol=2e-6)
    _, only_max = attncc.flex_attention(q, k, v, enable_gqa=True, return_aux=torch_flex.AuxRequest(max_scores=True))
    assert only_max.lse is None and only_max.max_scores.shape == (2, 4, 37)


def test_max_scores_of_a_row_without_keys_is_minus_infinity():
    q, k, v = inputs(kv_heads=4)
    _, aux = attncc.flex_attention(q, k, v, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < q_idx - 40,
                                   return_aux=torch_flex.AuxRequest(max_scores=True))  # fmt: skip
    assert torch.isneginf(aux.max_scores[:, :, :41]).all() and torch.isfinite(aux.max_scores[:, :, 41:]).all()


def test_return_lse_and_return_aux_together_are_refused():
    q, k, v = inputs(kv_heads=4)
    with pytest.raises(attncc.InputError, match="pass return_lse or return_aux, not both"):
        attncc.flex_attention(q, k, v, return_lse=True, return_aux=torch_flex.AuxRequest(lse=True))
    with pytest.raises(attncc.InputError, match="return_aux is a dict: an AuxRequest"):
        attncc.flex_attention(q, k, v, return_aux={"lse": True})


def test_create_block_mask_takes_torchs_signature():
    blocks = attncc.create_block_mask(causal, None, None, 100, 100, device="cpu", BLOCK_SIZE=(32, 16), _compile=True)
    mixed = attncc.create_block_mask(causal, None, None, 100, 100, None, 32, False, separate_full_blocks=False)
    assert blocks.BLOCK_SIZE == (32, 16) and mixed.full_kv_num_blocks.sum() == 0
    assert mixed.kv_num_blocks.tolist() == [[[1, 2, 3, 4]]]
    expected = torch_flex.create_block_mask(causal, None, None, 100, 100, device="cpu", BLOCK_SIZE=(32, 16))
    assert torch.equal(blocks.to_dense(), expected.to_dense().bool())
    with pytest.raises(attncc.InputError, match="_compile='yes' is invalid: True or False"):
        attncc.create_block_mask(causal, None, None, 100, 100, _compile="yes")


# --------------------------------------------------------------------------- shapes torch accepts


def test_kv_batch_one_serves_every_query_batch_with_gradients():
    q, k, v = inputs(batch=3, kv_batch=1, dv=24)
    for t in (q, k, v):
        t.requires_grad_()
    o = attncc.flex_attention(q, k, v, mask_mod=causal, enable_gqa=True)
    reference = dense_attention(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), mask_mod=causal)[0]
    torch.testing.assert_close(o.double(), reference, atol=2e-6, rtol=2e-6)
    grad = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), grad)
    expected = torch.autograd.grad(reference, (q, k, v), grad.double())
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shapes, gqa, message",
    [
        (dict(batch=3, kv_batch=2), True, "key has batch 2, query 3"),
        (dict(heads=4, kv_heads=2), False, "pass enable_gqa=True"),
        (dict(heads=6, kv_heads=4), True, "query has 6 heads, not a multiple of key's 4 heads"),
    ],
)
def test_shapes_torch_refuses_are_refused(shapes, gqa, message):
    q, k, v = inputs(**shapes)
    with pytest.raises(attncc.InputError, match=message):
        attncc.flex_attention(q, k, v, enable_gqa=gqa)


# --------------------------------------------------------------------------- found by tests/test_fuzz.py


@pytest.mark.parametrize("name", ["self", "return_lse", "q_positions", "kv_positions"])
def test_captured_tensor_named_like_a_parameter_of_the_call(name):
    """flex_attention passes captured tensors to the compiled program by keyword, beside ``self`` and the
    call's options: a tensor captured under one of their names raised ``got multiple values for argument``."""
    q, k, v = inputs()
    tables = {name: torch.randn(k.shape[2], generator=torch.Generator().manual_seed(3))}

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + tables[name][kv_idx]

    o, lse = attncc.flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True, return_lse=True)
    reference_o, reference_lse = dense_attention(
        q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: score + tables[name].double()[kv_idx]
    )
    assert_attention_matches(o, lse, reference_o, reference_lse, torch.float32)
