"""Decoding: the split-kv pass, the pytorch decode path, static and paged KV caches, against float64 attention."""

import importlib.util
from pathlib import Path

import pytest
import torch

import attncc
from attncc.api import reference_outputs
from attncc.backends.cpu_decode import CpuDecode
from attncc.backends.host_library import find_host_compiler
from attncc.errors import AttnccError
from attncc.interpreter import rotate, run_reference
from attncc.ir.expr import kv_idx, q_idx
from tests.reference import assert_attention_matches, dense_attention
from tests.test_triton import requires_triton

# Splits of at least 8 keys, so the small tests below run several parts and merge them.
PIPELINE = ["canonicalize", "fold-scale", "group-kv", "online-softmax", "sparsity", "split-kv{min_keys=8}",
            "tile{target=pytorch}"]  # fmt: skip
HEADS = 8
D = 16
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(params=["native", "torch"])
def decode_path(request, monkeypatch):
    """Runs a test on the generated CPU decoding kernel and on the generated torch code (ATTNCC_CPU_DECODE=0);
    ``ran_on(decode_path)`` then asserts that every decoding step of the test ran on that path."""
    if request.param == "torch":
        monkeypatch.setenv("ATTNCC_CPU_DECODE", "0")
    elif find_host_compiler() is None:
        pytest.skip("the CPU decoding kernel needs a C++ compiler")
    steps = []
    run = CpuDecode.__call__
    monkeypatch.setattr(CpuDecode, "__call__", lambda self, *args: steps.append(args) or run(self, *args))
    return request.param, steps


def _ran_on(decode_path):
    path, steps = decode_path
    assert bool(steps) == (path == "native"), f"the decoding steps did not run on the {path} path"


def _spec(kv_heads, **fields):
    return attncc.AttentionSpec(num_heads=HEADS, num_kv_heads=kv_heads, head_dim=D, **fields)


def _cache_reference(q, k, v, lengths, **fields):
    """Each sequence alone over its own keys (M = its length), as float64 attention; mods see its batch index."""
    outputs, lses = [], []
    score_mod, mask_mod = fields.pop("score_mod", None), fields.pop("mask_mod", None)
    for b, length in enumerate(lengths):
        if score_mod is not None:
            fields["score_mod"] = lambda s, b_, h, i, j, b=b: score_mod(s, b_ + b, h, i, j)
        if mask_mod is not None:
            fields["mask_mod"] = lambda b_, h, i, j, b=b: mask_mod(b_ + b, h, i, j)
        if length == 0:
            outputs.append(torch.zeros(q.shape[1:], dtype=torch.float64))
            lses.append(torch.full(q.shape[1:3], float("-inf"), dtype=torch.float64))
            continue
        o, lse = dense_attention(q[b : b + 1], k[b : b + 1, :, :length], v[b : b + 1, :, :length], **fields)
        outputs.append(o[0])
        lses.append(lse[0])
    return torch.stack(outputs), torch.stack(lses)


def test_split_kv_pass_puts_a_decode_schedule_on_the_region():
    attn = attncc.compile(_spec(2, causal=True), pipeline=PIPELINE)
    assert "decode = {rows <= 16, splits of >= 8 keys, 2 per worker}" in str(attn.graph)
    record = next(r for r in attn.pass_records if r.name == "split-kv")
    assert record.stats == {"regions_split": 1}
    assert "class FlashAttentionDecode" in attn.source and "def decode(q, k, v, kv_lengths, page_table)" in attn.source


@pytest.mark.parametrize("option", ["max_rows=0", "min_keys=-3", "waves=x"])
def test_split_kv_rejects_bad_options(option):
    with pytest.raises(AttnccError, match=option.split("=")[0]):
        attncc.passes.pipeline([f"split-kv{{{option}}}"])


def test_decode_splits_from_keys_heads_and_workers():
    decoding = attncc.compile(_spec(2), pipeline=[*PIPELINE[:5], "split-kv{min_keys=1024}", PIPELINE[-1]])
    splits = decoding.module.FlashAttentionDecode.splits
    assert splits(keys=131072, batch_heads=8, workers=132) == 32  # a GPU: about 2 waves of 132 SMs over 8 heads
    assert splits(keys=131072, batch_heads=512, workers=132) == 1  # batch x heads fill the device
    assert splits(keys=3000, batch_heads=1, workers=64) == 2  # no split shorter than min_keys
    assert splits(keys=100, batch_heads=1, workers=64) == 1
    assert splits(keys=16384, batch_heads=8, workers=2) == 1  # this CPU at a Llama-3-8B decode step


def test_interpreter_validates_the_split_schedule_at_decode_shapes():
    """The interpreter runs a decoding region as one split per KV tile, merged: the pass keeps the meaning."""
    spec = _spec(2, causal=True, window=(9, 0), softcap=30.0)
    attn = attncc.compile(spec, pipeline=[*PIPELINE[:-1], "tile{target=pytorch,block_m=16,block_n=8}"])
    torch.manual_seed(0)
    q, k, v = torch.randn(2, HEADS, 2, D), torch.randn(2, 2, 43, D), torch.randn(2, 2, 43, D)
    before = run_reference(attn.unoptimized_graph, q, k, v)
    after = run_reference(attn.graph, q, k, v)
    torch.testing.assert_close(after["o"], before["o"], atol=1e-12, rtol=0)
    torch.testing.assert_close(after["lse"], before["lse"], atol=1e-12, rtol=0)


CASES = {
    "dense": {},
    "causal": {"causal": True},
    "window": {"causal": True, "window": (11, 0)},
    "softcap_alibi": {"softcap": 20.0, "alibi": True, "causal": True},
    "score_mod": {"score_mod": lambda score, b, h, q_idx, kv_idx: score + 0.1 * h - 0.01 * (kv_idx % 7)},
    "mask_mod": {"mask_mod": lambda b, h, q_idx, kv_idx: (kv_idx % 5 != 2) & (kv_idx >= 20 * b)},
}


@pytest.mark.parametrize("kv_heads", [8, 2, 1])  # GQA groups 1, 4, 8
@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_shapes_match_float64_attention(case, kv_heads, decode_path):
    fields = CASES[case]
    attn = attncc.compile(_spec(kv_heads, **fields), pipeline=PIPELINE)
    torch.manual_seed(kv_heads)
    n = 2 if kv_heads > 1 else 1  # groups x N rows fit one decode tile
    q, k, v = torch.randn(3, HEADS, n, D), torch.randn(3, kv_heads, 77, D), torch.randn(3, kv_heads, 77, D)
    o, lse = attn(q, k, v, return_lse=True)
    _ran_on(decode_path)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, **fields), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision(dtype):
    attn = attncc.compile(_spec(2, causal=True), pipeline=PIPELINE)
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, h, n, D).to(dtype) for h, n in ((HEADS, 3), (2, 61), (2, 61)))
    o, lse = attn(q, k, v, return_lse=True)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, causal=True), dtype)


def test_decode_rows_fully_masked_and_parts_fully_masked(decode_path):
    """A window that hides every key from some queries, a mask that hides whole parts: o = 0, lse = -inf, no NaN."""
    fields = {"mask_mod": lambda b, h, q_idx, kv_idx: (kv_idx < 8) & (q_idx == 0)}
    attn = attncc.compile(_spec(2, **fields), pipeline=PIPELINE)
    torch.manual_seed(2)
    q, k, v = torch.randn(1, HEADS, 2, D), torch.randn(1, 2, 64, D), torch.randn(1, 2, 64, D)
    o, lse = attn(q, k, v, return_lse=True)
    _ran_on(decode_path)
    assert torch.isneginf(lse[:, :, 1]).all() and (o[:, :, 1] == 0).all() and not o.isnan().any()
    assert_attention_matches(o, lse, *dense_attention(q, k, v, **fields), torch.float32)


def _filled_static(lengths, kv_heads, max_len, generator, dtype=torch.float32):
    cache = attncc.StaticKVCache(len(lengths), kv_heads, max_len, D, dtype=dtype)
    for b, length in enumerate(lengths):
        if length:
            cache.append(torch.randn(1, kv_heads, length, D, generator=generator),
                         torch.randn(1, kv_heads, length, D, generator=generator), sequences=b)  # fmt: skip
    return cache


@pytest.mark.parametrize("case", ["causal", "window", "mask_mod"])
def test_static_cache_sequences_of_different_lengths(case, decode_path):
    fields = CASES[case]
    attn = attncc.compile(_spec(2, **fields), pipeline=PIPELINE)
    generator = torch.Generator().manual_seed(3)
    lengths = [37, 5, 0, 64]
    cache = _filled_static(lengths, 2, 64, generator)
    assert cache.lengths.tolist() == lengths and len(cache) == 64
    q = torch.randn(4, HEADS, 2, D, generator=generator)
    o, lse = attn.decode(q, cache, return_lse=True)
    _ran_on(decode_path)
    assert_attention_matches(o, lse, *_cache_reference(q, cache.k, cache.v, lengths, **fields), torch.float32)


def test_static_cache_appends_after_each_sequence():
    cache = attncc.StaticKVCache(2, 1, 8, D)
    first, second = torch.randn(2, 1, 3, D), torch.randn(1, 1, 2, D)
    cache.append(first, first)
    cache.append(second, second, sequences=[1])
    assert cache.lengths.tolist() == [3, 5]
    torch.testing.assert_close(cache.k[1, :, 3:5], second[0])
    torch.testing.assert_close(cache.k[:, :, :3], first)
    with pytest.raises(AttnccError, match="overflows max_len=8"):
        cache.append(torch.randn(2, 1, 4, D), torch.randn(2, 1, 4, D))
    cache.reset([1])
    assert cache.lengths.tolist() == [3, 0]


@pytest.mark.parametrize("page_size", [1, 5, 64])  # smaller than a split, not dividing the lengths, larger
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_paged_cache_matches_float64_attention(page_size, kv_heads, decode_path):
    attn = attncc.compile(_spec(kv_heads, causal=True, window=(40, 0)), pipeline=PIPELINE)
    generator = torch.Generator().manual_seed(page_size)
    lengths = [53, 7, 90]
    cache = attncc.PagedKVCache(64 if page_size > 1 else 200, page_size, 3, kv_heads, D)
    for b in (2, 0, 1):  # interleaved appends scatter each sequence's pages
        for chunk in (lengths[b] // 2, lengths[b] - lengths[b] // 2):
            k, v = (torch.randn(1, kv_heads, chunk, D, generator=generator) for _ in range(2))
            cache.append(k, v, sequences=b)
    q = torch.randn(3, HEADS, 1, D, generator=generator)
    o, lse = attn.decode(q, cache, return_lse=True)
    _ran_on(decode_path)
    k, v = cache.gather()
    reference = _cache_reference(q, k, v, lengths, causal=True, window=(40, 0))
    assert_attention_matches(o, lse, *reference, torch.float32)


def _shuffled_paged(lengths, kv_heads, page_size, generator, dtype=torch.float32):
    """A paged cache whose page table is a random permutation: no sequence's pages are consecutive."""
    pages = [-(-length // page_size) for length in lengths]
    cache = attncc.PagedKVCache(sum(pages) + 1, page_size, len(lengths), kv_heads, D, dtype=dtype)
    order = torch.randperm(sum(pages), generator=generator).tolist()
    for b, count in enumerate(pages):
        cache.reserve(b, lengths[b])
        cache.page_table[b, :count] = torch.tensor(order[sum(pages[:b]) : sum(pages[: b + 1])], dtype=torch.int32)
        cache.append(*(torch.randn(1, kv_heads, lengths[b], D, generator=generator) for _ in range(2)), sequences=b)
    return cache


@pytest.mark.parametrize("page_size, block_pages", [(3, 4), (16, 1), (5, 64)])  # blocks of many pages, of one
@pytest.mark.parametrize("kv_heads", [8, 2, 1])  # GQA groups 1, 4, 8
def test_paged_cache_read_in_bounded_blocks_of_shuffled_pages(
    page_size, block_pages, kv_heads, monkeypatch, decode_path
):
    """Pages read through a shuffled table a few at a time (BLOCK_BYTES), lengths no multiple of a page or a
    block, a window that hides whole blocks from some rows: float64 attention over each sequence's keys."""
    fields = {"causal": True, "window": (30, 0)}
    attn = attncc.compile(_spec(kv_heads, **fields), pipeline=PIPELINE)
    decoding = attn.module.FlashAttentionDecode
    monkeypatch.setattr(decoding, "BLOCK_BYTES", block_pages * page_size * 3 * kv_heads * 2 * D * 4)
    generator = torch.Generator().manual_seed(page_size + kv_heads)
    lengths = [45, 70, 38]  # the window's first visible key, 7, starts no page
    cache = _shuffled_paged(lengths, kv_heads, page_size, generator)
    step = block_pages * page_size  # whole pages from the first visited one
    for reuse in (False, True):
        blocks = [(k.shape, k.stride(), c0) for k, _, c0 in decoding.key_blocks(
            cache.k_pages, cache.v_pages, cache.page_table, 4, 70, None, 1, None, reuse)]  # fmt: skip
        assert [c0 for _, _, c0 in blocks] == [4, *range(4 - 4 % page_size + step, 70, step)]
        assert all(shape[2] <= step and stride[-2:] == (D, 1) for shape, stride, _ in blocks)  # keys in a row
    q = torch.randn(3, HEADS, 1, D, generator=generator)
    o, lse = attn.decode(q, cache, return_lse=True)
    _ran_on(decode_path)
    k, v = cache.gather()
    assert_attention_matches(o, lse, *_cache_reference(q, k, v, lengths, **fields), torch.float32)


@pytest.mark.parametrize("layout", ["reserved at once", "grown in turn"])
def test_paged_cache_laid_out_by_the_allocator(layout, monkeypatch, decode_path):
    """Sequences reserved at once (consecutive pages) or grown a page at a time in turn (page i of sequence b at
    3 i + b, as the bench lays them out), read in blocks of three pages."""
    attn = attncc.compile(_spec(2, causal=True), pipeline=PIPELINE)
    monkeypatch.setattr(attn.module.FlashAttentionDecode, "BLOCK_BYTES", 3 * 4 * 3 * 2 * 2 * D * 4)
    generator = torch.Generator().manual_seed(14)
    k, v = torch.randn(3, 2, 40, D, generator=generator), torch.randn(3, 2, 40, D, generator=generator)
    cache = attncc.PagedKVCache(30, 4, 3, 2, D)
    for page in range(10):
        for b in range(3):
            cache.reserve(b, 40 if layout == "reserved at once" else 4 * (page + 1))
    cache.append(k, v)
    pages = torch.arange(30).view(3, 10) if layout == "reserved at once" else torch.arange(30).view(10, 3).T
    assert cache.page_table[:, :10].long().equal(pages)  # max_pages defaults to every page
    q = torch.randn(3, HEADS, 1, D, generator=generator)
    o, lse = attn.decode(q, cache, return_lse=True)
    _ran_on(decode_path)
    assert_attention_matches(o, lse, *_cache_reference(q, k, v, [40, 40, 40], causal=True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_caches_convert_block_by_block(dtype, monkeypatch):
    attn = attncc.compile(_spec(2, causal=True), pipeline=PIPELINE)
    monkeypatch.setattr(attn.module.FlashAttentionDecode, "BLOCK_BYTES", 20 * 2 * 2 * 2 * D * 4)
    generator = torch.Generator().manual_seed(11)
    lengths = [61, 17]
    static = _filled_static(lengths, 2, 64, generator, dtype)
    paged = _shuffled_paged(lengths, 2, 7, generator, dtype)
    q = torch.randn(2, HEADS, 2, D, generator=generator).to(dtype)
    for cache, (k, v) in ((static, (static.k, static.v)), (paged, paged.gather())):
        o, lse = attn.decode(q, cache, return_lse=True)
        assert o.dtype == dtype
        assert_attention_matches(o, lse, *_cache_reference(q, k, v, lengths, causal=True), dtype)


ROPES = {
    "rotate-half-partial-linear": attncc.RoPE(rotary_dim=10, scaling={"rope_type": "linear", "factor": 2.0}),
    "interleaved-llama3": attncc.RoPE(theta=500000.0, interleaved=True, scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
}  # fmt: skip


def _rope_reference(q, k, v, lengths, rope, **fields):
    """Each sequence alone: queries at length - N + i and keys at j turned by the float64 reference rotation."""
    n = q.shape[2]
    turned_q, turned_k = [], []
    for b, length in enumerate(lengths):
        turned_q.append(rotate(q[b : b + 1].double(), rope, q_idx + length - n, "query", (n, length), {}))
        turned_k.append(rotate(k[b : b + 1].double(), rope, kv_idx, "key", (n, k.shape[2]), {}))
    return _cache_reference(torch.cat(turned_q), torch.cat(turned_k), v.double(), lengths, **fields)


@pytest.mark.parametrize("cache_kind", ["static", "paged"])
@pytest.mark.parametrize("kv_heads", [8, 2, 1])  # GQA groups 1, 4, 8
@pytest.mark.parametrize("rope_case", sorted(ROPES))
def test_decode_with_rope_turns_queries_and_the_keys_it_reads(rope_case, kv_heads, cache_kind, monkeypatch):
    """RoPE inside the decoding path: cached keys stay unturned (the spec's meaning: key j at position j) and
    are turned block by block as they are read; queries sit at each sequence's last positions."""
    rope = ROPES[rope_case]
    fields = {"causal": True, "window": (40, 0), "softcap": 20.0}
    attn = attncc.compile(_spec(kv_heads, rope=rope, **fields), pipeline=PIPELINE)
    assert "decode = {rows <= 16" in str(attn.graph) and "rope = {" in str(attn.graph)
    monkeypatch.setattr(attn.module.FlashAttentionDecode, "BLOCK_BYTES", 3 * 6 * kv_heads * 2 * D * 4)
    generator = torch.Generator().manual_seed(kv_heads)
    lengths = [53, 0, 90]
    if cache_kind == "static":
        cache = _filled_static(lengths, kv_heads, 90, generator)
        k, v = cache.k, cache.v
    else:
        cache = _shuffled_paged(lengths, kv_heads, 6, generator)
        k, v = cache.gather()
    n = 2 if kv_heads > 1 else 1
    q = torch.randn(3, HEADS, n, D, generator=generator)
    o, lse = attn.decode(q, cache, return_lse=True)
    assert_attention_matches(o, lse, *_rope_reference(q, k, v, lengths, rope, **fields), torch.float32)


def test_decode_with_rope_at_call_time_positions_differentiates():
    """attn(q, k, v, q_positions=...) at a decode shape: the decoding path turns q at the given positions;
    o, lse and the gradients of q, k, v match float64 autograd through the reference."""
    attn = attncc.compile(_spec(2, rope=ROPES["rotate-half-partial-linear"], causal=True), pipeline=PIPELINE)
    generator = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, h, n, D, generator=generator) for h, n in ((HEADS, 3), (2, 41), (2, 41)))
    positions = torch.randint(0, 500, (2, 3), generator=generator)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o, lse = attn(*leaves, return_lse=True, q_positions=positions)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    reference = reference_outputs(attn.with_positions(("q",)), *leaves64, q_positions=positions)
    assert_attention_matches(o, lse, reference["o"], reference["lse"], torch.float32)
    weights = torch.randn(o.shape, generator=generator)
    grads = torch.autograd.grad((o * weights).sum(), leaves)
    expected = torch.autograd.grad((reference["o"] * weights.double()).sum(), leaves64)
    for grad, reference_grad in zip(grads, expected):
        torch.testing.assert_close(grad.double(), reference_grad, atol=2e-5, rtol=2e-5)


def test_paged_cache_allocator_reserves_erases_and_reuses_pages():
    cache = attncc.PagedKVCache(num_pages=4, page_size=4, batch_size=2, num_kv_heads=1, head_dim=D, max_pages=3)
    cache.reserve(0, 9)
    assert cache.free_pages == 1 and cache.page_table[0].tolist() == [0, 1, 2]
    with pytest.raises(AttnccError, match="1 of 4 are free"):
        cache.reserve(1, 5)
    with pytest.raises(AttnccError, match="max_pages=3"):
        cache.reserve(1, 13)
    cache.erase(0)
    assert cache.free_pages == 4 and cache.lengths.tolist() == [0, 0]
    cache.append(torch.ones(1, 1, 6, D), torch.ones(1, 1, 6, D), sequences=1)
    assert cache.lengths.tolist() == [0, 6] and cache.page_table[1, :2].tolist() == [0, 1]


@pytest.mark.parametrize("paged", [False, True])
def test_decode_gradients_match_float64_attention(paged):
    attn = attncc.compile(_spec(2, causal=True, softcap=25.0), pipeline=PIPELINE)
    generator = torch.Generator().manual_seed(5)
    lengths = [29, 50]
    if paged:
        cache = attncc.PagedKVCache(40, 3, 2, 2, D)
        for b, length in enumerate(lengths):
            cache.append(*(torch.randn(1, 2, length, D, generator=generator) for _ in range(2)), sequences=b)
        leaves = (cache.k_pages.requires_grad_(), cache.v_pages.requires_grad_())
    else:
        cache = _filled_static(lengths, 2, 50, generator)
        leaves = (cache.k.requires_grad_(), cache.v.requires_grad_())
    q = torch.randn(2, HEADS, 2, D, generator=generator, requires_grad=True)
    weights = torch.randn(2, HEADS, 2, D, generator=generator)
    o = attn.decode(q, cache)
    grads = torch.autograd.grad((o * weights).sum(), (q, *leaves))

    q64 = q.detach().double().requires_grad_()
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    if paged:
        positions = torch.arange(50)
        pages = cache.page_table[:, positions // 3].long()
        k, v = (t[pages, positions % 3].permute(0, 2, 1, 3) for t in leaves64)
    else:
        k, v = leaves64
    o_ref, _ = _cache_reference(q64, k, v, lengths, causal=True, softcap=25.0)
    expected = torch.autograd.grad((o_ref * weights.double()).sum(), (q64, *leaves64))
    for grad, reference in zip(grads, expected):
        torch.testing.assert_close(grad.double(), reference, atol=2e-5, rtol=2e-5)


def test_decode_with_captured_tensors_and_logical_positions():
    bias = torch.randn(128)
    fields = {"score_mod": lambda score, b, h, q_idx, kv_idx: score + bias[kv_idx]}
    attn = attncc.compile(_spec(2, **fields), pipeline=PIPELINE)
    generator = torch.Generator().manual_seed(6)
    lengths = [70, 33]
    cache = attncc.PagedKVCache(50, 4, 2, 2, D)
    for b, length in enumerate(lengths):
        cache.append(*(torch.randn(1, 2, length, D, generator=generator) for _ in range(2)), sequences=b)
    q = torch.randn(2, HEADS, 1, D, generator=generator)
    fresh = torch.randn(128)
    o, lse = attn.decode(q, cache, return_lse=True, bias=fresh)
    k, v = cache.gather()
    reference = _cache_reference(q, k, v, lengths, score_mod=lambda s, b, h, i, j: s + fresh.double()[j])
    assert_attention_matches(o, lse, *reference, torch.float32)


@pytest.mark.skipif(find_host_compiler() is None, reason="the CPU decoding kernel needs a C++ compiler")
@pytest.mark.parametrize("kv_heads, n", [(2, 2), (2, 5), (1, 1), (6, 3)])  # 6, 15, 6 and 3 packed rows
def test_cpu_decode_kernel_rows_splits_threads_and_value_dim(kv_heads, n, decode_path):
    """Packed rows in chunks of four and a remainder, keys split over two threads into many parts (min_keys=8),
    a V head dim other than q's, a sliding window and a score mod reading h and kv_idx, cache lengths no multiple
    of a block: float64 attention."""
    fields = {
        "causal": True,
        "window": (300, 0),
        "score_mod": lambda score, b, h, q_idx, kv_idx: score - 0.05 * h * (kv_idx % 3),
    }
    spec = attncc.AttentionSpec(num_heads=6, num_kv_heads=kv_heads, head_dim=24, v_head_dim=40, **fields)
    attn = attncc.compile(spec, pipeline=PIPELINE)
    generator = torch.Generator().manual_seed(kv_heads * 10 + n)
    q = torch.randn(2, 6, n, 24, generator=generator)
    k, v = (
        torch.randn(2, kv_heads, 1001, 24, generator=generator),
        torch.randn(2, kv_heads, 1001, 40, generator=generator),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        o, lse = attn(q, k, v, return_lse=True)
    finally:
        torch.set_num_threads(threads)
    _ran_on(decode_path)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, **fields), torch.float32)


def test_decode_score_with_a_sum_under_a_division(decode_path):
    """Finding P: the C++ printer wrote 1 / (1 + exp(-x)) (a sigmoid of q_idx, in the score's factor) as
    ``1.0f / 1 + expf(-x)``, and the CPU decoding kernel gave wrong rows."""

    def sigmoid_mod(score, b, h, q_idx, kv_idx):
        return (score + torch.sigmoid(q_idx * 0.05)) * torch.sigmoid(q_idx * 0.05)

    spec = attncc.AttentionSpec(num_heads=3, num_kv_heads=1, head_dim=D, scale=0.1, score_mod=sigmoid_mod)
    attn = attncc.compile(spec, pipeline=PIPELINE)
    generator = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, h, n, D, generator=generator) for h, n in ((3, 2), (1, 21), (1, 21)))
    o, lse = attn(q, k, v, return_lse=True)
    _ran_on(decode_path)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, scale=0.1, score_mod=sigmoid_mod), torch.float32)


@pytest.mark.skipif(find_host_compiler() is None, reason="the CPU decoding kernel needs a C++ compiler")
def test_cpu_decode_kernel_takes_only_float32_steps_without_gradients(monkeypatch):
    attn = attncc.compile(_spec(2, causal=True), pipeline=PIPELINE)
    native = attn.module.FlashAttentionDecode.native
    generator = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(1, HEADS, 1, D, generator=generator), torch.randn(1, 2, 50, D), torch.randn(1, 2, 50, D)
    assert native.takes(q, k, v, None)
    assert not native.takes(q.half(), k.half(), v.half(), None)
    assert not native.takes(q.requires_grad_(), k, v, None)
    with torch.no_grad():
        assert native.takes(q, k, v, None)
    assert not native.takes(torch.randn(1, HEADS, 5, D), k, v, None)  # 4 x 5 rows > max_rows: the torch path
    assert not native.takes(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, None)
    monkeypatch.setenv("ATTNCC_CPU_DECODE", "0")
    with torch.no_grad():
        assert not native.takes(q, k, v, None)
    for careless in ("false", "off", "", " 1"):  # anything but 0 and 1 is a mistake, not a silent "on"
        monkeypatch.setenv("ATTNCC_CPU_DECODE", careless)
        with pytest.raises(attncc.InputError, match=r"ATTNCC_CPU_DECODE=.* is invalid; allowed: 1 .* or 0"):
            attn(q.detach(), k, v)


def test_cpu_decode_kernel_is_left_to_the_torch_path_for_captured_tensors_and_rope():
    bias = torch.randn(64)
    with_bias = attncc.compile(_spec(2, score_mod=lambda score, b, h, q_idx, kv_idx: score + bias[kv_idx]),
                               pipeline=PIPELINE)  # fmt: skip
    with_rope = attncc.compile(_spec(2, causal=True, rope=attncc.RoPE()), pipeline=PIPELINE)
    assert with_bias.module.FlashAttentionDecode.native is None
    assert with_rope.module.FlashAttentionDecode.native is None


@pytest.mark.skipif(find_host_compiler() is None, reason="the CPU decoding kernel needs a C++ compiler")
def test_cpu_decode_kernel_refuses_a_page_table_naming_no_page():
    attn = attncc.compile(_spec(2, causal=True), pipeline=PIPELINE)
    cache = attncc.PagedKVCache(8, 4, 1, 2, D)
    cache.append(torch.randn(1, 2, 10, D), torch.randn(1, 2, 10, D))
    table = cache.page_table.clone()
    for bad in (8, -1, 2**31 - 1):
        table[0, 1] = bad
        with pytest.raises(attncc.InputError, match=r"page_table names a page outside \[0, 8\)"):
            attn.module.decode(torch.randn(1, HEADS, 1, D), cache.k_pages, cache.v_pages, cache.lengths, table)


def test_decode_rejects_bad_input():
    attn = attncc.compile(_spec(2, causal=True), pipeline=PIPELINE)
    cache = attncc.StaticKVCache(2, 2, 16, D)
    with pytest.raises(attncc.InputError, match="StaticKVCache or attncc.PagedKVCache"):
        attn.decode(torch.randn(2, HEADS, 1, D), (cache.k, cache.v))
    with pytest.raises(attncc.InputError, match="batch size 3; the call reads 2 sequences"):
        attn.decode(torch.randn(3, HEADS, 1, D), cache)
    with pytest.raises(attncc.InputError, match="num_kv_heads is 2"):
        attn.decode(torch.randn(2, HEADS, 1, D), attncc.StaticKVCache(2, 4, 16, D))
    with pytest.raises(attncc.InputError, match="head_dim"):
        attn.decode(torch.randn(2, HEADS, 1, 8), cache)
    with pytest.raises(attncc.InputError, match=r"sequences=\[5\] is invalid"):
        cache.append(torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D), sequences=[5])
    with pytest.raises(attncc.InputError, match="names a sequence twice"):
        cache.append(torch.randn(2, 2, 1, D), torch.randn(2, 2, 1, D), sequences=[0, 0])
    with pytest.raises(attncc.InputError, match=r"k has shape \(1, 3, 1, 16\)"):
        cache.append(torch.randn(1, 3, 1, D), torch.randn(1, 3, 1, D), sequences=[0])
    with pytest.raises(attncc.InputError, match="page_size=0 is invalid"):
        attncc.PagedKVCache(4, 0, 1, 1, D)
    with pytest.raises(attncc.InputError, match="dtype=torch.int32 is invalid"):
        attncc.StaticKVCache(1, 1, 4, D, dtype=torch.int32)


def test_decode_needs_a_backend_with_a_decoding_path():
    attn = attncc.compile(_spec(2, causal=True), pipeline=[p for p in PIPELINE if not p.startswith("split-kv")])
    with pytest.raises(attncc.BackendError, match="no decoding path"):
        attn.decode(torch.randn(1, HEADS, 1, D), attncc.StaticKVCache(1, 2, 4, D))


def test_cache_prompt_of_many_rows_runs_in_row_tiles():
    """A prompt appended to a cache: groups x N rows beyond a decode step run in query tiles of BLOCK_M rows."""
    pipeline = [*PIPELINE[:-1], "tile{target=pytorch,block_m=16}"]
    attn = attncc.compile(_spec(2, causal=True, window=(6, 0)), pipeline=pipeline)
    assert attn.module.FlashAttentionDecode.BLOCK_M == 16
    generator = torch.Generator().manual_seed(7)
    lengths = [23, 40]
    cache = _filled_static(lengths, 2, 40, generator)
    q = torch.randn(2, HEADS, 11, D, generator=generator)  # 44 packed rows: 3 tiles
    o, lse = attn.decode(q, cache, return_lse=True)
    reference = _cache_reference(q, cache.k, cache.v, lengths, causal=True, window=(6, 0))
    assert_attention_matches(o, lse, *reference, torch.float32)


@pytest.mark.parametrize("paged", [False, True])
def test_nn_attention_decodes_ragged_batches_like_each_sequence_alone(paged):
    """Prompts of different lengths prefilled one by one, then batched steps: each row's output equals
    the layer run without a cache on that sequence's whole input (RoPE at each sequence's own positions)."""
    torch.manual_seed(8)
    layer = attncc.nn.Attention(32, 4, num_kv_heads=2, rope=True, window=(9, 0))
    prompts = [torch.randn(1, length, 32) for length in (6, 13, 1)]
    steps = [torch.randn(3, 1, 32) for _ in range(3)]
    if paged:
        cache = attncc.PagedKVCache(num_pages=30, page_size=4, batch_size=3, num_kv_heads=2, head_dim=8)
    else:
        cache = attncc.StaticKVCache(3, 2, 16, 8)
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            layer(prompt, cache, sequences=[b])
        outputs = [layer(x, cache) for x in steps]
        for b, prompt in enumerate(prompts):
            whole = torch.cat([prompt, *(x[b : b + 1] for x in steps)], dim=1)
            expected = layer(whole)[0, -len(steps) :]
            torch.testing.assert_close(torch.cat([o[b] for o in outputs]), expected, atol=2e-6, rtol=2e-6)
    assert cache.lengths.tolist() == [9, 16, 4]


def test_serve_decode_example_gives_the_tokens_of_decoding_without_a_cache():
    spec = importlib.util.spec_from_file_location("serve_decode", EXAMPLES / "serve_decode.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    model = example.TinyLlama(dim=32, heads=4, kv_heads=2, layers=1, hidden=64).eval()
    prompts = [torch.randint(0, example.VOCAB, (length,)) for length in (5, 11, 2)]
    with torch.no_grad():
        generated, steps = example.serve(model, prompts, slots=2, new_tokens=4, page_size=3)
        for request, prompt in enumerate(prompts):
            tokens = torch.tensor([prompt.tolist() + generated[request][:-1]])
            assert model(tokens)[0, len(prompt) - 1 :].argmax(-1).tolist() == generated[request]
    assert steps == 6  # two requests for 3 steps, then the third for 3


TRITON_PIPELINE = [*PIPELINE[:-1], "tile{target=triton,block_m=16,block_n=16}"]


@requires_triton
@pytest.mark.parametrize(
    "paged, fields, dtype",
    [
        (False, {"causal": True, "window": (40, 0), "softcap": 30.0}, torch.float32),
        (True, {"mask_mod": lambda b, h, q_idx, kv_idx: (kv_idx % 5 != 2) & (h != 3)}, torch.float32),
        (True, {"causal": True}, torch.bfloat16),
        (True, {"causal": True, "rope": ROPES["rotate-half-partial-linear"]}, torch.float32),
        (False, {"window": (50, 0), "rope": ROPES["interleaved-llama3"]}, torch.float32),
    ],
)
def test_triton_decode_kernel_matches_float64_attention(paged, fields, dtype):
    """One (sequence, KV head) pair: the keys split across programs (min 8 keys a split), merged."""
    attn = attncc.compile(_spec(1, **fields), backend="triton", pipeline=TRITON_PIPELINE)
    assert "def _attn_decode(" in attn.source
    generator = torch.Generator().manual_seed(9)
    lengths = [45, 70]
    if paged:
        cache = attncc.PagedKVCache(40, 3, 2, 1, D, dtype=dtype)
        for b, length in enumerate(lengths):
            cache.append(*(torch.randn(1, 1, length, D, generator=generator) for _ in range(2)), sequences=b)
        k, v = cache.gather()
    else:
        cache = _filled_static(lengths, 1, 70, generator, dtype)
        k, v = cache.k, cache.v
    assert attn.module.FlashAttentionDecode.splits(70, 2, 2) == 2
    q = torch.randn(2, HEADS, 1, D, generator=generator).to(dtype)
    o, lse = attn.decode(q, cache, return_lse=True)
    fields = dict(fields)
    rope = fields.pop("rope", None)
    reference = (
        _rope_reference(q, k, v, lengths, rope, **fields) if rope else _cache_reference(q, k, v, lengths, **fields)
    )
    assert_attention_matches(o, lse, *reference, dtype)
    with pytest.raises(attncc.BackendError, match="decoding kernel computes no gradients"):
        attn.decode(q.requires_grad_(), cache)


@requires_triton
def test_triton_split_merge_kernel_with_empty_and_fully_masked_splits():
    """Four splits of 32 keys over lengths 70 and 21: the last split of one sequence and three of the other
    hold no key, and a mask hides every key of some splits' rows; _merge_splits combines them in a kernel."""
    fields = {"mask_mod": lambda b, h, q_idx, kv_idx: ((kv_idx // 32) % 2 == 0) | (h % 2 == 0)}
    pipeline = [*PIPELINE[:5], "split-kv{min_keys=8,waves=4}", TRITON_PIPELINE[-1]]
    attn = attncc.compile(_spec(1, **fields), backend="triton", pipeline=pipeline)
    assert "def _merge_splits(" in attn.source and attn.module.FlashAttentionDecode.splits(70, 2, 2) == 4
    generator = torch.Generator().manual_seed(13)
    lengths = [70, 21]
    cache = _filled_static(lengths, 1, 70, generator)
    q = torch.randn(2, HEADS, 1, D, generator=generator)
    o, lse = attn.decode(q, cache, return_lse=True)
    assert not o.isnan().any()
    assert_attention_matches(o, lse, *_cache_reference(q, cache.k, cache.v, lengths, **fields), torch.float32)
