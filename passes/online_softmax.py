"""online-softmax: fuse QK^T -> score_mod -> mask -> softmax -> PV into one flash_attention region.

The region streams over KV tiles with a running max, a running sum and a rescaled
accumulator (see ``attncc.ir.ops.FlashAttention``), so the N x M probabilities are
never stored. It fires only when the probabilities feed nothing but the PV matmul,
and the masked scores nothing but that softmax and an optional logsumexp (which
becomes the region's ``lse``); otherwise the graph is left as it is. ``rope`` ops on
q and k that feed nothing but the QK^T matmul join the region as its ``rope``
attribute and positions, so kernels rotate the tiles they load.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from attncc.ir import ops
from attncc.ir.expr import score
from attncc.ir.graph import Graph
from attncc.passes.base import Pass
from attncc.passes.rewrite import captured_operands, compose, rebuild


@dataclass(frozen=True)
class Match:
    pv: object
    lse: object | None
    region: ops.FlashAttention
    q: object
    k: object
    v: object


def match_region(pv, users) -> Match | None:
    """Walk back from a PV matmul to the QK^T matmul; None if anything escapes the chain."""
    probabilities, v = pv.inputs
    if pv.op.transpose_b or not isinstance(probabilities.op, ops.Softmax) or users[probabilities] != [pv]:
        return None
    exp2 = probabilities.op.exp2
    scores = probabilities.inputs[0]
    reductions = users[scores]
    lse = [r for r in reductions if r is not probabilities]
    if len(lse) > 1 or any(not isinstance(r.op, ops.LogSumExp) or r.op.exp2 != exp2 for r in lse):
        return None
    expr, mask = score, sympy.true
    node = scores
    while not isinstance(node.op, ops.Matmul):
        if not isinstance(node.op, (ops.Scale, ops.ScoreMod, ops.Mask)):
            return None
        if node is not scores and len(users[node]) != 1:
            return None
        if isinstance(node.op, ops.Mask):
            if expr != score:  # a score_mod after the mask could unmask -inf: not the fused form
                return None
            mask = sympy.And(node.op.predicate, mask)
        elif isinstance(node.op, ops.ScoreMod):
            expr = compose(expr, node.op.expr)
        else:
            expr = compose(expr, node.op.factor * score)
        node = node.inputs[0]
    qk = node
    if not qk.op.transpose_b or (qk is not scores and len(users[qk]) != 1) or qk.op.kv_groups != pv.op.kv_groups:
        return None
    region = ops.FlashAttention(groups=qk.op.kv_groups, score=expr, mask=mask, exp2=exp2)
    q, k = qk.inputs
    rotations = [x for x in (q, k) if isinstance(x.op, ops.Rope)]
    if rotations:
        if len(rotations) != 2 or q.op.rope != k.op.rope or q.op.role != "query" or k.op.role != "key":
            return None
        if users[q] != [qk] or users[k] != [qk]:
            return None
        region = replace(region, rope=q.op.rope, q_position=q.op.position, kv_position=k.op.position)
        q, k = q.inputs[0], k.inputs[0]
    return Match(pv, lse[0] if lse else None, region, q, k, v)


@dataclass(frozen=True)
class OnlineSoftmax(Pass):
    name = "online-softmax"

    def run(self, graph: Graph) -> Graph:
        users = graph.users()
        matches = [m for pv in graph.nodes_of(ops.Matmul) if (m := match_region(pv, users)) is not None]
        self.count("fused_regions", len(matches))
        if not matches:
            self.count("not_fused")
            return graph
        by_node = {}
        for match in matches:
            by_node[match.pv] = match
            if match.lse is not None:
                by_node[match.lse] = match
        regions = {}

        def rule(node, inputs, builder):
            match = by_node.get(node)
            if match is None:
                return None
            region = regions.get(id(match))
            if region is None:
                expressions = [match.region.score, match.region.mask, *match.region.positions().values()]
                operands = captured_operands(expressions, builder.nodes)
                qkv = (builder.mapping[match.q], builder.mapping[match.k], builder.mapping[match.v])
                region = builder.add(match.region, *qkv, *operands)
                regions[id(match)] = region
            return region if node is match.pv else builder.add(ops.LseOf(), region)

        return rebuild(graph, rule)
