"""A symbolic cost model: FLOPs, bytes moved and peak intermediate memory as sympy formulas.

Formulas are in the graph's symbols (B, N, M and the fixed heads and head dims).
Bytes count what an op-by-op execution reads and writes; a flash_attention region
reads q once, K and V once per query tile, and writes o and lse. Peak intermediate
memory is the largest total size of the values alive at once (inputs excluded),
with a region counted as its working set for one query tile across all batches
and heads: scores and weights of a tile, the accumulators, o and lse. ``T`` (the
input dtype) takes ``dtype_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
from tabulate import tabulate

from attncc.ir import ops
from attncc.ir.graph import Graph
from attncc.ir.types import B, M, N, TensorType

DTYPE_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "u8": 1, "i8": 1, "i16": 2, "i32": 4, "i64": 8, "bool": 1}
SOFTMAX_FLOPS = 5  # max, subtract, exp, sum, divide per element
LOGSUMEXP_FLOPS = 4


@dataclass(frozen=True)
class Cost:
    flops: sympy.Expr
    bytes: sympy.Expr
    peak_memory: sympy.Expr

    def at(self, sizes: dict) -> Cost:
        """The cost with the named symbols (``N``, ``M``, a captured tensor's ``doc_d0``) set to sizes."""

        def bind(expr):
            expr = sympy.sympify(expr)
            return expr.xreplace({s: sympy.Integer(sizes[s.name]) for s in expr.free_symbols if s.name in sizes})

        return Cost(*(bind(e) for e in (self.flops, self.bytes, self.peak_memory)))


def numel(t: TensorType) -> sympy.Expr:
    return sympy.Mul(*t.shape)


def nbytes(t: TensorType, dtype_bytes: int) -> sympy.Expr:
    return numel(t) * DTYPE_BYTES.get(t.dtype, dtype_bytes)


def expression_flops(expr) -> int:
    return max(1, int(sympy.count_ops(expr)))


def _region(node, dtype_bytes: int):
    op = node.op
    q, k, v = (i.type for i in node.inputs[:3])
    batch, heads, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    scores = batch * heads * n * m
    elementwise = expression_flops(op.score) + expression_flops(op.mask) + SOFTMAX_FLOPS
    flops = 2 * scores * d + 2 * scores * dv + scores * elementwise
    tiles = sympy.ceiling(n / op.block_m) if op.block_m else 1
    reads = nbytes(q, dtype_bytes) + (nbytes(k, dtype_bytes) + nbytes(v, dtype_bytes)) * tiles
    writes = nbytes(node.type, 4) + batch * heads * n * 4
    rows = sympy.Min(n, op.block_m) if op.block_m else n
    cols = sympy.Min(m, op.block_n) if op.block_n else m
    working_set = batch * heads * rows * (2 * cols + dv + 2) * 4
    return flops, reads + writes, working_set


def _linear_region(node, dtype_bytes: int):
    """A linear_attention region: O(N) in time and memory, a [D, Dv + 1] state per head.

    Feature maps of q and k, the state phi(K)^T [V 1], every query reading it, and, in
    the chunked form, each query against the ``chunk`` keys of its own chunk.
    """
    op = node.op
    q, k, v = (i.type for i in node.inputs)
    batch, heads, n, d = q.shape
    kv_heads, m, dv = k.shape[1], k.shape[2], v.shape[3]
    phi = expression_flops(op.phi)
    flops = phi * (numel(q) + numel(k)) + 2 * batch * kv_heads * m * d * (dv + 1) + 2 * batch * heads * n * d * (dv + 1)
    scores = 0
    if op.form == "chunked":
        flops += 2 * batch * heads * n * op.chunk * (d + dv + 1)
        scores = batch * heads * op.chunk * op.chunk * 4
    moved = nbytes(q, dtype_bytes) + nbytes(k, dtype_bytes) + nbytes(v, dtype_bytes) + nbytes(node.type, 4)
    working_set = batch * heads * d * (dv + 1) * 4 + scores
    return flops, moved, working_set


def node_cost(node, dtype_bytes: int) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """(flops, bytes moved, transient working set beyond the node's result)."""
    op = node.op
    if isinstance(op, (ops.Input, ops.Output, ops.LseOf)):
        return sympy.Integer(0), sympy.Integer(0), sympy.Integer(0)
    if isinstance(op, ops.FlashAttention):
        return _region(node, dtype_bytes)
    if isinstance(op, ops.LinearAttention):
        return _linear_region(node, dtype_bytes)
    out = numel(node.type)
    moved = nbytes(node.type, dtype_bytes) + sum(nbytes(i.type, dtype_bytes) for i in node.inputs[:2])
    if isinstance(op, ops.Matmul):
        a = node.inputs[0].type
        return 2 * out * a.shape[3], moved, sympy.Integer(0)
    if isinstance(op, ops.RepeatKV):
        return sympy.Integer(0), moved, sympy.Integer(0)
    if isinstance(op, ops.Softmax):
        return SOFTMAX_FLOPS * out, moved, sympy.Integer(0)
    if isinstance(op, ops.LogSumExp):
        return LOGSUMEXP_FLOPS * numel(node.inputs[0].type), moved, sympy.Integer(0)
    if isinstance(op, ops.NormalizeRows):
        return 2 * out, moved, sympy.Integer(0)  # row sum and divide
    expressions = [getattr(op, name) for name in ("expr", "predicate", "slope", "phi") if hasattr(op, name)]
    return out * (expression_flops(expressions[0]) if expressions else 1), moved, sympy.Integer(0)


def graph_cost(graph: Graph, dtype_bytes: int = 2) -> Cost:
    last_use = {}
    for position, node in enumerate(graph.nodes):
        for operand in node.inputs:
            last_use[operand] = position
    flops = bytes_moved = sympy.Integer(0)
    live: dict = {}
    peaks = []
    for position, node in enumerate(graph.nodes):
        node_flops, node_bytes, transient = node_cost(node, dtype_bytes)
        flops += node_flops
        bytes_moved += node_bytes
        if node.type is not None and not isinstance(node.op, ops.Input):
            live[node] = nbytes(node.type, dtype_bytes)
        peaks.append(sum(live.values(), sympy.Integer(0)) + transient)
        live = {n: size for n, size in live.items() if last_use.get(n, len(graph.nodes)) > position}
    return Cost(sympy.expand(flops), sympy.expand(bytes_moved), sympy.Max(*peaks))


def parse_sizes(text: str, flag: str = "--cost") -> dict:
    """``N=8192,M=8192`` -> {"N": 8192, "M": 8192}; B defaults to 1. ``flag`` names the option in errors."""
    sizes = {"B": 1}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not value.strip().isdigit():
            from attncc.errors import AttnccError

            raise AttnccError(f"{flag} item {item!r} is invalid: write NAME=INTEGER, e.g. N=8192,M=8192")
        sizes[key.strip()] = int(value)
    return sizes


def _human(value, unit: str) -> str:
    value = float(value)
    scale = 1024.0 if unit == "B" else 1000.0
    prefixes = ["", "K", "M", "G", "T", "P"] if unit != "B" else ["", "Ki", "Mi", "Gi", "Ti", "Pi"]
    index = 0
    while abs(value) >= scale and index < len(prefixes) - 1:
        value /= scale
        index += 1
    return f"{value:.3g} {prefixes[index]}{unit}"


def visited_fraction(op, n: int, m: int) -> float | None:
    """The fraction of the N x M scores a flash_attention region's schedule visits at these sizes.

    Query tiles of ``block_m`` rows (single rows before the tile pass) visit the keys
    ``[kv_lo, kv_hi)`` of their bounds, rounded down to a multiple of ``block_n`` as the
    aligned tile grid does. None without a schedule, or when the bounds read a batch,
    a head or a captured tensor (their values are only known at call time).
    """
    from attncc.interpreter import evaluate  # the interpreter imports the IR, not this module

    schedule = op.schedule
    if schedule is None:
        return None
    bounds = (schedule.kv_lo, schedule.kv_hi)
    if any(e.atoms(sympy.Indexed) or {str(s) for s in e.free_symbols} - {"q_first", "q_last", "N", "M"} for e in bounds):
        return None
    rows = op.block_m or 1
    starts = torch.arange(0, n, rows)
    lasts = torch.clamp(starts + rows, max=n) - 1
    env = {"q_first": starts, "q_last": lasts, "N": n, "M": m}
    lo, hi = (torch.broadcast_to(torch.as_tensor(evaluate(e, env, {}), dtype=torch.float64), starts.shape)
              for e in bounds)  # fmt: skip
    lo, hi = lo.clamp(0, m), hi.clamp(0, m)
    if op.block_n:
        lo = torch.floor(lo / op.block_n) * op.block_n
    visited = ((lasts - starts + 1) * (hi - lo).clamp(min=0)).sum()
    return float(visited) / (n * m)


def scheduled_flops(graph: Graph, sizes: dict, dtype_bytes: int = 2, cost: Cost | None = None) -> float:
    """The graph's FLOPs at concrete sizes, each region's counted over the scores its schedule visits.

    ``cost``: the graph's ``graph_cost(...).at(sizes)``, when the caller has it already.
    """
    total = float((cost or graph_cost(graph, dtype_bytes).at(sizes)).flops)
    values = {sympy.Symbol(k, integer=True, positive=True): v for k, v in sizes.items()}
    for node in graph.nodes_of(ops.FlashAttention):
        n, m = (int(sympy.sympify(node.inputs[i].type.shape[2]).subs(values)) for i in (0, 1))
        fraction = visited_fraction(node.op, n, m)
        if fraction is not None:
            total -= float(node_cost(node, dtype_bytes)[0].subs(values)) * (1 - fraction)
    return total


def cost_table(stages: list[tuple[str, Graph]], sizes: dict, dtype_bytes: int = 2) -> str:
    """A table of each stage's cost at concrete sizes (stages: (label, graph) pairs).

    FLOPs of a fused region with a schedule count the scores it visits (``scheduled_flops``).
    """
    rows = []
    for label, graph in stages:
        cost = graph_cost(graph, dtype_bytes).at(sizes)
        flops = scheduled_flops(graph, sizes, dtype_bytes, cost)
        rows.append([label, _human(flops, "FLOP"), _human(cost.bytes, "B"), _human(cost.peak_memory, "B")])
    return tabulate(rows, headers=["after", "FLOPs", "bytes moved", "peak intermediate memory"])


__all__ = ["B", "M", "N", "Cost", "cost_table", "graph_cost", "parse_sizes", "scheduled_flops", "visited_fraction"]
