"""Every feature of [core] against the independent float64 reference, in fp32, fp16 and bf16."""

from __future__ import annotations

import math

import pytest
import torch

import attncc
from tests.reference import alibi_slopes, assert_attention_matches, dense_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_qkv(batch, heads, kv_heads, n, m, d, dv=None, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=generator)
    k = torch.randn(batch, kv_heads, m, d, generator=generator)
    v = torch.randn(batch, kv_heads, m, dv or d, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# name -> (spec fields, reference options, (B, H, Hkv, N, M, D))
SPEC_CASES = {
    "dense": ({}, {}, (2, 4, 4, 37, 37, 16)),
    "cross_attention": ({}, {}, (2, 4, 4, 19, 45, 16)),
    "causal_bottom_right_short_q": ({"causal": True}, {"causal": True}, (2, 4, 4, 23, 41, 16)),
    "causal_bottom_right_long_q": ({"causal": True}, {"causal": True}, (1, 4, 4, 41, 23, 16)),
    "causal_top_left": ({"causal": "top_left"}, {"causal": True, "top_left": True}, (2, 4, 4, 41, 23, 16)),
    "sliding_window_causal": ({"causal": True, "window": (8, 0)}, {"causal": True, "window": (8, 0)}, (2, 4, 4, 45, 45, 16)),
    "window_both_sides": ({"window": (5, 3)}, {"window": (5, 3)}, (1, 4, 4, 29, 35, 16)),
    "gqa": ({"causal": True}, {"causal": True}, (2, 8, 2, 33, 33, 16)),
    "mqa": ({}, {}, (2, 8, 1, 17, 40, 24)),
    "softcap": ({"softcap": 2.0, "scale": 1.0}, {"softcap": 2.0, "scale": 1.0}, (2, 4, 2, 31, 31, 16)),
    "alibi_6_heads": ({"alibi": True, "causal": True}, {"alibi": True, "causal": True}, (2, 6, 3, 27, 39, 16)),
    "v_head_dim": ({"v_head_dim": 24}, {}, (1, 4, 4, 20, 30, 16)),
}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_spec_features_match_reference(case, dtype):
    fields, options, (batch, heads, kv_heads, n, m, d) = SPEC_CASES[case]
    spec = attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, **fields)
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, d, spec.v_head_dim, dtype, seed=len(case))
    o, lse = attncc.compile(spec)(q, k, v, return_lse=True)
    reference_o, reference_lse = dense_attention(q, k, v, **options)
    assert_attention_matches(o, lse, reference_o, reference_lse, dtype)


def test_alibi_reference_slopes_are_the_papers():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)], dtype=torch.float64))
    assert torch.allclose(alibi_slopes(6)[4:], torch.tensor([2.0**-1, 2.0**-3], dtype=torch.float64))


def _doc_ids(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def mod_cases():
    """name -> (score_mod, mask_mod, (B, H, Hkv, N, M, D)); mods close over tensors and numbers."""
    doc = _doc_ids([5, 17, 3, 12])
    width, radius = 7, 1
    table = torch.randn(4, 2 * 6 + 1, generator=torch.Generator().manual_seed(3))
    bias_radius = 6
    lengths = torch.tensor([40, 29])

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    def neighbourhood_2d(b, h, q_idx, kv_idx):
        # NATTEN-style: the window centre is clamped so every query sees a full 3x3 patch.
        centre_row = torch.clamp(q_idx // width, radius, width - 1 - radius)
        centre_col = torch.clamp(q_idx % width, radius, width - 1 - radius)
        return (abs(centre_row - kv_idx // width) <= radius) & (abs(centre_col - kv_idx % width) <= radius)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, (kv_idx - q_idx).clamp(-bias_radius, bias_radius) + bias_radius]

    def key_padding(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    def empty_rows(b, h, q_idx, kv_idx):
        return (q_idx % 5 != 0) & (kv_idx <= q_idx)

    def minus_inf_row(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx == 2, -math.inf, score)

    def exotic(score, b, h, q_idx, kv_idx):
        bonus = torch.sigmoid(score) * torch.exp2(-(h + 1.0)) + torch.sqrt(abs(score) + 1)
        return torch.maximum(score + bonus, -3.0 + h).clamp(max=4.0) - torch.log(1 + q_idx % 3)

    return {
        "document_mask": (None, document_causal, (2, 4, 2, 37, 37, 16)),
        "neighbourhood_2d": (None, neighbourhood_2d, (1, 4, 4, 49, 49, 16)),
        "relative_bias_table": (relative_bias, None, (2, 4, 2, 25, 31, 16)),
        "key_padding_per_batch": (None, key_padding, (2, 4, 1, 21, 40, 16)),
        "fully_masked_rows": (None, empty_rows, (2, 4, 4, 23, 23, 16)),
        "score_mod_minus_inf_row": (minus_inf_row, None, (1, 4, 4, 9, 14, 16)),
        "exotic_score_mod": (exotic, None, (1, 4, 4, 13, 21, 16)),
    }


MOD_CASES = mod_cases()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(MOD_CASES))
def test_flex_mods_match_reference(case, dtype):
    score_mod, mask_mod, (batch, heads, kv_heads, n, m, d) = MOD_CASES[case]
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, d, dtype=dtype, seed=len(case))
    o, lse = attncc.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, enable_gqa=kv_heads != heads,
                                   return_lse=True)  # fmt: skip
    reference_o, reference_lse = dense_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod)
    assert_attention_matches(o, lse, reference_o, reference_lse, dtype)


def test_fully_masked_rows_give_zero_and_minus_inf():
    score_mod, mask_mod, _ = MOD_CASES["fully_masked_rows"]
    q, k, v = random_qkv(1, 2, 2, 23, 23, 16)
    o, lse = attncc.flex_attention(q, k, v, mask_mod=mask_mod, return_lse=True)
    empty = torch.arange(23) % 5 == 0
    assert torch.equal(o[:, :, empty], torch.zeros_like(o[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, ~empty]).all() and not torch.isnan(o).any()


def test_causal_long_queries_have_empty_rows_bottom_right():
    # N > M bottom-right: query i sees keys j <= i + M - N, so the first N - M rows see nothing.
    q, k, v = random_qkv(1, 2, 2, 10, 4, 8)
    o, lse = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=8, causal=True))(q, k, v, return_lse=True)
    assert torch.isneginf(lse[:, :, :6]).all() and torch.isfinite(lse[:, :, 6:]).all()
    assert torch.equal(o[:, :, :6], torch.zeros_like(o[:, :, :6]))


def test_captured_tensor_values_are_runtime_inputs():
    doc = _doc_ids([4, 4, 4, 4])

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    spec = attncc.AttentionSpec(num_heads=2, head_dim=8, mask_mod=mask_mod)
    attn = attncc.compile(spec)
    q, k, v = random_qkv(1, 2, 2, 16, 16, 8)
    before = attn(q, k, v)
    other = _doc_ids([8, 8])
    after = attn(q, k, v, doc=other)
    assert not torch.allclose(before, after)
    expected, _ = dense_attention(q, k, v, mask_mod=lambda b, h, i, j: other[i] == other[j])
    torch.testing.assert_close(after.double(), expected, atol=2e-6, rtol=2e-6)
    # An in-place update of the captured tensor is seen too: it is the module's buffer.
    doc.copy_(other)
    torch.testing.assert_close(attn(q, k, v).double(), expected, atol=2e-6, rtol=2e-6)


def test_flex_attention_reuses_programs_for_equal_expressions():
    from attncc import flex

    q, k, v = random_qkv(1, 2, 2, 8, 8, 8)
    for _ in range(2):
        attncc.flex_attention(q, k, v, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx)
    count = len(flex._PROGRAMS)
    attncc.flex_attention(q, k, v, mask_mod=lambda b, h, i, j: j <= i)
    assert len(flex._PROGRAMS) == count
    attncc.flex_attention(q, k, v, mask_mod=lambda b, h, i, j: j <= i + 1)
    assert len(flex._PROGRAMS) == count + 1


def test_block_mask_drop_in():
    doc = _doc_ids([50, 80, 70])

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    block_mask = attncc.create_block_mask(mask_mod, None, None, 200, 200, BLOCK_SIZE=64)
    assert block_mask.shape == (1, 1, 200, 200)
    dense = torch.stack([(doc[i] == doc) & (torch.arange(200) <= i) for i in range(200)])
    blocks = torch.nn.functional.pad(dense, (0, 56, 0, 56)).view(4, 64, 4, 64)
    assert torch.equal(block_mask.to_dense()[0, 0], blocks.any(3).any(1))
    full = torch.nn.functional.pad(dense, (0, 56, 0, 56), value=True).view(4, 64, 4, 64).all(3).all(1)
    assert torch.equal(block_mask.full_kv_num_blocks[0, 0], full.sum(-1).int())
    q, k, v = random_qkv(1, 2, 2, 200, 200, 8)
    o = attncc.flex_attention(q, k, v, block_mask=block_mask)
    expected, _ = dense_attention(q, k, v, mask_mod=mask_mod)
    torch.testing.assert_close(o.double(), expected, atol=2e-6, rtol=2e-6)
