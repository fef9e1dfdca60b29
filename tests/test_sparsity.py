"""The sparsity pass: closed-form bounds, sound tile classification, tile tables, named patterns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc
from attncc import masks
from attncc.frontend.lower import mask_predicate
from attncc.frontend.trace import trace_mask_mod
from attncc.passes.sparsity import needed_tiles, schedule_for, tile_map
from tests.reference import assert_attention_matches, dense_attention
from tests.test_numerics import random_qkv

SPARSE_TILES = ["canonicalize", "fold-scale", "group-kv", "online-softmax", "sparsity",
                "tile{target=pytorch,block_m=8,block_n=8}"]  # fmt: skip


def schedule_text(**fields) -> str:
    return str(schedule_for(mask_predicate(attncc.AttentionSpec(num_heads=1, head_dim=8, **fields), None)))


def test_closed_form_bounds_for_causal_alignments_and_windows():
    assert schedule_text(causal=True) == "{visit [0, Min(M, M - N + q_last + 1)), full [0, Min(M, M - N + q_first + 1))}"
    assert schedule_text(causal="top_left") == "{visit [0, Min(M, q_last + 1)), full [0, Min(M, q_first + 1))}"
    assert schedule_text(causal=True, window=(256, 0)) == (
        "{visit [Max(0, M - N + q_first - 256), Min(M, M - N + q_last + 1)), "
        "full [Max(0, M - N + q_last - 256), Min(M, M - N + q_first + 1))}"
    )


def test_closed_form_bounds_for_prefix_chunked_and_padding():
    prefix = schedule_for(trace_mask_mod(masks.prefix_lm(64)).expr)
    assert str(prefix) == "{visit [0, Min(M, Max(63, q_last) + 1)), full [0, Min(M, Max(63, q_first) + 1))}"
    chunk = schedule_for(trace_mask_mod(masks.chunked(128, causal=False)).expr)
    assert str(chunk) == (
        "{visit [Max(0, 128*FloorDiv(q_first, 128)), Min(M, 128*FloorDiv(q_last, 128) + 128)), "
        "full [Max(0, 128*FloorDiv(q_last, 128)), Min(M, 128*FloorDiv(q_first, 128) + 128))}"
    )
    lengths = torch.tensor([5, 9])
    padding = schedule_for(trace_mask_mod(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b]).expr)
    assert str(padding) == "{visit [0, Min(M, lengths[b])), full [0, Min(M, lengths[b]))}"
    window = schedule_for(trace_mask_mod(lambda b, h, q_idx, kv_idx: abs(q_idx - kv_idx) <= 5).expr)
    assert str(window) == "{visit [Max(0, q_first - 5), Min(M, q_last + 6)), full [Max(0, q_last - 5), Min(M, q_first + 6))}"


def test_data_dependent_masks_get_a_tile_table():
    schedule = schedule_for(trace_mask_mod(masks.document([3, 4])).expr)
    assert schedule.table and str(schedule.residual) == "Eq(doc[q_idx], doc[kv_idx])"
    mixed = schedule_for(trace_mask_mod(masks.fixed(16, 2)).expr)
    assert mixed.table and str(mixed.kv_hi) == "Min(M, q_last + 1)"  # the causal part still bounds the loop


def test_pass_records_and_prints_the_schedule():
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, mask_mod=masks.document([5, 7])))
    record = next(r for r in attn.pass_records if r.name == "sparsity")
    assert record.stats == {"tile_tables": 1}
    assert "schedule = {visit [0, M), full [0, M), residual Eq(doc[q_idx], doc[kv_idx]), table}" in str(attn.graph)


# Linear terms a predicate is built from: (template, callable) with integer parameters filled by hypothesis.
LINEAR_TERMS = {
    "causal": lambda a, c: lambda q, kv: kv <= q + c,
    "lower": lambda a, c: lambda q, kv: kv >= q - a,
    "upper_const": lambda a, c: lambda q, kv: kv < a + c,
    "lower_const": lambda a, c: lambda q, kv: kv >= c,
    "abs_window": lambda a, c: lambda q, kv: abs(q - kv) <= a,
    "chunk": lambda a, c: lambda q, kv: q // (a + 1) == kv // (a + 1),
    "block_causal": lambda a, c: lambda q, kv: kv // (a + 1) <= q // (a + 1),
    "scaled": lambda a, c: lambda q, kv: 2 * kv <= q + c,
    "prefix": lambda a, c: lambda q, kv: (kv < a) | (kv <= q + c),
    "reversed": lambda a, c: lambda q, kv: q + kv >= a + c,
    "either_side": lambda a, c: lambda q, kv: (kv < q - a) | (kv > c),  # open on both sides: may leave a gap
}

term = st.tuples(st.sampled_from(sorted(LINEAR_TERMS)), st.integers(0, 40), st.integers(-20, 20))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(terms=st.lists(term, min_size=1, max_size=3), n=st.integers(1, 70), m=st.integers(1, 70),
       block_m=st.integers(1, 24), block_n=st.integers(1, 24))  # fmt: skip
def test_classification_of_random_linear_predicates_is_sound(terms, n, m, block_m, block_n):
    parts = [LINEAR_TERMS[name](a, c) for name, a, c in terms]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = parts[0](q_idx, kv_idx)
        for part in parts[1:]:
            keep = keep & part(q_idx, kv_idx)
        return keep

    mask = trace_mask_mod(mask_mod).expr
    schedule = schedule_for(mask)
    if all(name != "either_side" for name, _, _ in terms):
        assert not schedule.table, f"{mask} should have closed-form bounds"
    scheduled = tile_map(mask, schedule, n, m, block_m, block_n)
    needed = needed_tiles(mask, n, m, block_m, block_n)
    assert not bool(((needed > 0) & (scheduled == 0)).any()), "a tile with a visible element was skipped"
    assert not bool(((scheduled == 2) & (needed != 2)).any()), "a tile called full has a masked element"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(3, 40), block=st.integers(2, 9), kind=st.sampled_from(
    ["documents", "random_table", "padding"]))  # fmt: skip
def test_random_data_dependent_masks_match_the_reference(seed, n, block, kind):
    generator = torch.Generator().manual_seed(seed)
    if kind == "documents":
        doc = torch.sort(torch.randint(0, 4, (n,), generator=generator)).values

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
    elif kind == "random_table":
        table = torch.rand(n, n, generator=generator) < 0.3

        def mask_mod(b, h, q_idx, kv_idx):
            return table[q_idx, kv_idx] | (kv_idx == q_idx // 2)
    else:
        lengths = torch.randint(0, n + 1, (2,), generator=generator)

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]

    pipeline = [*SPARSE_TILES[:-1], f"tile{{target=pytorch,block_m={block},block_n={block + 1}}}"]
    q, k, v = random_qkv(2, 2, 1, n, n, 8, seed=seed)
    spec = attncc.AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=8, mask_mod=mask_mod)
    o, lse = attncc.compile(spec, pipeline=pipeline)(q, k, v, return_lse=True)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, mask_mod=mask_mod), torch.float32)


PATTERNS = {
    "sliding_window": masks.sliding_window(5, 2),
    "prefix_lm": masks.prefix_lm(7),
    "chunked": masks.chunked(6),
    "document": masks.document(lengths=[9, 14, 10]),
    "document_offsets": masks.document(offsets=[0, 20, 33], causal=True),
    "longformer": masks.longformer(3, [0, 17], seq_len=33),
    "bigbird": masks.bigbird(4, seq_len=33, random_blocks=2, seed=3),
    "fixed": masks.fixed(8, 2),
    "strided": masks.strided(5),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_named_patterns_match_the_reference(name):
    mask_mod = PATTERNS[name]
    spec = attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, mask_mod=mask_mod)
    q, k, v = random_qkv(1, 4, 2, 33, 33, 16, seed=5)
    o, lse = attncc.compile(spec, pipeline=SPARSE_TILES)(q, k, v, return_lse=True)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, mask_mod=mask_mod), torch.float32)


def test_sliding_window_visits_exactly_the_needed_tiles():
    mask = mask_predicate(attncc.AttentionSpec(num_heads=1, head_dim=8, causal=True, window=(16, 0)), None)
    scheduled = tile_map(mask, schedule_for(mask), 128, 128, 16, 16)
    needed = needed_tiles(mask, 128, 128, 16, 16)
    assert int((scheduled > 0).sum()) == int((needed > 0).sum()) == 8 + 7  # the diagonal and the tile before it
    assert torch.equal(scheduled, needed)


def test_tile_table_is_cached_until_the_captured_tensor_changes():
    doc = torch.tensor([0] * 12 + [1] * 12)
    spec = attncc.AttentionSpec(num_heads=2, head_dim=8, mask_mod=lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx])
    attn = attncc.compile(spec, pipeline=SPARSE_TILES)
    region = attn.module.FlashAttention
    q, k, v = random_qkv(1, 2, 2, 24, 24, 8)
    attn(q, k, v)
    (table,) = region.tables.values()
    attn(q, k, v)
    (cached,) = region.tables.values()
    assert cached is table  # unchanged values: the table is not rebuilt
    doc[:6] = 1  # in place: the values differ from the table's copy, so the table is rebuilt
    o = attn(q, k, v)
    (rebuilt,) = region.tables.values()
    assert rebuilt is not table and torch.equal(rebuilt[1][0], doc)
    torch.testing.assert_close(o.double(), dense_attention(q, k, v, mask_mod=lambda b, h, i, j: doc[i] == doc[j])[0],
                               atol=2e-6, rtol=2e-6)  # fmt: skip


def test_invalid_pattern_arguments():
    with pytest.raises(attncc.SpecError, match="document\\(\\) takes lengths or offsets, exactly one of them"):
        masks.document()
    with pytest.raises(attncc.SpecError, match="global_tokens=\\[40\\] is invalid: positions in 0..31"):
        masks.longformer(4, [40], seq_len=32)
    with pytest.raises(attncc.SpecError, match="summary=9 is invalid: at most block=8"):
        masks.fixed(8, 9)
    with pytest.raises(attncc.SpecError, match="chunk_size=0 is invalid: a positive integer is allowed"):
        masks.chunked(0)


def test_tile_report_and_png(tmp_path):
    from attncc.tiles import tile_report

    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, causal=True, window=(255, 0)))
    report = tile_report(attn, 4096, 4096, png=str(tmp_path / "tiles.png"))
    # banded: query tiles of half the band, KV tiles that hold a query tile's band (127 + 256 keys)
    assert "tiles of 128 queries x 384 keys at N=4096, M=4096:" in report
    assert "computed 52 of 352 (14.8%), minimum needed 52, tile efficiency 100.0%" in report
    assert "full (no mask evaluated) 0, partial (masked) 52" in report
    assert "the pytorch backend: 32 query tiles, 32 KV tiles; KV tiles start at each query tile's first visible key" in report
    assert (tmp_path / "tiles.png").read_bytes().startswith(b"\x89PNG")


def test_spec_files_name_patterns(tmp_path):
    path = tmp_path / "longformer.toml"
    path.write_text(
        '[attention]\nnum_heads = 2\nhead_dim = 8\nmask = "kv_idx < 30"\n'
        'pattern = { name = "longformer", window = 3, global_tokens = [0, 5], seq_len = 33 }\n'
    )
    spec = attncc.load_spec(path)
    reference_mask = masks.longformer(3, [0, 5], seq_len=33)
    q, k, v = random_qkv(1, 2, 2, 33, 33, 8)
    o = attncc.compile(spec, pipeline=SPARSE_TILES)(q, k, v)
    expected, _ = dense_attention(q, k, v, mask_mod=lambda b, h, i, j: reference_mask(b, h, i, j) & (j < 30))
    torch.testing.assert_close(o.double(), expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("pattern, message", [
    ('{ name = "diagonal" }', "name='diagonal' is unknown; named patterns: bigbird, causal"),
    ('{ name = "chunked", size = 4 }', "chunked has no parameter 'size'; its parameters: chunk_size, causal"),
    ('{ name = "chunked", chunk_size = -4 }', "chunk_size=-4 is invalid: a positive integer is allowed"),
    ('"causal"', "is invalid: a table with a 'name'"),
])  # fmt: skip
def test_spec_file_pattern_errors(tmp_path, pattern, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"[attention]\nnum_heads = 2\nhead_dim = 8\npattern = {pattern}\n")
    with pytest.raises(attncc.SpecError) as error:
        attncc.load_spec(path)
    assert str(error.value).startswith(f"{path}: attention.pattern") and message in str(error.value)
