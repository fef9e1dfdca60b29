"""Each pass on printed IR before and after, where it must not fire, and the PassManager."""

from __future__ import annotations

import io
import math

import pytest
import sympy
import torch

import attncc
from attncc.errors import AttnccError, ValidationError
from attncc.frontend.lower import lower
from attncc.ir import GraphBuilder, ops
from attncc.ir.cost import graph_cost
from attncc.ir.expr import score
from attncc.ir.types import B, M, N, TensorType
from attncc.passes import PassManager, parse_pass, pipeline
from attncc.passes.base import Pass
from attncc.passes.canonicalize import Canonicalize
from attncc.passes.fold_scale import FoldScale
from attncc.passes.group_kv import GroupKV
from attncc.passes.online_softmax import OnlineSoftmax
from attncc.passes.tile import Tile

LLAMA = attncc.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=64, causal=True)


def body(graph) -> list[str]:
    """The printed op lines, without the signature and the closing brace."""
    return [line.strip() for line in str(graph).splitlines()[1:-1]]


def run(graph, *passes):
    for p in passes:
        p.stats.clear()
        graph = p.run(graph)
    return graph


def test_canonicalize_lowers_alibi_and_composes_score_mods():
    spec = attncc.AttentionSpec(num_heads=4, head_dim=16, alibi=True, softcap=30.0,
                                score_mod=lambda s, b, h, q, kv: s * 2)  # fmt: skip
    canonical = Canonicalize()
    after = body(canonical.run(lower(spec)))
    assert after[1] == "%1 = scale(%0) {factor = 1/4} : f32[B, 4, N, M]"
    assert after[2] == (
        # softcap(2 * (s - slope(h) |i + M - N - j|)), slope(h) = 2^(-2h - 2) for 4 heads
        "%2 = score_mod(%1) {expr = 30*tanh(score/15 - Abs(M - N - kv_idx + q_idx)/(60*2**(2*h)))} : f32[B, 4, N, M]"
    )
    assert canonical.stats["alibi_to_score_mod"] == 1 and canonical.stats["score_mods_composed"] == 2


def test_canonicalize_removes_identities():
    g = GraphBuilder()
    q = g.input("q", "query", TensorType((B, 2, N, 8), "T"))
    k = g.input("k", "key", TensorType((B, 2, M, 8), "T"))
    s = g.add(ops.Matmul(transpose_b=True), g.add(ops.RepeatKV(1), q), k)
    s = g.add(ops.Mask(sympy.true), g.add(ops.ScoreMod(score), g.add(ops.Scale(sympy.Integer(1)), s)))
    canonical = Canonicalize()
    after = body(canonical.run(g.finish({"lse": g.add(ops.LogSumExp(), s)})))
    assert after == ["%0 = matmul(%q, %k) {transpose_b = true} : f32[B, 2, N, M]", "%1 = logsumexp(%0) : f32[B, 2, N]",
                     "output(%1) {names = (lse,)}"]  # fmt: skip
    assert canonical.stats["identities_removed"] == 4


def test_canonicalize_shares_common_subexpressions():
    g = GraphBuilder()
    q = g.input("q", "query", TensorType((B, 2, N, 8), "T"))
    k = g.input("k", "key", TensorType((B, 2, M, 8), "T"))
    first = g.add(ops.Matmul(transpose_b=True), q, k)
    second = g.add(ops.Matmul(transpose_b=True), q, k)
    graph = g.finish({"a": g.add(ops.LogSumExp(), first), "b": g.add(ops.LogSumExp(), second)})
    canonical = Canonicalize()
    after = body(canonical.run(graph))
    assert after == [
        "%0 = matmul(%q, %k) {transpose_b = true} : f32[B, 2, N, M]",
        "%1 = logsumexp(%0) : f32[B, 2, N]",
        "output(%1, %1) {names = (a, b)}",
    ]
    assert canonical.stats["common_subexpressions"] == 2


def test_canonicalize_reads_no_captured_element_the_mod_does_not_read():
    """Found by tests/test_fuzz.py: sympy.simplify put the value of ``Eq(h, 5)`` into its branch, so
    ``bias[h, (h * 2) % 6]`` became ``bias[5, 4]``, out of range for a bias of 2 heads although the branch
    is never taken; the program raised ``index 5 is out of bounds for dimension 0 with size 2``."""
    bias = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(h == 5, score * bias[h, (h * 2) % 6], -math.inf)

    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=8, score_mod=score_mod))
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, length, 8, generator=generator) for length in (4, 6, 6))
    o, lse = attn(q, k, v, return_lse=True)
    assert (o == 0).all() and (lse == -math.inf).all()
    assert "bias[h, 2*(Mod(h, 3))]" in str(attn.graph)


def test_fold_scale_folds_scale_and_log2e_into_one_expression():
    fold = FoldScale()
    after = body(fold.run(Canonicalize().run(lower(LLAMA))))
    assert after[2:4] == ["%2 = matmul(%q, %0) {transpose_b = true} : f32[B, 8, N, M]",
                          "%3 = score_mod(%2) {expr = score/(8*log(2))} : f32[B, 8, N, M]"]  # fmt: skip
    assert after[5:7] == [
        "%5 = softmax(%4) {exp2 = true} : f32[B, 8, N, M]",
        "%6 = logsumexp(%4) {exp2 = true} : f32[B, 8, N]",
    ]
    assert fold.stats == {"scales_folded": 1, "exp2_regions": 1}


def test_fold_scale_does_not_fire_when_scores_escape():
    g = GraphBuilder()
    q = g.input("q", "query", TensorType((B, 2, N, 8), "T"))
    k = g.input("k", "key", TensorType((B, 2, M, 8), "T"))
    s = g.add(ops.Scale(sympy.Rational(1, 4)), g.add(ops.Matmul(transpose_b=True), q, k))
    graph = g.finish({"scores": s, "lse": g.add(ops.LogSumExp(), s)})
    fold = FoldScale()
    assert fold.run(graph) is graph and not fold.stats


def test_group_kv_removes_repeat_kv():
    group = GroupKV()
    after = body(group.run(lower(LLAMA)))
    assert after[0] == "%0 = matmul(%q, %k) {kv_groups = 4, transpose_b = true} : f32[B, 8, N, M]"
    assert after[-2] == "%5 = matmul(%3, %v) {kv_groups = 4, transpose_b = false} : f32[B, 8, N, 64]"
    assert group.stats["repeat_kv_removed"] == 2


def test_group_kv_keeps_repeat_kv_that_escapes():
    g = GraphBuilder()
    k = g.input("k", "key", TensorType((B, 2, M, 8), "T"))
    repeated = g.add(ops.RepeatKV(2), k)
    graph = g.finish({"k_rep": repeated})
    group = GroupKV()
    assert group.run(graph) is graph and not group.stats


def fused_llama():
    return run(lower(LLAMA), Canonicalize(), FoldScale(), GroupKV(), OnlineSoftmax())


def test_online_softmax_fuses_one_region():
    fuse = OnlineSoftmax()
    after = body(fuse.run(run(lower(LLAMA), Canonicalize(), FoldScale(), GroupKV())))
    assert after == [
        "%0 = flash_attention(%q, %k, %v) {exp2 = true, groups = 4, mask = kv_idx <= M - N + q_idx, "
        "score = score/(8*log(2))} : f32[B, 8, N, 64]",
        "%1 = lse_of(%0) : f32[B, 8, N]",
        "output(%0, %1) {names = (o, lse)}",
    ]
    assert fuse.stats["fused_regions"] == 1


def test_online_softmax_fuses_without_prior_passes():
    after = body(OnlineSoftmax().run(lower(attncc.AttentionSpec(num_heads=2, head_dim=16))))
    assert (
        after[0]
        == "%0 = flash_attention(%q, %k, %v) {exp2 = false, groups = 1, mask = True, score = score/4} : f32[B, 2, N, 16]"
    )


def test_online_softmax_does_not_fuse_when_probabilities_are_an_output():
    g = GraphBuilder()
    q = g.input("q", "query", TensorType((B, 2, N, 8), "T"))
    k = g.input("k", "key", TensorType((B, 2, M, 8), "T"))
    v = g.input("v", "value", TensorType((B, 2, M, 8), "T"))
    s = g.add(ops.Matmul(transpose_b=True), q, k)
    p = g.add(ops.Softmax(), s)
    graph = g.finish({"o": g.add(ops.Matmul(transpose_b=False), p, v), "p": p})
    fuse = OnlineSoftmax()
    assert fuse.run(graph) is graph
    assert fuse.stats == {"fused_regions": 0, "not_fused": 1}


def test_online_softmax_does_not_fuse_a_score_mod_after_the_mask():
    g = GraphBuilder()
    q = g.input("q", "query", TensorType((B, 2, N, 8), "T"))
    k = g.input("k", "key", TensorType((B, 2, M, 8), "T"))
    v = g.input("v", "value", TensorType((B, 2, M, 8), "T"))
    s = g.add(ops.Mask(sympy.Le(sympy.Symbol("kv_idx", integer=True, nonnegative=True), 3)),
              g.add(ops.Matmul(transpose_b=True), q, k))  # fmt: skip
    s = g.add(ops.ScoreMod(sympy.Max(score, 0)), s)  # would turn masked -inf back into 0
    graph = g.finish({"o": g.add(ops.Matmul(transpose_b=False), g.add(ops.Softmax(), s), v)})
    assert OnlineSoftmax().run(graph) is graph


def test_tile_sets_sizes_per_target_and_head_dim():
    fused = fused_llama()
    assert "block_m = 512, block_n = 256" in body(Tile(target="pytorch").run(fused))[0]
    tiled = body(Tile(target="triton").run(fused))[0]
    assert "block_m = 128, block_n = 64" in tiled and "num_stages = 3, num_warps = 8" in tiled
    assert "block_m = 16, block_n = 8" in body(Tile(target="pytorch", block_m=16, block_n=8).run(fused))[0]
    tuned = body(Tile(target="triton", block_m=64, num_warps=4, num_stages=3).run(fused))[0]
    assert "block_m = 64, block_n = 64" in tuned and "num_stages = 3, num_warps = 4" in tuned
    with pytest.raises(AttnccError, match="target='tpu' is unknown"):
        Tile(target="tpu").run(fused)


def test_tile_follows_the_band_of_a_sliding_window():
    from attncc.passes.sparsity import Sparsity
    from attncc.passes.tile import band_width

    def tiles(window):
        spec = attncc.AttentionSpec(num_heads=2, head_dim=64, causal=True, window=window)
        region = run(lower(spec), Canonicalize(), FoldScale(), OnlineSoftmax(), Sparsity()).nodes_of(ops.FlashAttention)[0]
        tile = Tile(target="pytorch")
        tiled = tile.run(run(lower(spec), Canonicalize(), FoldScale(), OnlineSoftmax(), Sparsity()))
        return band_width(region.op.schedule), body(tiled)[0], tile.stats["banded_tiles"]

    band, line, banded = tiles((255, 0))
    assert band == 256 and "block_m = 128, block_n = 384" in line and banded == 1  # 127 + 256 keys per query tile
    band, line, banded = tiles((4095, 0))
    assert band == 4096 and "block_m = 512, block_n = 256" in line and banded == 0
    assert band_width(None) is None


def test_shift_invariance_decides_the_band_kernel():
    """A band's mask and terms must read q_idx and kv_idx only through kv_idx - q_idx (in any arrangement, inside
    relations, products, captured-tensor indices) for its query tiles to share one bias: "band"; else "masked"."""
    from attncc.ir.expr import b, captured_symbol, h, kv_idx, q_idx
    from attncc.passes.sparsity import Sparsity
    from attncc.passes.tile import shift_invariant

    table = captured_symbol("table", "float32")
    invariant = [
        sympy.Le(kv_idx, M - N + q_idx) & sympy.Ge(kv_idx + 256, q_idx),
        (b + 1) * (kv_idx - q_idx) / 20,  # sympy distributes: b*kv_idx/20 - b*q_idx/20 + ...
        table[h, sympy.Mod(q_idx - kv_idx, 64)],
        sympy.Piecewise((1.0, sympy.Lt(kv_idx + 3, q_idx)), (0.0, True)),
        sympy.Integer(0),
    ]
    for expr in invariant:
        assert shift_invariant(expr), expr
    variant = [q_idx / 10, table[kv_idx], sympy.Eq(table[q_idx], table[kv_idx]), sympy.floor(kv_idx / 64) - sympy.floor(q_idx / 64)]
    for expr in variant:
        assert not shift_invariant(expr), expr

    def kernel(**fields):
        spec = attncc.AttentionSpec(num_heads=2, head_dim=64, causal=True, **fields)
        return body(run(lower(spec), Canonicalize(), FoldScale(), OnlineSoftmax(), Sparsity(), Tile(target="pytorch")))[0]

    assert "fused_kernel = band" in kernel(window=(255, 0), alibi=True)
    assert "fused_kernel = masked" in kernel(window=(255, 0), score_mod=lambda score, b, h, q_idx, kv_idx: score + q_idx)
    assert "fused_kernel = masked" in kernel(window=(4095, 0))  # wide bands keep the default tiles: no band call


def test_pipeline_parsing():
    passes = pipeline(["canonicalize", "tile{target=triton,block_m=64}"])
    assert [str(p) for p in passes] == ["canonicalize", "tile{target=triton, block_m=64}"]
    assert [p.name for p in pipeline("pytorch")] == [
        "canonicalize", "fold-scale", "group-kv", "online-softmax", "sparsity", "split-kv", "tile"
    ]  # fmt: skip
    with pytest.raises(AttnccError, match="pass 'fuse' is unknown; known passes: canonicalize"):
        parse_pass("fuse")
    with pytest.raises(AttnccError, match="is not key=value"):
        parse_pass("tile{target}")


def test_print_after_all_and_records():
    stream = io.StringIO()
    manager = PassManager(pipeline("pytorch"), print_after_all=True, stream=stream)
    manager.run(lower(LLAMA))
    printed = stream.getvalue()
    assert printed.count("// ----- IR after") == 7
    assert "// ----- IR after online-softmax -----\ngraph(%q: T[B, 8, N, 64]" in printed
    assert [r.name for r in manager.records] == [
        "canonicalize", "fold-scale", "group-kv", "online-softmax", "sparsity", "split-kv", "tile"
    ]  # fmt: skip
    assert manager.records[3].stats["fused_regions"] == 1


class BreakScale(Pass):
    """A wrong rewrite: drops the softmax scale."""

    name = "break-scale"

    def run(self, graph):
        from attncc.passes.rewrite import rebuild

        return rebuild(graph, lambda node, inputs, b: inputs[0] if isinstance(node.op, ops.Scale) else None)


def test_translation_validation_names_the_pass_that_changed_the_meaning():
    manager = PassManager([Canonicalize(), BreakScale()], validate_each=True)
    with pytest.raises(ValidationError, match="pass break-scale changed the meaning of the graph: o moved by"):
        manager.run(lower(LLAMA))
    assert manager.records[0].max_change < 1e-12


def test_translation_validation_passes_the_default_pipelines_with_captured_tensors():
    doc = torch.tensor([0] * 10 + [1] * 20 + [2] * 20)
    table = torch.randn(4, 9)
    spec = attncc.AttentionSpec(
        num_heads=4, num_kv_heads=2, head_dim=16, causal=True, window=(12, 0), softcap=20.0, alibi=True,
        mask_mod=lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx],
        score_mod=lambda s, b, h, q_idx, kv_idx: s + table[h, (kv_idx - q_idx).clamp(-4, 4) + 4],
    )  # fmt: skip
    attn = attncc.compile(spec, validate_each=True, pipeline=["canonicalize", "fold-scale", "group-kv",
                                                              "online-softmax", "sparsity", "tile{target=pytorch,block_m=8,block_n=16}"])  # fmt: skip
    assert all(r.max_change is not None and r.max_change < 1e-12 for r in attn.pass_records)


def test_cost_model_formulas():
    unoptimized = graph_cost(lower(attncc.AttentionSpec(num_heads=8, head_dim=64)), dtype_bytes=2)
    # Two matmuls of 2 * B * H * N * M * 64 flops each.
    assert sympy.expand(unoptimized.flops).coeff(B * M * N) >= 2 * 2 * 8 * 64
    fused = graph_cost(run(lower(attncc.AttentionSpec(num_heads=8, head_dim=64)), *pipeline("pytorch")))
    at = {"B": 1, "N": 8192, "M": 8192}
    before, after = unoptimized.at(at), fused.at(at)
    assert after.peak_memory * 10 < before.peak_memory  # no N x M intermediate survives
    assert after.bytes * 10 < before.bytes
    assert abs(after.flops - before.flops) / before.flops < 0.01


def test_cost_model_counts_the_scores_a_schedule_visits():
    from attncc.ir.cost import scheduled_flops, visited_fraction

    def region(spec, pipeline_names):
        graph = run(lower(spec), *pipeline_names)
        return graph, graph.nodes_of(ops.FlashAttention)[0].op

    causal = attncc.AttentionSpec(num_heads=8, head_dim=64, causal=True)
    names = pipeline("pytorch")
    graph, op = region(causal, names[:-1])  # up to sparsity: single rows
    assert visited_fraction(op, 1000, 1000) == pytest.approx(1001 / 2000)  # row i sees i + 1 keys
    at = {"B": 1, "N": 8192, "M": 8192}
    dense = float(graph_cost(graph).at(at).flops)
    assert scheduled_flops(graph, at) == pytest.approx(dense * 8193 / 16384, rel=1e-3)
    graph, op = region(causal, names)  # tiles of 512 x 256: whole KV tiles up to each tile's last row
    assert visited_fraction(op, 1024, 1024) == pytest.approx((512 * 512 + 512 * 1024) / 1024**2)
    window = attncc.AttentionSpec(num_heads=8, head_dim=64, causal=True, window=(127, 0))
    _, op = region(window, names[:-1])
    assert visited_fraction(op, 4096, 4096) == pytest.approx((128 * 4096 - 127 * 128 / 2) / 4096**2)
    padded = attncc.AttentionSpec(num_heads=8, head_dim=64,
                                  mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < LENGTHS[b])  # fmt: skip
    _, op = region(padded, names)
    assert op.schedule is not None and visited_fraction(op, 64, 64) is None  # lengths are call-time values
    _, op = region(attncc.AttentionSpec(num_heads=8, head_dim=64), names)
    assert visited_fraction(op, 64, 64) is None  # no schedule: dense


LENGTHS = torch.tensor([5, 9])


def test_explain_lists_passes_and_costs():
    text = attncc.compile(LLAMA).explain()
    assert "fused_regions=1" in text and "repeat_kv_removed=2" in text
    assert "peak intermediate memory" in text and "optimized IR:" in text
