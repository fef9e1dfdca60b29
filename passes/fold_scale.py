"""fold-scale: fold the softmax scale and log2(e) into the score expression, so kernels use exp2.

``matmul -> scale(c) -> [score_mod f] -> [mask] -> softmax / logsumexp`` becomes
``matmul -> score_mod(log2(e) * f(c * score)) -> [mask] -> softmax / logsumexp (exp2)``:
one expression over the raw dot product, in base-2 units. e^x = 2^(x log2 e), so the
weights, and the natural-log lse the ops report, are unchanged; masked scores stay -inf.
A chain whose expression holds a constant that overflows float32 in base-2 units (beyond
2.36e38, such as ``torch.finfo(torch.float32).min``) stays in natural units
(``exp2_refused_overflow``), so a row of only such scores is uniform, not empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy
import sympy

from attncc.ir import ops
from attncc.ir.expr import score
from attncc.ir.graph import Graph
from attncc.passes.base import Pass
from attncc.passes.rewrite import captured_operands, compose, rebuild

LOG2_E = 1 / sympy.log(2)
# A score constant beyond this magnitude overflows float32 once multiplied by log2(e): finfo.min, the
# additive mask of Hugging Face models, would become -inf and a row of only such scores would look empty.
LARGEST_FOLDABLE = float(numpy.finfo(numpy.float32).max) * math.log(2)


def score_chain(node, users):
    """From a QK^T matmul: its scale / score_mod nodes, the optional mask, and the softmax-type users.

    Returns None unless every intermediate has exactly the users of the chain, all
    reductions are natural-base softmax / logsumexp, and there is at least one.
    """
    chain = []
    current = node
    while True:
        next_users = users[current]
        if len(next_users) == 1 and isinstance(next_users[0].op, (ops.Scale, ops.ScoreMod, ops.Mask)):
            current = next_users[0]
            chain.append(current)
            if isinstance(current.op, ops.Mask):
                break
            continue
        break
    reductions = users[current]
    if not reductions or not all(isinstance(r.op, (ops.Softmax, ops.LogSumExp)) and not r.op.exp2 for r in reductions):
        return None
    return chain, reductions


@dataclass(frozen=True)
class FoldScale(Pass):
    name = "fold-scale"

    def run(self, graph: Graph) -> Graph:
        users = graph.users()
        plans = {}
        for node in graph.nodes_of(ops.Matmul):
            if node.op.transpose_b:
                found = score_chain(node, users)
                if found is not None:
                    plans[node] = found
        expressions = {}
        for matmul, (chain, _) in list(plans.items()):
            expr = score
            for link in chain:
                if isinstance(link.op, ops.Scale):
                    expr = expr * link.op.factor
                elif isinstance(link.op, ops.ScoreMod):
                    expr = compose(link.op.expr, expr)
            if any(abs(c) > LARGEST_FOLDABLE for c in expr.atoms(sympy.Number) if c.is_finite):
                self.count("exp2_refused_overflow")
                del plans[matmul]
                continue
            scales = sum(isinstance(link.op, ops.Scale) for link in chain)
            if scales:
                self.count("scales_folded", scales)
            expressions[matmul] = LOG2_E * expr
            self.count("exp2_regions")
        if not plans:
            return graph
        folded = {n for chain, _ in plans.values() for n in chain if not isinstance(n.op, ops.Mask)}
        reductions = {r for _, rs in plans.values() for r in rs}

        def rule(node, inputs, builder):
            if node in expressions:
                scores = builder.add(node.op, *inputs)
                expr = expressions[node]
                return builder.add(ops.ScoreMod(expr), scores, *captured_operands([expr], builder.nodes))
            if node in folded:
                return inputs[0]
            if node in reductions:
                return builder.add(type(node.op)(exp2=True), *inputs)
            return None

        return rebuild(graph, rule)
