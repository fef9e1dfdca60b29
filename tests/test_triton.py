"""The Triton backend against the float64 reference: every numerics variant, forward and backward.

Without a GPU the generated kernels run in Triton's interpreter, so shapes are tiny and
tiles small (16 x 16) to exercise multi-tile loops and boundary masking. Tests that
need a CUDA device, or the NVIDIA compiler, say so and are skipped elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import attncc
import attncc.masks
from attncc.ir import ops
from attncc.passes import PIPELINES
from tests.reference import assert_attention_matches, dense_attention
from tests.test_numerics import MOD_CASES, SPEC_CASES, random_qkv

TRITON = importlib.util.find_spec("triton")  # finds, does not import: triton's first import decides interpreting
INTERPRETER_PROBLEM = None
if TRITON is not None:
    # Import triton through the backend now, while collecting, so that without a GPU it is in interpreter mode
    # even if a test that runs earlier (torch.compile, say) would import it.
    INTERPRETER_PROBLEM = importlib.import_module("attncc.backends.triton").interpreter_problem()
requires_triton = pytest.mark.skipif(
    TRITON is None or INTERPRETER_PROBLEM is not None,
    reason=INTERPRETER_PROBLEM or "triton is not installed: pip install attncc[triton]",
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HAS_NVIDIA_BACKEND = TRITON is not None and os.path.isdir(
    os.path.join(os.path.dirname(TRITON.origin), "backends", "nvidia")
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL_TILES = [*PIPELINES["triton"][:-1], "tile{target=triton,block_m=16,block_n=16}"]

# Gradients sum products of values that the kernels round to the input dtype, as every
# FlashAttention kernel does: P before dV = P^T dO, dS before dQ = dS K and dK = dS^T Q
# (relative error u each: 2^-12 fp16, 2^-9 bf16), then the result once more. So the bound
# is relative to the gradient's scale s = max |reference|: |g - ref| <= atol * s + rtol * |ref|,
# with rtol = 2 u as for o and atol = 8 u, twice o's 4 u for the sums of rounded terms.
# fp32 keeps o's bound.
GRAD_TOLERANCE = {
    torch.float32: dict(atol=2e-6, rtol=2e-6),
    torch.float16: dict(atol=8 * 2.0**-12, rtol=2 * 2.0**-12),
    torch.bfloat16: dict(atol=8 * 2.0**-9, rtol=2 * 2.0**-9),
}

# (B, H, Hkv, N, M, D) per variant of tests/test_numerics.py: the interpreter runs each
# program in Python, so batches and heads shrink; features that need more keep them
# (6 heads for ALiBi's rule, per-batch lengths, a 7 x 7 image, the captured documents).
SHAPES = {
    "dense": (1, 2, 2, 31, 31, 16),
    "cross_attention": (1, 2, 2, 19, 45, 16),
    "causal_bottom_right_short_q": (1, 2, 2, 17, 40, 16),
    "causal_bottom_right_long_q": (1, 2, 2, 40, 17, 16),
    "causal_top_left": (1, 2, 2, 33, 23, 16),
    "sliding_window_causal": (1, 2, 2, 34, 34, 16),
    "window_both_sides": (1, 2, 2, 29, 31, 16),
    "gqa": (1, 4, 2, 31, 29, 16),
    "mqa": (1, 4, 1, 17, 40, 24),
    "softcap": (1, 2, 1, 31, 31, 16),
    "alibi_6_heads": (1, 6, 3, 27, 30, 16),
    "v_head_dim": (1, 2, 2, 20, 30, 16),
    "document_mask": (1, 2, 1, 37, 37, 16),
    "neighbourhood_2d": (1, 2, 2, 49, 49, 16),
    "relative_bias_table": (1, 2, 1, 25, 31, 16),
    "key_padding_per_batch": (2, 2, 1, 21, 32, 16),
    "fully_masked_rows": (1, 2, 2, 23, 23, 16),
    "score_mod_minus_inf_row": (1, 2, 2, 9, 14, 16),
    "exotic_score_mod": (1, 2, 2, 13, 21, 16),
}


@functools.cache
def compiled_variant(case: str):
    """(compiled module, reference options) of a variant, compiled once for every dtype."""
    batch, heads, kv_heads, n, m, d = SHAPES[case]
    if case in SPEC_CASES:
        fields, options, _ = SPEC_CASES[case]
    else:
        score_mod, mask_mod, _ = MOD_CASES[case]
        fields = {"score_mod": score_mod, "mask_mod": mask_mod}
        options = {"score_mod": score_mod, "mask_mod": mask_mod}
    spec = attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, **fields)
    return attncc.compile(spec, backend="triton", pipeline=SMALL_TILES), options


def assert_gradients_match(grads, reference_grads, dtype):
    for name, grad, reference in zip(("dq", "dk", "dv"), grads, reference_grads):
        assert grad.dtype == dtype, name
        tolerance = GRAD_TOLERANCE[dtype]
        scale = float(reference.abs().max())
        torch.testing.assert_close(grad.double(), reference, atol=tolerance["atol"] * scale, rtol=tolerance["rtol"],
                                   msg=lambda text, name=name: f"{name}: {text}")  # fmt: skip


def check_forward_backward(attn, options, q, k, v, seed=0):
    """o and lse, and the gradients of a loss using both, against autograd through the float64 reference."""
    dtype = q.dtype
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o, lse = attn(*leaves, return_lse=True)
    reference_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    reference_o, reference_lse = dense_attention(*reference_leaves, **options)
    assert_attention_matches(o.cpu(), lse.cpu(), reference_o.detach(), reference_lse.detach(), dtype)

    generator = torch.Generator().manual_seed(seed)
    grad_o = torch.randn(o.shape, generator=generator).to(dtype)
    grad_lse = torch.randn(lse.shape, generator=generator)
    grad_lse = torch.where(reference_lse.isinf(), 0.0, grad_lse.double()).float()
    grads = torch.autograd.grad((o, lse), leaves, (grad_o.to(o.device), grad_lse.to(o.device)))
    reference_grads = torch.autograd.grad(
        (reference_o, reference_lse), reference_leaves, (grad_o.double(), grad_lse.double()), allow_unused=True
    )
    assert_gradients_match([g.cpu() for g in grads], reference_grads, dtype)
    return grads


def run_variant(case: str, dtype, device="cpu"):
    attn, options = compiled_variant(case) if device == "cpu" else compiled_variant.__wrapped__(case)
    attn = attn.to(device)
    batch, heads, kv_heads, n, m, d = SHAPES[case]
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, d, attn.spec.v_head_dim, dtype, seed=len(case))
    check_forward_backward(attn, options, q.to(device), k.to(device), v.to(device), seed=len(case))


@requires_triton
def test_shapes_cover_every_numerics_variant():
    assert set(SHAPES) == set(SPEC_CASES) | set(MOD_CASES)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_variant_forward_and_backward(case, dtype):
    run_variant(case, dtype)


@requires_triton
def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_gradients():
    attn, options = compiled_variant("fully_masked_rows")
    q, k, v = random_qkv(1, 2, 2, 23, 23, 16, seed=1)
    dq, _, _ = check_forward_backward(attn, options, q, k, v)
    o, lse = attn(q, k, v, return_lse=True)
    empty = torch.arange(23) % 5 == 0
    assert torch.equal(o[:, :, empty], torch.zeros_like(o[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all() and torch.isfinite(lse[:, :, ~empty]).all()
    assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))


@requires_triton
@pytest.mark.parametrize("head_dim, v_head_dim", [(16, 16), (24, 40), (80, 72), (128, 128), (256, 256)])
def test_head_dims_pad_to_powers_of_two(head_dim, v_head_dim):
    spec = attncc.AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=head_dim, v_head_dim=v_head_dim, causal=True)
    attn = attncc.compile(spec, backend="triton", pipeline=SMALL_TILES)
    q, k, v = random_qkv(1, 2, 1, 18, 21, head_dim, v_head_dim, seed=head_dim)
    check_forward_backward(attn, {"causal": True}, q, k, v)


@requires_triton
def test_distance_terms_keep_their_integer_difference():
    """``score + slope[h] * (kv_idx - q_idx)`` computes the distance as an integer before the float product (as
    tests/test_pytorch_backend.py checks for the pytorch backend): its expansion put 5e-5 into o at N=1500."""
    slopes = torch.tensor([0.5, 0.25])

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, causal=True, score_mod=score_mod),
                          backend="triton")  # fmt: skip
    q, k, v = random_qkv(1, 2, 2, 1500, 1500, 16, seed=1)
    expected = dense_attention(q.double(), k.double(), v.double(), causal=True, score_mod=score_mod)
    assert_attention_matches(*attn(q, k, v, return_lse=True), *expected, torch.float32)


@requires_triton
@pytest.mark.parametrize("n, m", [(1, 1), (1, 40), (40, 1), (16, 16), (17, 33)])
def test_any_lengths(n, m):
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, causal=True)
    attn = attncc.compile(spec, backend="triton", pipeline=SMALL_TILES)
    q, k, v = random_qkv(1, 2, 2, n, m, 16, seed=n + m)
    check_forward_backward(attn, {"causal": True}, q, k, v)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_and_gradients(dtype):
    spec = attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, window=(6, 2))
    attn = attncc.compile(spec, backend="triton", pipeline=SMALL_TILES)
    generator = torch.Generator().manual_seed(4)
    # q in [B, N, H, D] layout seen as [B, H, N, D]; k and v every other key of a longer tensor
    q = torch.randn(2, 21, 4, 16, generator=generator).to(dtype).transpose(1, 2)
    k = torch.randn(2, 2, 50, 16, generator=generator).to(dtype)[:, :, ::2]
    v = torch.randn(2, 2, 16, 50, generator=generator).to(dtype).transpose(2, 3)[:, :, 1::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_forward_backward(attn, {"window": (6, 2)}, q, k, v)


@requires_triton
def test_python_floor_division_and_modulo_of_negative_numbers():
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + 0.25 * ((kv_idx - q_idx) // 3) - 0.5 * ((q_idx - kv_idx) % 4) + 0.1 * ((kv_idx - 7) % -5)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx - q_idx) // 4 != -2

    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, score_mod=score_mod, mask_mod=mask_mod)
    attn = attncc.compile(spec, backend="triton", pipeline=SMALL_TILES)
    assert "_floordiv(" in attn.source and "_mod(" in attn.source
    q, k, v = random_qkv(1, 2, 2, 27, 30, 16, seed=5)
    check_forward_backward(attn, {"score_mod": score_mod, "mask_mod": mask_mod}, q, k, v)


@requires_triton
def test_nested_and_multidimensional_captured_tensors():
    owner = torch.tensor([0] * 7 + [1] * 12 + [2] * 11)
    intervals = torch.tensor([[0, 7], [3, 19], [19, 30]])
    table = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(2))
    gate = torch.tensor([True, False, True])

    def mask_mod(b, h, q_idx, kv_idx):
        start = intervals[owner[kv_idx]][0]  # per element: the row of kv_idx's owner, then its first entry
        return (q_idx >= start) & ((q_idx < intervals[owner[kv_idx], 1]) | gate[owner[q_idx]])

    def reference_mask(b, h, q_idx, kv_idx):  # the same on broadcast index tensors
        start = intervals[owner[kv_idx], 0]
        return (q_idx >= start) & ((q_idx < intervals[owner[kv_idx], 1]) | gate[owner[q_idx]])

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, owner[q_idx], owner[kv_idx]]

    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, score_mod=score_mod, mask_mod=mask_mod)
    attn = attncc.compile(spec, backend="triton", pipeline=SMALL_TILES)
    # the nested load's index is a hoisted load, wrapped and checked as torch indexes
    assert "_index0 = cap2_owner_" in attn.source and "tl.load(cap1_intervals_ptr + cap1_intervals_" in attn.source
    q, k, v = random_qkv(1, 2, 2, 30, 30, 16, seed=6)
    check_forward_backward(attn, {"score_mod": score_mod, "mask_mod": reference_mask}, q, k, v)


@requires_triton
def test_natural_exp_region_without_fold_scale():
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, softcap=4.0, causal=True)
    pipeline = ["canonicalize", "group-kv", "online-softmax", "tile{target=triton,block_m=16,block_n=16}"]
    attn = attncc.compile(spec, backend="triton", pipeline=pipeline)
    assert "exp2 = false" in str(attn.graph) and "p = tl.exp(s - m_safe[:, None])" in attn.source
    q, k, v = random_qkv(1, 2, 2, 20, 26, 16, seed=8)
    check_forward_backward(attn, {"softcap": 4.0, "causal": True}, q, k, v)


@requires_triton
def test_new_captured_values_need_no_recompile():
    doc = torch.tensor([0] * 10 + [1] * 10)
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, mask_mod=lambda b, h, i, j: doc[i] == doc[j])
    attn = attncc.compile(spec, backend="triton", pipeline=SMALL_TILES)
    q, k, v = random_qkv(1, 2, 2, 20, 20, 16, seed=9)
    other = torch.tensor([0] * 4 + [1] * 16)
    o, lse = attn(q, k, v, return_lse=True, doc=other)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, mask_mod=lambda b, h, i, j: other[i] == other[j]),
                             torch.float32)  # fmt: skip


@requires_triton
def test_flex_attention_drop_in_with_default_tiles():
    q, k, v = random_qkv(1, 2, 1, 20, 24, 16, seed=10)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - 0.1 * abs(q_idx - kv_idx)

    o, lse = attncc.flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True, return_lse=True, backend="triton")
    assert_attention_matches(o, lse, *dense_attention(q, k, v, score_mod=score_mod), torch.float32)


@requires_triton
def test_generated_source_is_readable_triton():
    spec = attncc.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=24, causal=True, softcap=30.0)
    attn = attncc.compile(spec, backend="triton")
    source = attn.source
    assert source.startswith(f'"""Attention generated by attncc {attncc.__version__} (backend: triton).')
    assert "%0 = flash_attention(%q, %k, %v)" in source and "graph(%q: T[B, 8, N, 24]" in source
    for kernel in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_scores", "_score_grad"):
        assert f"@triton.jit\ndef {kernel}(" in source
    assert "GROUPS = 4" in source and "HEAD_DIM, BLOCK_D = 24, 32" in source
    assert "kv_h = h // GROUPS" in source and "repeat_interleave" not in source
    assert "stride_qz, stride_qh, stride_qm, stride_qk" in source and "BLOCK_M: tl.constexpr" in source
    assert "# score = " in source and "# mask = kv_idx <= M - N + q_idx" in source
    assert "_tanh(" in source and "tl.exp2(s - m_safe[:, None])" in source
    assert "for start_n in range(lo, hi, BLOCK_N):" in source
    assert "kv_hi = tl.minimum(M, M - N + q_last + 1)" in source  # the causal schedule, printed
    assert "TODO" not in source
    compile(source, str(attn.path), "exec")


# -- the sparsity schedule: forward and dQ kernels visit only the KV tiles of each query tile's bounds
SCHEDULE_PIPELINE = ["canonicalize", "fold-scale", "group-kv", "online-softmax", "sparsity",
                     "tile{target=triton,block_m=16,block_n=16}"]  # fmt: skip
PADDED_LENGTHS = torch.tensor([13, 0, 40])  # a batch with no key at all, and one longer than M
DOCUMENTS = torch.tensor([0] * 9 + [1] * 14 + [2] * 10)


def _padding(b, h, q_idx, kv_idx):
    return kv_idx < PADDED_LENGTHS[b]


def _documents(b, h, q_idx, kv_idx):
    return DOCUMENTS[q_idx] == DOCUMENTS[kv_idx]


def _lagging_chunks(b, h, q_idx, kv_idx):  # bounds with a floor division of a possibly negative number
    return kv_idx // 8 <= (q_idx - 5) // 8


def _head_windows(b, h, q_idx, kv_idx):  # bounds that read the query head (4 query heads, 2 KV heads)
    return (kv_idx <= q_idx) & (kv_idx >= q_idx - 3 - 5 * h)


# name -> (spec fields, reference options, (B, H, Hkv, N, M)), head dim 16
SCHEDULE_CASES = {
    "causal_bottom_right_n_above_m": ({"causal": True}, {"causal": True}, (1, 2, 2, 40, 17)),
    "causal_bottom_right_n_below_m": ({"causal": True}, {"causal": True}, (1, 2, 2, 17, 40)),
    "causal_top_left_n_above_m": ({"causal": "top_left"}, {"causal": True, "top_left": True}, (1, 2, 2, 38, 21)),
    "causal_top_left_n_below_m": ({"causal": "top_left"}, {"causal": True, "top_left": True}, (1, 2, 2, 21, 38)),
    "sliding_window_causal": ({"causal": True, "window": (6, 0)}, {"causal": True, "window": (6, 0)},
                              (1, 2, 2, 37, 37)),
    "sliding_window_n_below_m": ({"causal": True, "window": (9, 0)}, {"causal": True, "window": (9, 0)},
                                 (1, 2, 2, 26, 39)),
    "window_both_sides": ({"window": (6, 3)}, {"window": (6, 3)}, (1, 2, 2, 29, 38)),
    "prefix_lm": ({"mask_mod": attncc.masks.prefix_lm(11)}, {"mask_mod": attncc.masks.prefix_lm(11)},
                  (1, 2, 2, 35, 35)),
    "chunked": ({"mask_mod": attncc.masks.chunked(12)}, {"mask_mod": attncc.masks.chunked(12)}, (1, 2, 2, 38, 38)),
    "chunked_both_ways": ({"mask_mod": attncc.masks.chunked(8, causal=False)},
                          {"mask_mod": attncc.masks.chunked(8, causal=False)}, (1, 2, 2, 30, 36)),
    "lagging_chunks": ({"mask_mod": _lagging_chunks}, {"mask_mod": _lagging_chunks}, (1, 2, 2, 33, 27)),
    "head_windows_gqa": ({"mask_mod": _head_windows}, {"mask_mod": _head_windows}, (1, 4, 2, 36, 36)),
    "key_padding_with_empty_batch": ({"mask_mod": _padding}, {"mask_mod": _padding}, (3, 2, 1, 20, 37)),
    "document_mask_residual": ({"mask_mod": _documents}, {"mask_mod": _documents}, (1, 2, 1, 33, 33)),
}  # fmt: skip


def compile_scheduled(fields, heads, kv_heads, pipeline=SCHEDULE_PIPELINE):
    spec = attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=16, **fields)
    return attncc.compile(spec, backend="triton", pipeline=pipeline)


def region_schedule(attn):
    (region,) = attn.graph.nodes_of(ops.FlashAttention)
    return region.op.schedule


@requires_triton
@pytest.mark.parametrize("case", sorted(SCHEDULE_CASES))
def test_sparsity_schedule_forward_and_backward(case):
    fields, options, (batch, heads, kv_heads, n, m) = SCHEDULE_CASES[case]
    attn = compile_scheduled(fields, heads, kv_heads)
    schedule = region_schedule(attn)
    assert schedule is not None and schedule.table == (case == "document_mask_residual")
    assert attn.source.count("lo, hi, full_lo, full_hi = _kv_tiles(") == 2  # forward and dQ
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, 16, seed=len(case))
    check_forward_backward(attn, options, q, k, v, seed=len(case))


@requires_triton
def test_backward_kernels_take_tiles_of_their_own():
    """Forward tiles of 32 x 16 and backward tiles of 16 x 32: the backward's own query-tile scan and KV bounds."""
    tiles = "tile{target=triton,block_m=32,block_n=16,bwd_block_m=16,bwd_block_n=32,bwd_num_warps=2}"
    fields, options, (batch, heads, kv_heads, n, m) = SCHEDULE_CASES["head_windows_gqa"]
    attn = compile_scheduled(fields, heads, kv_heads, [*PIPELINES["triton"][:-1], tiles])
    assert "BLOCK_M, BLOCK_N = 32, 16" in attn.source and "BWD_BLOCK_M, BWD_BLOCK_N = 16, 32" in attn.source
    assert "NUM_WARPS, NUM_STAGES = 8, 3" in attn.source and "BWD_NUM_WARPS, BWD_NUM_STAGES = 2, 3" in attn.source
    assert "bwd_block_m = 16, bwd_block_n = 32" in str(attn.graph)
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, 16, seed=3)
    check_forward_backward(attn, options, q, k, v, seed=3)
    with pytest.raises(attncc.BackendError, match="tile bwd_block_n=24 is invalid for triton"):
        compile_scheduled(fields, heads, kv_heads, [*PIPELINES["triton"][:-1], "tile{target=triton,bwd_block_n=24}"])


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sparsity_schedule_in_half_precision(dtype):
    fields, options, (batch, heads, kv_heads, n, m) = SCHEDULE_CASES["key_padding_with_empty_batch"]
    attn = compile_scheduled(fields, heads, kv_heads)
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, 16, dtype=dtype, seed=3)
    check_forward_backward(attn, options, q, k, v, seed=3)


@requires_triton
def test_query_tiles_that_see_no_key_give_zero_output_and_gradients():
    # causal, bottom-right, N = 40 > M = 17: rows 0..22 see nothing, so query tile 0 visits no KV tile
    attn = compile_scheduled({"causal": True}, 2, 2)
    q, k, v = random_qkv(1, 2, 2, 40, 17, 16, seed=11)
    dq, _, _ = check_forward_backward(attn, {"causal": True}, q, k, v)
    o, lse = attn(q, k, v, return_lse=True)
    assert torch.equal(o[:, :, :23], torch.zeros_like(o[:, :, :23])) and torch.isneginf(lse[:, :, :23]).all()
    assert torch.isfinite(lse[:, :, 23:]).all() and torch.equal(dq[:, :, :23], torch.zeros_like(dq[:, :, :23]))
    # key padding: batch 1 has no key, every tile of it is skipped
    attn = compile_scheduled({"mask_mod": _padding}, 2, 1)
    q, k, v = random_qkv(3, 2, 1, 20, 37, 16, seed=12)
    dq, dk, dv = check_forward_backward(attn, {"mask_mod": _padding}, q, k, v)
    o, lse = attn(q, k, v, return_lse=True)
    assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.isneginf(lse[1]).all()
    assert not (dq[1].any() or dk[1].any() or dv[1].any())


@requires_triton
def test_skipped_tiles_are_never_read():
    # window (6, 2), N = M = 40, 16 x 16 tiles: query tile 0 (rows 0..15) sees keys < 18 and so never
    # visits KV tile 2 (keys 32..39). A NaN value there would reach rows 0..15 through P V (0 * NaN)
    # and dQ through dP = dO V^T if the tile were visited and masked.
    attn = compile_scheduled({"window": (6, 2)}, 2, 2)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 40, 40, 16, seed=13))
    poisoned = v.detach().clone()
    poisoned[:, :, 32:] = float("nan")
    o, lse = attn(q, k, poisoned, return_lse=True)
    (dq,) = torch.autograd.grad(o.sum(), q)
    assert torch.isfinite(o[:, :, :16]).all() and torch.isfinite(lse).all() and torch.isfinite(dq[:, :, :16]).all()
    reference_o, _ = dense_attention(q.detach(), k.detach(), v.detach(), window=(6, 2))
    torch.testing.assert_close(o[:, :, :16].double(), reference_o[:, :, :16], atol=2e-6, rtol=2e-6)
    # and the transpose: KV tile 0 (keys 0..15) is seen by rows up to 21 only, so the dK/dV kernel skips
    # query tile 2 (rows 32..39); NaN queries there would reach dK and dV of keys 0..15 (through
    # delta = rowsum(o * dO)) if that tile were visited and masked.
    poisoned = q.detach().clone()
    poisoned[:, :, 32:] = float("nan")
    _, dk, dv = torch.autograd.grad(attn(poisoned, k, v).sum(), (q, k, v), allow_unused=True)
    assert torch.isfinite(dk[:, :, :16]).all() and torch.isfinite(dv[:, :, :16]).all()
    assert torch.isnan(dk[:, :, 32:]).any()  # keys 32..39 are seen by the poisoned rows


@requires_triton
def test_generated_source_prints_the_schedule_bounds():
    causal = compile_scheduled({"causal": True}, 2, 2).source
    assert "q_first = start_m * BLOCK_M" in causal and "q_last = tl.minimum(q_first + BLOCK_M, N) - 1" in causal
    # forward, dQ, and the dK/dV kernel's scan over the query tiles (the transpose of the schedule)
    assert causal.count("kv_hi = tl.minimum(M, M - N + q_last + 1)") == 3
    assert causal.count("kv_full_hi = tl.minimum(M, M - N + q_first + 1)") == 3
    assert "for chunk in range(0, q_tiles, SCAN_TILES):" in causal
    assert "@triton.jit\ndef _kv_tiles(" in causal and "lo, hi = 0, M" not in causal
    padding = compile_scheduled({"mask_mod": _padding}, 2, 1).source
    assert "= tl.load(cap0_PADDED_LENGTHS_ptr + b * cap0_PADDED_LENGTHS_stride0)" in padding  # a scalar load
    lagging = compile_scheduled({"mask_mod": _lagging_chunks}, 2, 2).source
    assert "_floordiv(q_last - 5, 8)" in lagging
    documents = compile_scheduled({"mask_mod": _documents}, 2, 1).source
    assert "kv_full_lo, kv_full_hi = 0, 0" in documents  # a residual mask: no tile is full
    # no schedule: without a mask every whole tile is full; with one (no sparsity pass) every tile is masked
    dense = compile_scheduled({}, 2, 2).source
    assert "full_lo, full_hi = 0, M // BLOCK_N * BLOCK_N" in dense and "_kv_tiles" not in dense
    assert "full_lo, full_hi = 0, N // BLOCK_M * BLOCK_M" in dense  # dK/dV: every whole query tile is full
    unscheduled = [name for name in SCHEDULE_PIPELINE if name != "sparsity"]
    attn = compile_scheduled({"causal": True}, 2, 2, pipeline=unscheduled)
    assert region_schedule(attn) is None and "full_lo, full_hi = lo, lo" in attn.source
    q, k, v = random_qkv(1, 2, 2, 21, 30, 16, seed=14)
    check_forward_backward(attn, {"causal": True}, q, k, v)


@requires_triton
def test_linear_score_folds_its_scale_into_one_multiply():
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=64), backend="triton")
    scale = 1 / math.sqrt(64) / math.log(2)
    assert f"s = score * {scale!r}" in attn.source
    assert f"dx = ds * {scale * math.log(2)!r}" in attn.source and "_score_grad" not in attn.source


# Learnable biases (PyTorch's TestLearnableBiases): name -> (score_mod factory, captured shapes, spec fields,
# reference options, (B, H, Hkv, N, M, D)). A factory builds the mod over its tensors, so the reference reads
# float64 copies of the very tensors the kernels differentiate.
def _per_head_bias(bias):
    return lambda score, b, h, q_idx, kv_idx: score + bias[h]


def _per_key_bias(bias):
    return lambda score, b, h, q_idx, kv_idx: score + bias[kv_idx]


def _relative_position_table(table):
    return lambda score, b, h, q_idx, kv_idx: score + table[h, (kv_idx - q_idx).clamp(-4, 4) + 4]


def _pair_bias(pair):
    return lambda score, b, h, q_idx, kv_idx: score + pair[q_idx, kv_idx]


def _row_and_column_biases(rows, columns):
    return lambda score, b, h, q_idx, kv_idx: score + rows[q_idx] + columns[kv_idx]


def _learnable_alibi(slopes):
    return lambda score, b, h, q_idx, kv_idx: score + slopes[h] * (kv_idx - q_idx)


def _softcapped_bias(bias):
    return lambda score, b, h, q_idx, kv_idx: 4.0 * torch.tanh((score + bias[h, kv_idx]) / 4.0)


LEARNABLE_CASES = {
    "per_head": (_per_head_bias, {"bias": (4,)}, {"causal": True}, {"causal": True}, (2, 4, 2, 19, 23, 16)),
    "per_key": (_per_key_bias, {"bias": (34,)}, {"window": (5, 3)}, {"window": (5, 3)}, (1, 2, 2, 27, 34, 16)),
    "relative_position": (
        _relative_position_table,
        {"table": (2, 9)},
        {"causal": True},
        {"causal": True},
        (1, 2, 1, 21, 17, 16),
    ),
    "pair": (_pair_bias, {"pair": (20, 33)}, {"causal": True}, {"causal": True}, (1, 2, 2, 20, 33, 16)),
    # no mask: full tiles, whose last KV tile is cut by M (its padded keys must add nothing to the row sums)
    "row_and_column": (_row_and_column_biases, {"rows": (24,), "columns": (40,)}, {}, {}, (1, 2, 2, 24, 40, 16)),
    "alibi_slopes": (_learnable_alibi, {"slopes": (4,)}, {"causal": True}, {"causal": True}, (1, 4, 2, 25, 18, 16)),
    "softcapped_bias": (
        _softcapped_bias,
        {"bias": (2, 29)},
        {"window": (4, 4)},
        {"window": (4, 4)},
        (1, 2, 2, 22, 29, 16),
    ),
}


def check_captured_gradients(factory, tensors, fields, options, shapes, dtype=torch.float32, trainable=None):
    """dq, dk, dv and the gradients of the captured tensors in ``trainable`` (default: all) against float64 autograd.

    Returns the captured tensors passed to the kernels, whose ``grad`` the caller may inspect further.
    """
    batch, heads, kv_heads, n, m, d = shapes
    trainable = set(tensors) if trainable is None else trainable
    spec = attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, score_mod=factory(**tensors),
                                **fields)  # fmt: skip
    attn = attncc.compile(spec, backend="triton", pipeline=SMALL_TILES)
    captured = {name: t.detach().clone().requires_grad_(name in trainable) for name, t in tensors.items()}
    reference_captured = {name: t.detach().double().requires_grad_(name in trainable) for name, t in tensors.items()}
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, d, dtype=dtype, seed=n)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o, lse = attn(*leaves, return_lse=True, **captured)
    reference_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference_o, reference_lse = dense_attention(*reference_leaves, score_mod=factory(**reference_captured), **options)
    assert_attention_matches(o, lse, reference_o.detach(), reference_lse.detach(), dtype)

    generator = torch.Generator().manual_seed(n)
    grad_o = torch.randn(o.shape, generator=generator).to(dtype)
    grad_lse = torch.where(reference_lse.isinf(), 0.0, torch.randn(lse.shape, generator=generator, dtype=torch.float64))
    names = sorted(trainable)
    grads = torch.autograd.grad((o, lse), [*leaves, *(captured[name] for name in names)], (grad_o, grad_lse.float()))
    reference_grads = torch.autograd.grad(
        (reference_o, reference_lse), [*reference_leaves, *(reference_captured[name] for name in names)],
        (grad_o.double(), grad_lse),
    )  # fmt: skip
    assert_gradients_match(grads[:3], reference_grads[:3], dtype)
    tolerance = GRAD_TOLERANCE[dtype]
    for name, grad, reference in zip(names, grads[3:], reference_grads[3:]):
        assert grad.dtype == captured[name].dtype and grad.shape == captured[name].shape, name
        assert reference.abs().max() > 0, name  # the case reaches the tensor
        torch.testing.assert_close(grad.double(), reference, atol=tolerance["atol"] * float(reference.abs().max()),
                                   rtol=tolerance["rtol"], msg=lambda text, name=name: f"d{name}: {text}")  # fmt: skip
    return attn, captured


def learnable_tensors(shapes: dict, seed=0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


@requires_triton
@pytest.mark.parametrize("case", sorted(LEARNABLE_CASES))
def test_gradients_of_learnable_biases(case):
    factory, tensor_shapes, fields, options, shapes = LEARNABLE_CASES[case]
    check_captured_gradients(factory, learnable_tensors(tensor_shapes), fields, options, shapes)


@requires_triton
@pytest.mark.parametrize("case, dtype", [("per_head", torch.float16), ("softcapped_bias", torch.bfloat16)], ids=str)
def test_gradients_of_learnable_biases_in_half_precision(case, dtype):
    factory, tensor_shapes, fields, options, shapes = LEARNABLE_CASES[case]
    check_captured_gradients(factory, learnable_tensors(tensor_shapes), fields, options, shapes, dtype=dtype)


def _two_biases(bias, table):
    return lambda score, b, h, q_idx, kv_idx: score * bias[h] + table[h, (kv_idx - q_idx).clamp(-4, 4) + 4]


@requires_triton
def test_two_trainable_captured_tensors_and_one_left_frozen():
    tensors = learnable_tensors({"bias": (2,), "table": (2, 9)}, seed=3)
    options, shapes = {"window": (6, 6)}, (1, 2, 2, 18, 21, 16)
    check_captured_gradients(_two_biases, tensors, options, options, shapes)
    attn, captured = check_captured_gradients(_two_biases, tensors, options, options, shapes, trainable={"table"})
    assert captured["bias"].grad is None
    # the generated dK/dV kernel adds into both tensors' gradients, each only when it is wanted
    assert attn.source.count("tl.atomic_add(") == 2 and "if cap0_bias_needs_grad:" in attn.source


@requires_triton
def test_gradient_reductions_follow_the_index():
    """One atomic per tile for a per-head bias, column sums for a per-key bias, whole tiles for a pair bias."""
    sources = {}
    for case in ("per_head", "per_key", "pair"):
        factory, tensor_shapes, fields, _, (_, heads, kv_heads, _, _, d) = LEARNABLE_CASES[case]
        score_mod = factory(**learnable_tensors(tensor_shapes))
        spec = attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, score_mod=score_mod, **fields)
        sources[case] = attncc.compile(spec, backend="triton", pipeline=SMALL_TILES).source
    assert (
        "tl.atomic_add(cap0_bias_grad_ptr + h * cap0_bias_grad_stride0, tl.sum(tl.sum(contribution, 1), 0))"
        in (sources["per_head"])
    )
    assert "tl.sum(contribution, 0)[None, :], mask=col_ok)" in sources["per_key"]
    assert "tl.atomic_add(cap0_pair_grad_ptr + q_idx * cap0_pair_grad_stride0 + kv_idx * cap0_pair_grad_stride1, " \
           "contribution, mask=row_ok & col_ok)" in sources["pair"]  # fmt: skip
    # without a trainable tensor the kernels are those of a plain score_mod
    plain = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, causal=True), backend="triton")
    assert "_captured_grads" not in plain.source and "TRAINABLE = ()" in plain.source


def _masked_by_a_float(gate, bias):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, kv_idx]

    def mask_mod(b, h, q_idx, kv_idx):
        return gate[kv_idx] > -1.0

    return score_mod, mask_mod


@requires_triton
def test_float_tensors_read_only_by_the_mask_get_zero_gradients():
    generator = torch.Generator().manual_seed(6)
    gate, bias = torch.randn(21, generator=generator), torch.randn(2, 21, generator=generator)
    score_mod, mask_mod = _masked_by_a_float(gate, bias)
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, score_mod=score_mod, mask_mod=mask_mod)
    attn = attncc.compile(spec, backend="triton", pipeline=SMALL_TILES)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 9, 21, 16, seed=6))
    gate, bias = gate.requires_grad_(), bias.requires_grad_()
    attn(q, k, v, gate=gate, bias=bias).sum().backward()
    assert torch.equal(gate.grad, torch.zeros_like(gate))
    hidden = gate.detach() <= -1.0
    assert hidden.any() and torch.equal(bias.grad[:, hidden], torch.zeros_like(bias.grad[:, hidden]))
    assert bias.grad[:, ~hidden].abs().min() > 0
    # the region's backward, called directly with a context (as attncc's custom op calls it), returns them too
    o, lse = attn(q, k, v, return_lse=True, gate=gate, bias=bias)
    region = attn.module.FlashAttention
    captured = attn.captured_values({"gate": gate, "bias": bias}, q.device)  # in the program's order
    context = types.SimpleNamespace(saved_tensors=(q, k, v, o, lse, *captured), needs_input_grad=(True,) * 5)
    _, _, _, *grads = region.backward(context, torch.ones_like(o), torch.zeros_like(lse))
    by_name = {("gate" if t is gate else "bias"): grad for t, grad in zip(captured, grads)}
    assert torch.equal(by_name["gate"], torch.zeros_like(gate))
    torch.testing.assert_close(by_name["bias"], bias.grad, atol=1e-6, rtol=1e-6)


@requires_triton
def test_untiled_or_unfused_graphs_are_refused():
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16)
    with pytest.raises(attncc.BackendError, match=r"tile\{target=triton\}"):
        attncc.compile(spec, backend="triton", pipeline=["canonicalize", "fold-scale", "online-softmax"])
    with pytest.raises(attncc.BackendError, match="one fused flash_attention region"):
        attncc.compile(spec, backend="triton", pipeline=["canonicalize"])
    with pytest.raises(attncc.BackendError, match="power of two"):
        attncc.compile(spec, backend="triton", pipeline=["online-softmax", "tile{target=triton,block_m=24}"])


@requires_triton
def test_backend_preference_by_device():
    from attncc.backends import backend_for_device

    assert backend_for_device("cuda") == "triton"
    assert backend_for_device("cpu") == "pytorch"


def test_missing_triton_is_a_backend_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    monkeypatch.delitem(sys.modules, "attncc.backends.triton", raising=False)
    with pytest.raises(attncc.BackendError, match=r"pip install attncc\[triton\]"):
        attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16), backend="triton")
    from attncc.backends import backend_for_device

    assert backend_for_device("cuda") == "pytorch"


@requires_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's error without a GPU")
def test_an_interpreter_that_cannot_run_the_kernels_is_a_backend_error(monkeypatch):
    import attncc.backends.triton as backend

    assert backend.interpreter_problem() is None  # this interpreter runs them (else this test is skipped)
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16), backend="triton")
    q, k, v = random_qkv(1, 2, 2, 5, 7, 16, seed=4)
    monkeypatch.setattr(backend, "interpreter_problem", lambda: "Triton's interpreter cannot run a loop here")
    with pytest.raises(attncc.BackendError, match="interpreter cannot run a loop"):
        attn(q, k, v)


GPU_COMPILE = textwrap.dedent(
    """
    import importlib.util, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location("generated", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dtype, floats = sys.argv[2], {"LSE", "DELTA", "DLSE", "ROPE_FREQ"}
    meta = dict(GROUPS=module.GROUPS, BLOCK_M=module.BLOCK_M, BLOCK_N=module.BLOCK_N, HEAD_DIM=module.HEAD_DIM,
                BLOCK_D=module.BLOCK_D, HEAD_DIM_V=module.HEAD_DIM_V, BLOCK_DV=module.BLOCK_DV,
                DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", INTERPRET_BF16=False)
    compiled = []
    for name in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        kernel = getattr(module, name)
        signature, constants = {}, {}
        for param in kernel.params:
            if param.is_constexpr and param.name.endswith("_needs_grad"):  # a captured tensor's gradient
                signature[param.name], constants[param.name] = "constexpr", True
            elif param.is_constexpr:
                signature[param.name], constants[param.name] = "constexpr", meta[param.name]
            elif param.name in floats or param.name.endswith("_grad_ptr"):
                signature[param.name] = "*fp32"
            elif param.name == "ROPE_PAIR":
                signature[param.name] = "*i32"
            elif param.name.isupper() and param.name not in ("H", "N", "M"):
                signature[param.name] = "*" + dtype
            else:
                signature[param.name] = "*i64" if param.name.endswith("_ptr") else "i32"
        options = dict(num_warps=module.NUM_WARPS, num_stages=module.NUM_STAGES)
        triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)
        compiled.append(name)
    print(json.dumps(compiled))
    """
)


@requires_triton
@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton's NVIDIA backend")
@pytest.mark.parametrize(
    "case, dtype",
    [("document_mask", "bf16"), ("exotic_score_mod", "fp16"), ("mqa", "fp32"), ("key_padding_per_batch", "fp16")],
)
def test_kernels_compile_for_an_h100_without_one(case, dtype):
    """The interpreter accepts more than the compiler: build each kernel for sm_90 to PTX and cubin."""
    attn, _ = compiled_variant(case)
    assert_kernels_compile_for_an_h100(attn.path, dtype)


@requires_triton
@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton's NVIDIA backend")
def test_captured_gradient_kernels_compile_for_an_h100_without_one():
    """The dK/dV kernel with gradient atomics of every reduction (per head, per key, whole tile), for sm_90."""
    bias, table, keys = learnable_tensors({"bias": (2,), "table": (2, 9), "keys": (64,)}).values()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * bias[h] + table[h, (kv_idx - q_idx).clamp(-4, 4) + 4] + keys[kv_idx]

    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, score_mod=score_mod), backend="triton")
    assert attn.source.count("tl.atomic_add(") == 3
    assert_kernels_compile_for_an_h100(attn.path, "bf16")


def assert_kernels_compile_for_an_h100(path, dtype: str):
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", GPU_COMPILE, str(path), dtype], env=environment,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [
        "_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"
    ]  # fmt: skip


@requires_triton
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_variant_on_cuda(case, dtype):
    run_variant(case, dtype, device="cuda")


@requires_triton
@requires_cuda
def test_cuda_output_tolerances_hold_at_default_tiles():
    spec = attncc.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=128, causal=True)
    attn = attncc.compile(spec, backend="triton")
    q, k, v = random_qkv(2, 8, 2, 517, 777, 128, dtype=torch.bfloat16, seed=3)
    check_forward_backward(attn, {"causal": True}, q.cuda(), k.cuda(), v.cuda())
