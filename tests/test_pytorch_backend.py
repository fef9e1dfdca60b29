"""The PyTorch backend's streaming region: many tiles, GQA packing, partial pipelines, autograd."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc
from tests.reference import assert_attention_matches, dense_attention
from tests.test_numerics import MOD_CASES, SPEC_CASES, random_qkv

SMALL_TILES = [
    "canonicalize", "fold-scale", "group-kv", "online-softmax", "sparsity", "tile{target=pytorch,block_m=8,block_n=16}"
]
PARTIAL_PIPELINES = {
    "no passes": [],
    "canonicalize only": ["canonicalize"],
    "grouped, not fused": ["canonicalize", "group-kv"],
    "fused, natural exp": ["group-kv", "online-softmax", "tile{target=pytorch,block_m=5,block_n=7}"],
    "fused, sparse, natural exp": ["online-softmax", "sparsity", "tile{target=pytorch,block_m=5,block_n=7}"],
}


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_spec_features_with_many_tiles(case):
    fields, options, (batch, heads, kv_heads, n, m, d) = SPEC_CASES[case]
    spec = attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, **fields)
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, d, spec.v_head_dim, seed=7)
    attn = attncc.compile(spec, pipeline=SMALL_TILES)
    assert "block_m = 8, block_n = 16" in str(attn.graph)
    o, lse = attn(q, k, v, return_lse=True)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, **options), torch.float32)


SLOPES_FLEX = torch.tensor([0.5, 0.25, 0.125, 0.0625])


@pytest.mark.parametrize("n", [500, 3000], ids=["short, fused with a bias", "long, streamed"])
def test_distance_terms_keep_their_integer_difference(n):
    """FlexAttention's ALiBi mod, ``score + slope[h] * (kv_idx - q_idx)``, is printed as written: the distance is an
    exact integer difference before the float product. Printing its expansion, slope * kv_idx - slope * q_idx, took
    the difference of two float32 terms near 1500 and put 1e-4 into the scores (max |o - ref| 1.1e-4 at N=4096)."""
    from attncc.ir.expr import split_linear

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + SLOPES_FLEX[h] * (kv_idx - q_idx)

    attn = attncc.compile(attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=True, score_mod=score_mod))
    region = attn.graph.nodes_of(attncc.ir.ops.FlashAttention)[0]
    assert "kv_idx - q_idx" in str(split_linear(region.op.score)[1])
    q, k, v = random_qkv(1, 4, 2, n, n, 16, seed=n)
    expected = dense_attention(q.double(), k.double(), v.double(), causal=True, score_mod=score_mod)
    assert_attention_matches(*attn(q, k, v, return_lse=True), *expected, torch.float32)


@pytest.mark.parametrize("case", sorted(MOD_CASES))
def test_mods_with_many_tiles(case):
    score_mod, mask_mod, (batch, heads, kv_heads, n, m, d) = MOD_CASES[case]
    spec = attncc.AttentionSpec(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=d, score_mod=score_mod, mask_mod=mask_mod
    )
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, d, dtype=torch.float16, seed=3)
    o, lse = attncc.compile(spec, pipeline=SMALL_TILES)(q, k, v, return_lse=True)
    reference = dense_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod)
    assert_attention_matches(o, lse, *reference, torch.float16)


@pytest.mark.parametrize("name", sorted(PARTIAL_PIPELINES))
def test_partial_pipelines_compute_the_same(name):
    doc = torch.tensor([0] * 9 + [1] * 14 + [2] * 10)
    spec = attncc.AttentionSpec(num_heads=6, num_kv_heads=2, head_dim=16, causal=True, softcap=5.0,
                                mask_mod=lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx])  # fmt: skip
    q, k, v = random_qkv(2, 6, 2, 33, 33, 16, seed=11)
    o, lse = attncc.compile(spec, pipeline=PARTIAL_PIPELINES[name])(q, k, v, return_lse=True)
    reference = dense_attention(q, k, v, causal=True, softcap=5.0, mask_mod=lambda b, h, i, j: doc[i] == doc[j])
    assert_attention_matches(o, lse, *reference, torch.float32)


def test_region_never_repeats_kv_and_packs_query_heads():
    source = attncc.compile(attncc.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=16)).source
    assert "repeat_interleave" not in source
    assert "GROUPS = 4" in source and "q.reshape(B, kv_heads, rows, D)" in source


def gradient_check(spec, reference_options, shapes, pipeline=SMALL_TILES, captured=None, seed=0):
    """Gradients of a loss using o and lse, against autograd through the float64 reference."""
    batch, heads, kv_heads, n, m, d = shapes
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, d, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    weight_o = torch.randn(batch, heads, n, d, generator=generator)
    weight_lse = torch.randn(batch, heads, n, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = attncc.compile(spec, pipeline=pipeline)(*leaves, return_lse=True, **(captured or {}))
    (o * weight_o).sum().add((torch.where(lse.isinf(), 0.0, lse) * weight_lse).sum()).backward()
    reference_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_o, ref_lse = dense_attention(*reference_leaves, **reference_options)
    (ref_o * weight_o).sum().add((torch.where(ref_lse.isinf(), 0.0, ref_lse) * weight_lse).sum()).backward()
    for name, leaf, reference in zip("qkv", leaves, reference_leaves):
        assert leaf.grad.dtype == torch.float32
        torch.testing.assert_close(leaf.grad.double(), reference.grad, atol=2e-5, rtol=2e-5, msg=f"d{name}")
    return leaves


def test_gradients_causal_gqa_softcap():
    spec = attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=True, softcap=3.0)
    gradient_check(spec, {"causal": True, "softcap": 3.0}, (2, 4, 2, 21, 30, 16))


def test_gradients_through_score_mod_and_to_a_captured_bias_table():
    table = torch.randn(4, 9, generator=torch.Generator().manual_seed(5)).requires_grad_()
    reference_table = table.detach().double().requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * torch.sigmoid(score) + table[h, (kv_idx - q_idx).clamp(-4, 4) + 4]

    def reference_mod(score, b, h, q_idx, kv_idx):
        return score * torch.sigmoid(score) + reference_table[h, (kv_idx - q_idx).clamp(-4, 4) + 4]

    spec = attncc.AttentionSpec(num_heads=4, head_dim=16, score_mod=score_mod)
    gradient_check(spec, {"score_mod": reference_mod}, (1, 4, 4, 19, 23, 16))
    torch.testing.assert_close(table.grad.double(), reference_table.grad, atol=2e-5, rtol=2e-5)


def test_gradients_with_fully_masked_rows_are_zero_there():
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx % 4 != 1) & (kv_idx <= q_idx)

    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, mask_mod=mask_mod)
    q, _, _ = gradient_check(spec, {"mask_mod": mask_mod}, (1, 2, 2, 17, 17, 16))
    assert torch.equal(q.grad[:, :, 1::4], torch.zeros_like(q.grad[:, :, 1::4]))


def test_gradients_unfused_pipeline():
    spec = attncc.AttentionSpec(num_heads=4, num_kv_heads=1, head_dim=16, window=(3, 2))
    gradient_check(spec, {"window": (3, 2)}, (1, 4, 1, 13, 18, 16), pipeline=["canonicalize", "group-kv"])


def test_half_precision_gradients_have_input_dtype():
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, causal=True)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 9, 9, 16, dtype=torch.bfloat16))
    attncc.compile(spec, pipeline=SMALL_TILES)(q, k, v).float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    assert torch.isfinite(q.grad.float()).all()


@pytest.mark.parametrize("table_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_captured_tables_are_read_in_float32(table_dtype):
    table = torch.randn(2, 9, generator=torch.Generator().manual_seed(2)).to(table_dtype)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, (kv_idx - q_idx).clamp(-4, 4) + 4]

    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, score_mod=score_mod)
    q, k, v = random_qkv(1, 2, 2, 17, 19, 16, seed=4)
    o, lse = attncc.compile(spec, pipeline=SMALL_TILES)(q, k, v, return_lse=True)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, score_mod=score_mod), torch.float32)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    lo=st.integers(-40, 300), width=st.integers(-10, 300), full_lo=st.integers(-40, 320),
    full_width=st.integers(-10, 320), m=st.integers(1, 300), block_n=st.integers(1, 96),
)  # fmt: skip
def test_kv_chunks_cover_the_visit_range_and_unmask_only_full_keys(lo, width, full_lo, full_width, m, block_n):
    chunks = attncc.compile(attncc.AttentionSpec(num_heads=1, head_dim=8)).module._kv_chunks
    hi, full_hi = lo + width, full_lo + full_width
    tiles = chunks(lo, hi, full_lo, full_hi, m, block_n)
    start, stop = max(lo, 0), min(hi, m)
    covered = [key for c0, c1, _ in tiles for key in range(c0, c1)]
    assert covered == list(range(start, stop))  # every visited key once, in order, nothing else
    for c0, c1, masked in tiles:
        assert 0 < c1 - c0 <= block_n
        assert masked or (full_lo <= c0 and c1 <= full_hi)  # a tile without mask holds only full keys
    if 0 < stop - start <= block_n:
        assert len(tiles) == 1  # a band is one matmul per query tile


def test_banded_query_tiles_take_one_kv_tile():
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, causal=True, window=(256, 0)))
    region = attn.module.FlashAttention
    assert region.BLOCK_M + 256 <= region.BLOCK_N  # the band of a query tile fits one KV tile
    b = torch.arange(1).view(-1, 1, 1, 1)
    tiles = [kv for *_, kv in region.tiles(1, 4096, 4096, 2, "cpu", b)]
    assert all(len(kv) == 1 for kv in tiles[1:]) and tiles[-1][0][1] - tiles[-1][0][0] == region.BLOCK_M - 1 + 257
    q, k, v = random_qkv(1, 2, 2, 700, 700, 16, seed=21)
    o, lse = attn(q, k, v, return_lse=True)
    assert_attention_matches(o, lse, *dense_attention(q.double(), k.double(), v.double(), causal=True, window=(256, 0)),
                             torch.float32)  # fmt: skip


FUSED_CASES = {  # fields, reference options, (B, H, Hkv, N, M, D), the kernel the tile pass picks
    "dense": ({}, {}, (2, 4, 2, 37, 53, 16), "dense"),
    "causal top-left": ({"causal": "top_left"}, {"causal": True, "top_left": True}, (1, 4, 4, 41, 29, 16),
                        "causal_top_left"),
    "causal bottom-right, N == M": ({"causal": True}, {"causal": True}, (1, 6, 2, 45, 45, 32), "causal_bottom_right"),
    "causal bottom-right, N != M": ({"causal": True}, {"causal": True}, (1, 2, 2, 19, 44, 16), "causal_bottom_right"),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_plain_attention_runs_on_the_fused_kernel(case, dtype):
    """Dense and causal regions call torch's fused CPU kernel (bottom-right only when N == M), forward and
    backward; a loss that uses lse differentiates through the streaming loop instead. Both match float64."""
    fields, options, (batch, heads, kv_heads, n, m, d), kernel = FUSED_CASES[case]
    attn = attncc.compile(attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, **fields))
    assert f"fused_kernel = {kernel}" in str(attn.graph)
    assert "_scaled_dot_product_flash_attention_for_cpu(" in attn.source
    q, k, v = (t.requires_grad_() for t in random_qkv(batch, heads, kv_heads, n, m, d, dtype=dtype, seed=n))
    o, lse = attn(q, k, v, return_lse=True)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference_o, reference_lse = dense_attention(*leaves, **options)
    assert_attention_matches(o, lse, reference_o.detach(), reference_lse.detach(), dtype)
    grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    for with_lse in (False, True):
        grad_lse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2)) if with_lse else None
        outputs = (o, lse) if with_lse else (o,)
        grads = torch.autograd.grad(outputs, (q, k, v), (grad_o.to(dtype), grad_lse)[: len(outputs)], retain_graph=True)
        reference_outputs = (reference_o, reference_lse) if with_lse else (reference_o,)
        reference_grad_outputs = (grad_o.double(), None if grad_lse is None else grad_lse.double())
        reference_grads = torch.autograd.grad(reference_outputs, leaves, reference_grad_outputs[: len(outputs)],
                                              retain_graph=True)  # fmt: skip
        for grad, expected in zip(grads, reference_grads):
            assert grad.dtype == dtype
            scale = float(expected.abs().max())
            tolerance = 2e-5 if dtype == torch.float32 else 8 * 2.0**-9
            torch.testing.assert_close(grad.double(), expected, atol=tolerance * scale, rtol=tolerance)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_non_finite_query_row_on_the_fused_kernel_path(causal, value):
    """The fused kernel gives a query row holding NaN or inf o = 0, lse = 0; attncc sees it and computes the row on
    the streaming loop (docs/robustness.md: non-finite, NaN for a NaN), every other row exact, forward and backward."""
    attn = attncc.compile(attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=causal))
    assert "_scaled_dot_product_flash_attention_for_cpu(" in attn.source
    q, k, v = random_qkv(1, 4, 2, 23, 23, 16, seed=5)
    q[0, 3, 7, 5] = value
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = attn(*leaves, return_lse=True)
    reference_o, reference_lse = dense_attention(q.double(), k.double(), v.double(), causal=causal)
    assert not torch.isfinite(o[0, 3, 7]).any() and not torch.isfinite(lse[0, 3, 7])
    if value != value:
        assert torch.isnan(o[0, 3, 7]).all() and torch.isnan(lse[0, 3, 7])
    rows = torch.ones(4, 23, dtype=torch.bool)
    rows[3, 7] = False
    assert_attention_matches(o[0][rows], lse[0][rows], reference_o[0][rows], reference_lse[0][rows], torch.float32)
    o.sum().backward()
    assert not torch.isfinite(leaves[0].grad[0, 3, 7]).all() and torch.isfinite(leaves[0].grad[0][rows]).all()


@pytest.mark.parametrize(
    "fields, pipeline",
    [
        ({"softcap": 20.0}, None),
        ({"v_head_dim": 8}, None),
        ({"causal": True}, SMALL_TILES),
        ({"causal": True}, [*SMALL_TILES[:-1], "tile{target=pytorch,fused_kernel=0}"]),
        ({"causal": True, "window": (8, 0)}, [*SMALL_TILES[:-1], "tile{target=pytorch,fused_kernel=0}"]),
    ],
    ids=["softcap", "v_head_dim", "explicit tiles", "fused_kernel=0", "window, fused_kernel=0"],
)
def test_other_regions_stream_their_tiles(fields, pipeline):
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, **fields), pipeline=pipeline)
    assert "fused_kernel" not in str(attn.graph) and "_scaled_dot_product_flash_attention" not in attn.source


DOCUMENTS = torch.tensor([0] * 10 + [1] * 13 + [2] * 8)
SLOPES = torch.rand(4, generator=torch.Generator().manual_seed(0))
MASKED_CASES = {  # fields, key length
    "window": ({"causal": True, "window": (5, 0)}, 31),
    "documents": ({"mask_mod": lambda b, h, q_idx, kv_idx: DOCUMENTS[q_idx] == DOCUMENTS[kv_idx]}, 31),
    "alibi, N != M": ({"score_mod": lambda score, b, h, q_idx, kv_idx: score + SLOPES[h] * (kv_idx - q_idx)}, 40),
    "rows that see nothing": ({"mask_mod": lambda b, h, q_idx, kv_idx: (q_idx % 7 != 3) & (kv_idx < 25)}, 31),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(MASKED_CASES))
def test_short_masked_regions_run_on_the_fused_kernel_with_a_bias(case, dtype):
    """Any other linear score under any mask: a short sequence runs the fused kernel with the mask and the score's
    other terms as a float attn_mask, forward and backward (rows that see no key take the loop); GQA 4/2."""
    fields, m = MASKED_CASES[case]
    attn = attncc.compile(attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, **fields))
    kernel = "band" if case == "window" else "masked"  # a window's inner query tiles share one bias
    assert f"fused_kernel = {kernel}" in str(attn.graph) and "bias = FlashAttention.bias(B, H, N, M, q.device" in attn.source
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 4, 2, 31, m, 16, dtype=dtype, seed=m))
    with torch.profiler.profile() as profile:
        o, lse = attn(q, k, v, return_lse=True)
        grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        grads = torch.autograd.grad(o, (q, k, v), grad_o)
    ran = {event.key for event in profile.key_averages()}
    fallback = case == "rows that see nothing"
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ran
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ran) is not fallback
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference_o, reference_lse = dense_attention(*leaves, causal=fields.get("causal", False), window=fields.get("window"),
                                                 mask_mod=fields.get("mask_mod"), score_mod=fields.get("score_mod"))  # fmt: skip
    assert_attention_matches(o, lse, reference_o.detach(), reference_lse.detach(), dtype)
    reference_grads = torch.autograd.grad(reference_o, leaves, grad_o.double())
    for grad, expected in zip(grads, reference_grads):
        tolerance = 2e-5 if dtype == torch.float32 else 8 * 2.0**-9
        torch.testing.assert_close(grad.double(), expected, atol=tolerance * float(expected.abs().max()), rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_short_window_wider_than_the_sequence_runs_as_causal(dtype):
    """A causal window at least as wide as the sequence is the causal mask: the short path's bias is None and the
    fused kernel runs with is_causal (no bias read, hidden blocks skipped), forward and backward; a narrower window,
    a term, or N != M keep the bias."""
    attn = attncc.compile(attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=True, window=(40, 0)))
    region = attn.module.FlashAttention
    assert region.bias(2, 4, 41, 41, "cpu") is None
    assert region.bias(2, 4, 42, 42, "cpu") is not None and region.bias(2, 4, 30, 41, "cpu") is not None
    alibi = attncc.compile(attncc.AttentionSpec(num_heads=4, head_dim=16, causal=True, window=(40, 0), alibi=True))
    assert alibi.module.FlashAttention.bias(1, 4, 30, 30, "cpu") is not None
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 4, 2, 37, 37, 16, dtype=dtype, seed=37))
    with torch.profiler.profile() as profile:
        o, lse = attn(q, k, v, return_lse=True)
        grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        grads = torch.autograd.grad(o, (q, k, v), grad_o)
    ran = {event.key for event in profile.key_averages()}
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= ran  # fmt: skip
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference_o, reference_lse = dense_attention(*leaves, causal=True, window=(40, 0))
    assert_attention_matches(o, lse, reference_o.detach(), reference_lse.detach(), dtype)
    for grad, expected in zip(grads, torch.autograd.grad(reference_o, leaves, grad_o.double())):
        tolerance = 2e-5 if dtype == torch.float32 else 8 * 2.0**-9
        torch.testing.assert_close(grad.double(), expected, atol=tolerance * float(expected.abs().max()), rtol=tolerance)


def test_short_masked_region_trains_its_bias_and_long_ones_stream():
    """A learnable bias table gets its gradient from the streaming backward; past FUSED_MASK_SCORES scores per head
    the forward streams the tiles too."""
    from attncc.backends.pytorch import FUSED_MASK_SCORES

    table = torch.randn(40, 40, dtype=torch.float64).float().requires_grad_()
    attn = attncc.compile(attncc.AttentionSpec(
        num_heads=2, head_dim=8, score_mod=lambda score, b, h, q_idx, kv_idx: score + table[q_idx, kv_idx]))  # fmt: skip
    q, k, v = random_qkv(1, 2, 2, 23, 40, 8, seed=4)
    attn(q, k, v).square().sum().backward()
    expected_o, _ = dense_attention(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: score + table.double()[q_idx, kv_idx])
    (expected,) = torch.autograd.grad(expected_o.square().sum(), table)
    torch.testing.assert_close(table.grad.double(), expected.double(), atol=2e-5 * float(expected.abs().max()), rtol=2e-5)

    n = int(FUSED_MASK_SCORES**0.5) + 1
    documents = torch.arange(n) // 50

    def mask_mod(b, h, q_idx, kv_idx):
        return documents[q_idx] == documents[kv_idx]

    attn = attncc.compile(attncc.AttentionSpec(num_heads=1, head_dim=8, mask_mod=mask_mod))
    assert "fused_kernel = masked" in str(attn.graph)
    q, k, v = random_qkv(1, 1, 1, n, n, 8, seed=5)
    with torch.profiler.profile() as profile:
        o, lse = attn(q, k, v, return_lse=True)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in {event.key for event in profile.key_averages()}
    assert_attention_matches(o, lse, *dense_attention(q, k, v, mask_mod=mask_mod), torch.float32)


RELATIVE = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
BAND_CASES = {  # spec fields beyond the window, (B, H, Hkv, N, M), whether the band bias reads b or h
    "window, N == M": ({}, (1, 4, 2, 611, 611), False),
    "window, N < M": ({}, (2, 4, 4, 547, 733), False),
    "window + alibi (per head)": ({"alibi": True}, (1, 4, 2, 600, 600), True),
    "window + relative bias table": (
        {"score_mod": lambda score, b, h, q_idx, kv_idx: score + RELATIVE[h, (q_idx - kv_idx) % 64]}, (1, 4, 2, 650, 650),
        True),
    "window + per-sequence term of the distance": (
        {"score_mod": lambda score, b, h, q_idx, kv_idx: score - (b + 1) * 0.3 * ((q_idx - kv_idx) % 8)}, (2, 2, 1, 600, 640),
        True),
}  # fmt: skip


def band_calls(attn):
    """Replace the region's ``band`` with a spy; returns the list of what each call returned (None or its range)."""
    region = attn.module.FlashAttention
    band = region.band.__func__
    calls = []

    def spy(cls, *args):
        result = band(cls, *args)
        calls.append(None if result is None else result[0])
        return result

    region.band = classmethod(spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(BAND_CASES))
def test_band_inner_tiles_run_in_one_fused_call(case, dtype):
    """A sliding window whose mask and terms read q_idx and kv_idx only as kv_idx - q_idx (ALiBi, a relative bias,
    terms of b): past FUSED_MASK_SCORES the query tiles inside the band's edges run in one call of the fused kernel
    over strided windows of K and V (GROUPS query heads of a KV head as one tile's rows); edge tiles, the last
    partial tile and the backward stream. Float64 reference, forward and backward, N not a multiple of any tile."""
    fields, (batch, heads, kv_heads, n, m), reads_b_or_h = BAND_CASES[case]
    window = (37, 0)
    attn = attncc.compile(attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=16, causal=True,
                                               window=window, **fields))  # fmt: skip
    assert "fused_kernel = band" in str(attn.graph)
    region = attn.module.FlashAttention
    calls = band_calls(attn)
    q, k, v = (t.requires_grad_() for t in random_qkv(batch, heads, kv_heads, n, m, 16, dtype=dtype, seed=n))
    o, lse = attn(q, k, v, return_lse=True)
    (q0, q1), = calls
    # whole query tiles, from where a window first fits in [0, M) to the last whole tile whose window fits
    assert q0 % region.BLOCK_M == 0 and q1 % region.BLOCK_M == 0 and q1 - q0 >= 3 * region.BLOCK_M
    assert q1 >= min(n // region.BLOCK_M * region.BLOCK_M, n - (m - n) - region.BAND_N)
    assert q0 <= max(0, -(-(window[0] - (m - n)) // region.BLOCK_M) * region.BLOCK_M) + region.BLOCK_M
    bias = region.band_bias(batch, kv_heads, n, m, q0, q0, q.device,
                            *([RELATIVE] if "table" in case else []))  # fmt: skip
    assert (bias.shape[0] > 1) is reads_b_or_h
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference_o, reference_lse = dense_attention(*leaves, causal=True, window=window, alibi=fields.get("alibi", False),
                                                 score_mod=fields.get("score_mod"))  # fmt: skip
    assert_attention_matches(o, lse, reference_o.detach(), reference_lse.detach(), dtype)
    grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(o, (q, k, v), grad_o)
    reference_grads = torch.autograd.grad(reference_o, leaves, grad_o.double())
    for grad, expected in zip(grads, reference_grads):
        tolerance = 2e-5 if dtype == torch.float32 else 8 * 2.0**-9
        torch.testing.assert_close(grad.double(), expected, atol=tolerance * float(expected.abs().max()), rtol=tolerance)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_band_call_with_a_non_finite_query_falls_back_to_the_loop(value):
    """The fused kernel turns a query row holding NaN or inf into o = 0, lse = 0: the band call sees the lse and the
    loop computes every tile, so that row is non-finite (NaN for a NaN) as in the reference, every other row exact."""
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, causal=True, window=(37, 0)))
    calls = band_calls(attn)
    q, k, v = random_qkv(1, 2, 2, 600, 600, 16, seed=11)
    q[0, 1, 400, 3] = value
    o, lse = attn(q, k, v, return_lse=True)
    assert calls == [None]
    assert not torch.isfinite(o[0, 1, 400]).any() and not torch.isfinite(lse[0, 1, 400])
    if value != value:
        assert torch.isnan(o[0, 1, 400]).all()
    rows = torch.ones(2, 600, dtype=torch.bool)
    rows[1, 400] = False
    reference_o, reference_lse = dense_attention(q.double(), k.double(), v.double(), causal=True, window=(37, 0))
    assert_attention_matches(o[0][rows], lse[0][rows], reference_o[0][rows], reference_lse[0][rows], torch.float32)


@pytest.mark.parametrize(
    "fields",
    [
        {"mask_mod": lambda b, h, q_idx, kv_idx: DOCUMENTS[q_idx % 31] == DOCUMENTS[kv_idx % 31]},
        {"score_mod": lambda score, b, h, q_idx, kv_idx: score + 0.01 * q_idx},
        {"score_mod": lambda score, b, h, q_idx, kv_idx: score + RELATIVE[h, kv_idx % 64]},
    ],
    ids=["window & documents", "a term of q_idx", "a table read at kv_idx"],
)
def test_windows_whose_tiles_differ_stay_masked(fields):
    """A mask or term that reads q_idx or kv_idx other than as kv_idx - q_idx gives each query tile its own pattern:
    the region keeps fused_kernel = masked (no band call) and still matches the reference past the short length."""
    attn = attncc.compile(attncc.AttentionSpec(num_heads=4, head_dim=16, causal=True, window=(37, 0), **fields))
    assert "fused_kernel = masked" in str(attn.graph) and "def band(" not in attn.source
    q, k, v = random_qkv(1, 4, 4, 560, 560, 16, seed=2)
    mask_mod = fields.get("mask_mod")
    expected = dense_attention(q.double(), k.double(), v.double(), causal=True, window=(37, 0), mask_mod=mask_mod,
                               score_mod=fields.get("score_mod"))  # fmt: skip
    assert_attention_matches(*attn(q, k, v, return_lse=True), *expected, torch.float32)


@pytest.mark.parametrize("update", ["copy_", "data.copy_", "inference tensor"])
def test_tile_table_follows_every_update_of_a_captured_mask_tensor(update):
    """The call-time tile table is rebuilt when a captured tensor's values change, however they changed:
    ``.data.copy_`` bypasses the version counter, and inference tensors have none."""
    doc = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])  # tiles of 4: only the diagonal tiles are visible

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    tiles = [*SMALL_TILES[:-1], "tile{target=pytorch,block_m=4,block_n=4}"]
    attn = attncc.compile(attncc.AttentionSpec(num_heads=1, head_dim=8, mask_mod=mask_mod), pipeline=tiles)
    q, k, v = random_qkv(1, 1, 1, 12, 12, 8, seed=3)
    assert_attention_matches(*attn(q, k, v, return_lse=True), *dense_attention(q, k, v, mask_mod=mask_mod),
                             torch.float32)  # fmt: skip
    new = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])  # off-diagonal tiles become visible
    if update == "copy_":
        doc.copy_(new)
    elif update == "data.copy_":
        doc.data.copy_(new)
    else:
        with torch.inference_mode():
            doc = new.clone()
        attn.captured.doc = doc
    assert_attention_matches(*attn(q, k, v, return_lse=True), *dense_attention(q, k, v, mask_mod=mask_mod),
                             torch.float32)  # fmt: skip
