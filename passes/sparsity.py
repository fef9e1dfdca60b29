"""sparsity: analyse a region's mask symbolically and give it a tile schedule.

The mask is split into its conjuncts. A conjunct that is a linear inequality in
``kv_idx`` (or in ``kv_idx // C``, for chunked masks) whose other side is monotone
in ``q_idx`` — causal in either alignment, sliding windows, prefix-LM, chunked local
attention, cross-attention offsets, per-batch key padding — is solved for ``kv_idx``
with sympy, giving closed-form bounds ``lower(q) <= kv_idx <= upper(q)``. For a
query tile of rows ``q_first .. q_last`` the monotone bounds are evaluated at the
right end of the tile: the visited keys are ``[min lower, max upper + 1)`` and the
keys visible to every row ``[max lower, min upper + 1)``. Both are sound: a tile with
a visible element is always visited; a tile is "full" only if every element is
visible. Conjuncts that are not such inequalities (document ids, 2-D neighbourhoods,
row predicates) stay as the ``residual``; a tile table built at call time from the
captured tensors then classifies each tile as empty, partial or full. Expanding a
conjunct is bounded (:mod:`attncc.ir.bounded`): one sympy cannot expand in time stays in
the residual, and ``unsolved_<why>`` counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import sympy
import torch

from attncc.interpreter import evaluate, index_grids
from attncc.ir import ops
from attncc.ir.bounded import bounded
from attncc.ir.expr import FloorDiv, kv_idx, q_idx
from attncc.ir.graph import Graph
from attncc.ir.schedule import TileSchedule, q_first, q_last
from attncc.ir.types import M
from attncc.passes.base import Pass
from attncc.passes.rewrite import captured_operands, rebuild

_t = sympy.Dummy("t", integer=True)


def _ignore(why: str) -> None:
    """The default ``on_fallback``: a conjunct sympy could not expand just stays in the residual."""


def direction(expr) -> int | None:
    """+1 if expr never decreases as q_idx grows, -1 if it never increases, 0 if it ignores q_idx; None if unknown."""
    if not expr.has(q_idx):
        return 0
    if expr == q_idx:
        return 1
    if isinstance(expr, sympy.Add):
        return _combine([direction(a) for a in expr.args])
    if isinstance(expr, sympy.Mul):
        constant, rest = expr.as_independent(q_idx)
        if not constant.is_number or not rest.has(q_idx):
            return None
        inner = direction(rest)
        return None if inner is None else inner * (1 if constant > 0 else -1)
    if isinstance(expr, FloorDiv) and expr.args[1].is_number and expr.args[1] > 0:
        return direction(expr.args[0])
    if isinstance(expr, (sympy.floor, sympy.ceiling)):
        return direction(expr.args[0])
    if isinstance(expr, (sympy.Min, sympy.Max)):
        return _combine([direction(a) for a in expr.args])
    return None


def _combine(directions: list) -> int | None:
    if None in directions:
        return None
    signs = {d for d in directions if d != 0}
    return 0 if not signs else (signs.pop() if len(signs) == 1 else None)


@dataclass(frozen=True)
class KVRange:
    """lower <= kv_idx <= upper (None: unbounded); exact when the range is the conjunct itself."""

    lower: sympy.Expr | None
    upper: sympy.Expr | None
    exact: bool


def _kv_atom(expr):
    """The single form kv_idx appears in: kv_idx itself or kv_idx // C for a positive constant C."""
    divisions = {f for f in expr.atoms(FloorDiv) if f.args[0] == kv_idx and f.args[1].is_Integer and f.args[1] > 0}
    without = expr.xreplace({f: _t for f in divisions})
    if without.has(kv_idx):
        return (kv_idx, None) if not divisions else (None, None)
    if len(divisions) == 1:
        atom = divisions.pop()
        return atom, int(atom.args[1])
    return None, None


def _solve_relation(term, on_fallback: Callable[[str], None]) -> KVRange | None:
    difference, why = bounded(sympy.expand, term.lhs - term.rhs)
    if why is not None:
        on_fallback(why)
        return None
    atom, chunk = _kv_atom(difference)
    if atom is None:
        return None
    linear = difference.xreplace({atom: _t})
    slope = linear.diff(_t)
    rest = sympy.expand(linear - slope * _t)
    if not slope.is_Integer or slope == 0 or rest.has(_t) or rest.has(kv_idx) or rest.is_integer is not True:
        return None
    relation = type(term)
    if relation is sympy.Ne:
        return None
    # slope * t + rest REL 0; strict relations of integers become non-strict.
    if relation is sympy.Lt:
        relation, rest = sympy.Le, rest + 1
    elif relation is sympy.Gt:
        relation, rest = sympy.Ge, rest - 1
    if relation is sympy.Ge:
        relation, slope, rest = sympy.Le, -slope, -rest
    upper = lower = None
    if relation is sympy.Eq:
        if abs(slope) != 1:
            return None
        upper = lower = -rest / slope
    elif slope > 0:  # t <= floor(-rest / slope)
        upper = FloorDiv(-rest, slope)
    else:  # t >= ceil(rest / -slope)
        lower = -FloorDiv(-rest, -slope)
    if chunk is not None:  # t = kv // C: t <= U  <=>  kv <= C U + C - 1;  t >= L  <=>  kv >= C L
        upper = None if upper is None else chunk * upper + chunk - 1
        lower = None if lower is None else chunk * lower
    for bound in (lower, upper):
        if bound is not None and direction(bound) is None:
            return None
    return KVRange(lower, upper, exact=True)


def _without_abs(term):
    """|x| <= y is x <= y and -x <= y (likewise <); other relations are returned as they are."""
    if isinstance(term, (sympy.Le, sympy.Lt)) and isinstance(term.lhs, sympy.Abs):
        inner = term.lhs.args[0]
        return sympy.And(type(term)(inner, term.rhs), type(term)(-inner, term.rhs), evaluate=False)
    if isinstance(term, (sympy.Ge, sympy.Gt)) and isinstance(term.rhs, sympy.Abs):
        inner = term.rhs.args[0]
        relation = sympy.Le if isinstance(term, sympy.Ge) else sympy.Lt
        return sympy.And(relation(inner, term.lhs), relation(-inner, term.lhs), evaluate=False)
    return term


def kv_range(term, on_fallback: Callable[[str], None] = _ignore) -> KVRange | None:
    """The range of kv_idx a conjunct allows, if it has a closed form monotone in q_idx.

    ``on_fallback(why)`` hears of each relation sympy could not expand (see ``bounded``).
    """
    term = _without_abs(term)
    if isinstance(term, sympy.core.relational.Relational):
        return _solve_relation(term, on_fallback)
    if isinstance(term, sympy.And):
        ranges = [kv_range(a, on_fallback) for a in term.args]
        if any(r is None for r in ranges):
            return None
        lowers = [r.lower for r in ranges if r.lower is not None]
        uppers = [r.upper for r in ranges if r.upper is not None]
        return KVRange(sympy.Max(*lowers) if lowers else None, sympy.Min(*uppers) if uppers else None,
                       all(r.exact for r in ranges))  # fmt: skip
    if isinstance(term, sympy.Or):
        ranges = [kv_range(a, on_fallback) for a in term.args]
        if any(r is None for r in ranges):
            return None
        lowers, uppers = [r.lower for r in ranges], [r.upper for r in ranges]
        lower = None if None in lowers else sympy.Min(*lowers)
        upper = None if None in uppers else sympy.Max(*uppers)
        # Intervals that all start unbounded (or all end unbounded) nest: their union is the
        # largest of them. Anything else may leave gaps, so the hull is only a bound.
        same_open_side = all(x is None for x in lowers) or all(x is None for x in uppers)
        return KVRange(lower, upper, all(r.exact for r in ranges) and same_open_side)
    return None


def _at_tile(bound, smallest: bool):
    """The smallest (or largest) value of a monotone bound over the rows q_first .. q_last."""
    rising = direction(bound) >= 0
    row = q_first if rising == smallest else q_last
    return bound.xreplace({q_idx: row})


def schedule_for(mask, on_fallback: Callable[[str], None] = _ignore) -> TileSchedule:
    if mask is sympy.false:  # nothing is visible: visit no tile at all
        return TileSchedule(sympy.Integer(0), sympy.Integer(0), sympy.Integer(0), sympy.Integer(0), sympy.true, False)
    terms = list(mask.args) if isinstance(mask, sympy.And) else [mask]
    ranges, residual = [], []
    for term in terms:
        found = kv_range(term, on_fallback)
        if found is not None:
            ranges.append(found)
        if found is None or not found.exact:
            residual.append(term)
    lower_ends = [_at_tile(r.lower, smallest=True) for r in ranges if r.lower is not None]
    upper_ends = [_at_tile(r.upper, smallest=False) + 1 for r in ranges if r.upper is not None]
    exact = [r for r in ranges if r.exact]
    full_lower = [_at_tile(r.lower, smallest=False) for r in exact if r.lower is not None]
    full_upper = [_at_tile(r.upper, smallest=True) + 1 for r in exact if r.upper is not None]
    residual_predicate = sympy.And(*residual)
    return TileSchedule(
        kv_lo=sympy.Max(0, *lower_ends),
        kv_hi=sympy.Min(M, *upper_ends),
        full_lo=sympy.Max(0, *full_lower),
        full_hi=sympy.Min(M, *full_upper),
        residual=residual_predicate,
        table=residual_predicate is not sympy.true,
    )


@dataclass(frozen=True)
class Sparsity(Pass):
    name = "sparsity"

    def run(self, graph: Graph) -> Graph:
        def rule(node, inputs, builder):
            if not isinstance(node.op, ops.FlashAttention) or node.op.mask is sympy.true:
                return None
            schedule = schedule_for(node.op.mask, on_fallback=lambda why: self.count(f"unsolved_{why}"))
            self.count("tile_tables" if schedule.table else "closed_form_bounds")
            op = replace(node.op, schedule=schedule)
            expressions = [op.score, op.mask, *schedule.expressions(), *op.positions().values()]
            captured = captured_operands(expressions, builder.nodes)
            return builder.add(op, *inputs[:3], *captured)

        return rebuild(graph, rule)


def _tile_bounds(schedule, grids: dict, captured: dict, q_first_row: int, q_last_row: int):
    env = {**grids, "q_first": q_first_row, "q_last": q_last_row}
    lo, hi, full_lo, full_hi = (torch.as_tensor(evaluate(e, env, captured)) for e in schedule.expressions()[:4])
    return int(lo.min()), int(hi.max()), int(full_lo.max()), int(full_hi.min())


def tile_map(mask, schedule, n: int, m: int, block_m: int, block_n: int, captured=None, batch: int = 1,
             heads: int = 1) -> torch.Tensor:  # fmt: skip
    """How a schedule treats each (query tile, KV tile): 0 skipped, 1 masked (partial), 2 unmasked (full).

    Bounds are reduced over batches and heads as the PyTorch backend does; with a
    residual, the tile table (from the mask itself) refines them.
    """
    captured = captured or {}
    grids = index_grids(batch, heads, n, m, "cpu")
    rows, cols = -(-n // block_m), -(-m // block_n)
    result = torch.zeros(rows, cols, dtype=torch.int8)
    for row in range(rows):
        r0, r1 = row * block_m, min(n, (row + 1) * block_m)
        lo, hi, full_lo, full_hi = (
            (0, m, 0, 0) if schedule is None else _tile_bounds(schedule, grids, captured, r0, r1 - 1)
        )
        visible = _visible(mask, grids, captured, r0, r1) if schedule is None or schedule.table else None
        for col in range(cols):
            c0, c1 = col * block_n, min(m, (col + 1) * block_n)
            if not (c0 < hi and c1 > lo):
                continue
            full = full_lo <= c0 and c1 <= full_hi
            if visible is not None:
                tile = visible[..., c0:c1]
                if not bool(tile.any()):
                    continue
                full = full and bool(tile.all())
            result[row, col] = 2 if full else 1
    return result


def _visible(mask, grids: dict, captured: dict, r0: int, r1: int) -> torch.Tensor:
    rows = {**grids, "q_idx": grids["q_idx"][:, :, r0:r1]}
    keep = torch.as_tensor(evaluate(mask, rows, captured))
    return torch.broadcast_to(keep, (*keep.shape[:2], r1 - r0, grids["M"]))


def needed_tiles(mask, n: int, m: int, block_m: int, block_n: int, captured=None, batch: int = 1,
                 heads: int = 1) -> torch.Tensor:  # fmt: skip
    """Brute force: 0 for tiles with no visible element, 1 for some, 2 for all (any batch or head)."""
    grids = index_grids(batch, heads, n, m, "cpu")
    rows, cols = -(-n // block_m), -(-m // block_n)
    result = torch.zeros(rows, cols, dtype=torch.int8)
    for row in range(rows):
        r0, r1 = row * block_m, min(n, (row + 1) * block_m)
        visible = _visible(mask, grids, captured or {}, r0, r1)
        for col in range(cols):
            tile = visible[..., col * block_n : min(m, (col + 1) * block_n)]
            result[row, col] = 2 if bool(tile.all()) else (1 if bool(tile.any()) else 0)
    return result
