"""The IR: lowering a spec, the printer (golden text), the verifier and the Graphviz rendering."""

from __future__ import annotations

from pathlib import Path

import pytest
import sympy

import attncc
from attncc.errors import IRError
from attncc.frontend.lower import alibi_slope, lower
from attncc.ir import GraphBuilder, ops
from attncc.ir.expr import h, kv_idx, q_idx
from attncc.ir.graph import Graph, Node
from attncc.ir.types import B, M, N, TensorType

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

LLAMA3_IR = """\
graph(%q: T[B, 32, N, 128], %k: T[B, 8, M, 128], %v: T[B, 8, M, 128]) {
  %0 = repeat_kv(%k) {groups = 4} : T[B, 32, M, 128]
  %1 = repeat_kv(%v) {groups = 4} : T[B, 32, M, 128]
  %2 = matmul(%q, %0) {transpose_b = true} : f32[B, 32, N, M]
  %3 = scale(%2) {factor = sqrt(2)/16} : f32[B, 32, N, M]
  %4 = mask(%3) {predicate = kv_idx <= M - N + q_idx} : f32[B, 32, N, M]
  %5 = softmax(%4) : f32[B, 32, N, M]
  %6 = logsumexp(%4) : f32[B, 32, N]
  %7 = matmul(%5, %1) {transpose_b = false} : f32[B, 32, N, 128]
  output(%7, %6) {names = (o, lse)}
}"""


def test_llama3_example_prints_golden_ir():
    graph = lower(attncc.load_spec(EXAMPLES / "llama3_8b.toml"))
    assert str(graph) == LLAMA3_IR


def test_printing_is_stable_across_lowerings():
    spec = attncc.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=64, causal=True, window=(128, 0), softcap=30.0)
    assert str(lower(spec)) == str(lower(spec))


def test_mods_and_spec_options_lower_in_order():
    doc = __import__("torch").tensor([0, 0, 1])
    spec = attncc.AttentionSpec(
        num_heads=6, head_dim=16, causal="top_left", window=(4, None), softcap=50.0, alibi=True,
        score_mod=lambda score, b, h, q_idx, kv_idx: score * 2, mask_mod=lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx],
    )  # fmt: skip
    lines = str(lower(spec)).splitlines()
    assert lines[0] == "graph(%q: T[B, 6, N, 16], %k: T[B, 6, M, 16], %v: T[B, 6, M, 16], %doc: i64[doc_d0]) {"
    assert [line.split("= ")[1].split("(")[0] for line in lines[1:-2]] == [
        "matmul", "scale", "alibi", "score_mod", "score_mod", "mask", "softmax", "logsumexp", "matmul",
    ]  # fmt: skip
    assert "%3 = score_mod(%2) {expr = 2*score}" in lines[4]
    assert "%4 = score_mod(%3) {expr = 50*tanh(score/50)}" in lines[5]
    assert lines[6].startswith(
        "  %5 = mask(%4, %doc) {predicate = (kv_idx <= q_idx) & (kv_idx >= q_idx - 4) & Eq(doc[q_idx], doc[kv_idx])}"
    )


def test_alibi_slopes_for_power_of_two_and_other_head_counts():
    assert alibi_slope(8) == sympy.Pow(2, -h - 1)
    six = alibi_slope(6)
    assert [six.subs(h, i) for i in range(6)] == [sympy.Rational(1, 2 ** (2 * (i + 1))) for i in range(4)] + [
        sympy.Rational(1, 2),
        sympy.Rational(1, 8),
    ]


def _scores_graph():
    g = GraphBuilder()
    q = g.input("q", "query", TensorType((B, 2, N, 8), "T"))
    k = g.input("k", "key", TensorType((B, 2, M, 8), "T"))
    return g, q, k


def test_builder_infers_types():
    g, q, k = _scores_graph()
    s = g.add(ops.Matmul(transpose_b=True), q, k)
    assert str(s.type) == "f32[B, 2, N, M]"
    assert str(g.add(ops.LogSumExp(), s).type) == "f32[B, 2, N]"


def test_verifier_rejects_use_before_definition():
    g, q, k = _scores_graph()
    s = g.add(ops.Matmul(transpose_b=True), q, k)
    nodes = [g.nodes[0], g.nodes[1], Node(ops.Output(("o",)), (s,), None)]
    with pytest.raises(IRError, match=r"node 2 \(output\) uses a value not defined before it"):
        Graph(nodes)


def test_verifier_rejects_wrong_recorded_type():
    g, q, k = _scores_graph()
    bad = Node(ops.Matmul(transpose_b=True), (q, k), TensorType((B, 2, N, N), "f32"))
    with pytest.raises(IRError, match=r"has type f32\[B, 2, N, N\], but its op infers f32\[B, 2, N, M\]"):
        Graph([*g.nodes, bad, Node(ops.Output(("s",)), (bad,), None)])


def test_verifier_rejects_missing_output_and_duplicate_inputs():
    g, q, k = _scores_graph()
    with pytest.raises(IRError, match="exactly one output node, at its end"):
        Graph(g.nodes)
    twin = Node(ops.Input("q", "query", q.type), (), q.type)
    with pytest.raises(IRError, match="input name 'q' is used twice"):
        Graph([q, twin, Node(ops.Output(("a", "b")), (q, twin), None)])


def test_verifier_rejects_captured_operand_mismatch():
    from attncc.ir.expr import captured_symbol

    g, q, k = _scores_graph()
    s = g.add(ops.Matmul(transpose_b=True), q, k)
    doc = captured_symbol("doc", "i64")
    with pytest.raises(IRError, match=r"reads captured tensors \['doc'\] but its operands are \[\]"):
        Graph([*g.nodes, m := Node(ops.Mask(sympy.Eq(doc[q_idx], doc[kv_idx])), (s,), s.type),
               Node(ops.Output(("s",)), (m,), None)])  # fmt: skip


def test_ops_reject_bad_operands():
    g, q, k = _scores_graph()
    with pytest.raises(IRError, match="matmul inner dimensions differ: 8 and 4"):
        g.add(ops.Matmul(transpose_b=True), q, g.input("x", "key", TensorType((B, 2, M, 4), "T")))
    s = g.add(ops.Matmul(transpose_b=True), q, k)
    with pytest.raises(IRError, match="is not boolean"):
        g.add(ops.Mask(q_idx + 1), s)
    with pytest.raises(IRError, match="unknown symbols"):
        g.add(ops.ScoreMod(sympy.Symbol("z") + 1), s)
    with pytest.raises(IRError, match="f32 scores"):
        g.add(ops.Softmax(), q)


def test_to_dot_renders_every_node_and_edge():
    graph = lower(attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, causal=True))
    dot = graph.to_dot()
    assert dot.startswith("digraph attention {") and dot.endswith("}")
    assert dot.count("[label=") == len(graph.nodes)
    assert dot.count(" -> ") == sum(len(n.inputs) for n in graph.nodes)
    assert '"%0 = repeat_kv(%k) {groups = 2} : T[B, 4, M, 8]"' in dot
