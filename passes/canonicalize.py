"""canonicalize: one form for later passes to match.

- positional ops become expressions: ``alibi`` is rewritten as a ``score_mod``;
- chains merge: consecutive ``scale``s multiply, consecutive ``score_mod``s compose,
  consecutive ``mask``s conjoin;
- identities go: ``scale`` by 1, ``score_mod`` returning ``score``, ``mask`` of true,
  ``repeat_kv`` of 1;
- expressions are simplified with sympy (small ones fully, large ones structurally),
  within the bounds of :mod:`attncc.ir.bounded`: when sympy fails or runs out of
  time the expression stays as it is (still correct) and ``unsimplified_<why>``
  counts it;
- common subexpressions are shared (same op, same inputs) and dead nodes dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attncc.ir import ops
from attncc.ir.bounded import bounded
from attncc.ir.expr import score
from attncc.ir.graph import Graph
from attncc.passes.base import Pass
from attncc.passes.rewrite import captured_operands, compose, rebuild

# sympy.simplify is exponential on large piecewise expressions; beyond this many
# operations only the cheap, structure-preserving simplifications run.
SIMPLIFY_MAX_OPS = 40


def simplify(expr):
    """The simpler of ``expr`` and sympy's simplification of it; unbounded: call through ``bounded``.

    A simplification that reads a captured element ``expr`` does not read is refused: sympy puts the
    value an ``Eq`` condition gives a symbol into its branch (``where(h == 9, bias[h], ...)`` becomes
    ``bias[9]``), an index that may be out of range although the branch is never taken.
    """
    if sympy.count_ops(expr) <= SIMPLIFY_MAX_OPS:
        simpler = sympy.simplify(expr)
        same_kind = isinstance(simpler, sympy.logic.boolalg.Boolean) == isinstance(expr, sympy.logic.boolalg.Boolean)
        if same_kind and simpler.atoms(sympy.Indexed) <= expr.atoms(sympy.Indexed):
            return simpler if sympy.count_ops(simpler) < sympy.count_ops(expr) else expr
    return sympy.piecewise_fold(expr) if isinstance(expr, sympy.Expr) else expr


@dataclass(frozen=True)
class Canonicalize(Pass):
    name = "canonicalize"

    def run(self, graph: Graph) -> Graph:
        graph = rebuild(graph, self.merge)
        graph = rebuild(graph, self.share_common())
        self.count("nodes_after", len(graph.nodes))
        return graph

    def merge(self, node, inputs, builder):
        op = node.op
        source = inputs[0] if inputs else None
        if isinstance(op, ops.Alibi):
            self.count("alibi_to_score_mod")
            return self.score_mod(op.as_score_mod(), source, builder)
        if isinstance(op, ops.RepeatKV) and op.groups == 1:
            self.count("identities_removed")
            return source
        if isinstance(op, ops.Scale):
            factor = op.factor
            if isinstance(source.op, ops.Scale):
                self.count("scales_merged")
                factor = factor * source.op.factor
                source = source.inputs[0]
            if factor == 1:
                self.count("identities_removed")
                return source
            return builder.add(ops.Scale(factor), source) if factor != op.factor or source is not inputs[0] else None
        if isinstance(op, ops.ScoreMod):
            return self.score_mod(op.expr, source, builder)
        if isinstance(op, ops.Mask):
            predicate = op.predicate
            if isinstance(source.op, ops.Mask):
                self.count("masks_merged")
                predicate = sympy.And(source.op.predicate, predicate)
                source = source.inputs[0]
            predicate = self.simplified(predicate)
            if predicate is sympy.true:
                self.count("identities_removed")
                return source
            return builder.add(ops.Mask(predicate), source, *captured_operands([predicate], builder.nodes))
        return None

    def score_mod(self, expr, source, builder):
        if isinstance(source.op, ops.ScoreMod):
            self.count("score_mods_composed")
            expr = compose(expr, source.op.expr)
            source = source.inputs[0]
        expr = self.simplified(expr)
        if expr == score:
            self.count("identities_removed")
            return source
        return builder.add(ops.ScoreMod(expr), source, *captured_operands([expr], builder.nodes))

    def simplified(self, expr):
        simpler, why = bounded(simplify, expr)
        if why is not None:
            self.count(f"unsimplified_{why}")
            return expr
        if simpler != expr:
            self.count("expressions_simplified")
        return simpler

    def share_common(self):
        seen: dict = {}

        def rule(node, inputs, builder):
            if isinstance(node.op, (ops.Input, ops.Output)):
                return None
            key = (node.op, tuple(id(i) for i in inputs))
            if key in seen:
                self.count("common_subexpressions")
                return seen[key]
            seen[key] = builder.add(node.op, *inputs)
            return seen[key]

        return rule
