"""tile: choose the tile sizes (and, for GPU targets, warps and pipeline stages) of each region.

The choice depends on the target and the head dimensions only, so one generated
kernel serves every sequence length. ``block_m`` counts query rows of a tile (for
grouped-query attention the backends pack the query heads of a group as rows),
``block_n`` the keys of a KV tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import sympy

from attncc.errors import BackendError
from attncc.ir import ops
from attncc.ir.bounded import bounded
from attncc.ir.expr import kv_idx, q_idx, split_linear
from attncc.ir.graph import Graph
from attncc.ir.schedule import q_first, q_last
from attncc.ir.types import M, N
from attncc.passes.base import Pass
from attncc.passes.rewrite import rebuild

# target -> [(largest head dim, block_m, block_n, num_warps, num_stages)], first fit wins.
# pytorch: tiles of 512 x 256 keep a tile's scores (0.5 MiB per head) in cache while
# the matmuls stay large; measured on CPU against SDPA (docs/performance.md).
# pytorch, banded masks (sliding windows): query tiles of about half the band, and KV tiles wide
# enough for a query tile's whole band, so each query tile is one matmul; see band_tiles.
BANDED_PYTORCH_ROWS = (64, 256)  # smallest and largest query tile for a band
BANDED_PYTORCH_LIMIT = 1024  # bands at least this wide keep the default tiles

TILE_TABLE = {
    "pytorch": [(1 << 30, 512, 256, 0, 0)],
    # 8 warps at D <= 64: 4 spill registers in the backward kernels (sm_90 builds).
    "triton": [(64, 128, 64, 8, 3), (128, 128, 64, 8, 2), (1 << 30, 64, 32, 8, 1)],
    # cuda: block_m = 16 rows per warp; KV tiles narrow as the head dim grows, so the fp16 / bf16
    # backward keeps its accumulators in registers (no spills at the default tiles, docs/cuda.md).
    "cuda": [(64, 64, 64, 4, 2), (128, 64, 32, 4, 2), (1 << 30, 64, 16, 4, 2)],
}


def fused_kernel(node) -> str:
    """The platform's fused attention kernel that computes this region exactly, or "".

    torch's fused CPU kernel (FlashAttention's algorithm, lse included) computes a score
    of scale * q . k over one head dim, with no mask ("dense") or a causal one aligned
    top-left ("causal_top_left", any N and M) or bottom-right ("causal_bottom_right",
    the same kernel when N == M); RoPE rules it out (it takes q and k as they are). Any
    other score of the form scale * q . k + terms (ALiBi, a bias table, mods that read
    only indices and captured tensors) under any mask is "masked": short sequences run
    the kernel with the mask and terms as one float bias of N x M (docs/passes.md). The
    tile pass turns "masked" into "band" where the query tiles also share one bias.
    """
    op = node.op
    q, _, v = (operand.type for operand in node.inputs[:3])
    if op.rope is not None or q.shape[3] != v.shape[3]:
        return ""
    coefficient, terms = split_linear(op.score)
    if coefficient is None:
        return ""
    masks = {sympy.true: "dense", sympy.Le(kv_idx, q_idx): "causal_top_left",
             sympy.Le(kv_idx, M - N + q_idx): "causal_bottom_right"}  # fmt: skip
    if terms == 0 and len(node.inputs) == 3 and op.mask in masks:
        return masks[op.mask]
    return "masked"


def shift_invariant(expr) -> bool:
    """Whether expr reads q_idx and kv_idx only through kv_idx - q_idx (b, h, N, M and captured
    tensors it may read freely): then the rows of every query tile see the same pattern of
    masks and terms over keys that start at the same distance from the tile's first query."""
    distance = sympy.Symbol("distance", integer=True)
    shifted = expr.xreplace({kv_idx: q_idx + distance}).replace(
        lambda e: isinstance(e, sympy.core.relational.Relational), lambda r: r.func(sympy.expand(r.lhs - r.rhs), 0)
    )
    return q_idx not in _expanded(shifted).free_symbols


def _expanded(expr):
    """expr with every arithmetic part expanded (so that q_idx - q_idx cancels in products), booleans kept."""
    if isinstance(expr, sympy.Expr):
        return sympy.expand(expr)
    return expr.func(*map(_expanded, expr.args)) if expr.args else expr


def band_width(schedule, on_fallback: Callable[[str], None] = lambda why: None) -> int | None:
    """The number of keys a single query row may see, if the schedule is a band of constant width.

    With ``visit [lo(q_first), hi(q_last))`` and rows ``q_last = q_first + L - 1``,
    a band has ``hi - lo = L - 1 + width``; anything else (N- or M-dependent) is None,
    and so is a width sympy cannot simplify within its bounds (``on_fallback(why)`` hears of it).
    """
    if schedule is None:
        return None
    hi, lo = schedule.kv_hi, schedule.kv_lo
    hi = next((a for a in hi.args if a != M), hi) if isinstance(hi, sympy.Min) and len(hi.args) == 2 else hi
    lo = next((a for a in lo.args if a != 0), lo) if isinstance(lo, sympy.Max) and len(lo.args) == 2 else lo
    rows = sympy.Symbol("rows", integer=True, positive=True)
    width, why = bounded(sympy.simplify, (hi - lo).xreplace({q_last: q_first + rows - 1}) - rows + 1)
    if why is not None:
        on_fallback(why)
        return None
    return int(width) if width.is_Integer and width > 0 else None


def band_tiles(band: int) -> tuple[int, int]:
    """(block_m, block_n) for a band of ``band`` keys per row: the rows of a query tile see
    block_m - 1 + band keys, and block_n holds them (rounded up to 64), so the backend
    computes each query tile with one masked matmul of at most 2x the visible pairs."""
    smallest, largest = BANDED_PYTORCH_ROWS
    block_m = max(smallest, min(largest, 1 << max(0, (band // 2 - 1).bit_length())))
    return block_m, -(-(block_m - 1 + band) // 64) * 64


@dataclass(frozen=True)
class Tile(Pass):
    name = "tile"
    target: str
    block_m: int = 0
    block_n: int = 0
    num_warps: int = 0  # GPU targets: overrides the table's warps and pipeline stages
    num_stages: int = 0
    # pytorch: plain (causal) attention runs on the platform's fused kernel unless tiles are given or this is 0
    fused_kernel: int = 1
    # the backward kernels' own tiles, warps and stages (GPU targets); 0: the forward's
    bwd_block_m: int = 0
    bwd_block_n: int = 0
    bwd_num_warps: int = 0
    bwd_num_stages: int = 0

    def choose(self, head_dim: int) -> tuple[int, int, int, int]:
        if self.target not in TILE_TABLE:
            raise BackendError(f"tile: target={self.target!r} is unknown; known targets: {', '.join(TILE_TABLE)}")
        for largest, block_m, block_n, warps, stages in TILE_TABLE[self.target]:
            if head_dim <= largest:
                return (self.block_m or block_m, self.block_n or block_n, self.num_warps or warps,
                        self.num_stages or stages)  # fmt: skip
        raise AssertionError("the last row of every tile table fits any head dim")

    def run(self, graph: Graph) -> Graph:
        def rule(node, inputs, builder):
            if not isinstance(node.op, ops.FlashAttention):
                return None
            head_dim = max(int(node.inputs[0].type.shape[3]), int(node.inputs[2].type.shape[3]))
            block_m, block_n, warps, stages = self.choose(head_dim)
            band = band_width(node.op.schedule, on_fallback=lambda why: self.count(f"band_unknown_{why}"))
            banded = self.target == "pytorch" and band is not None and band < BANDED_PYTORCH_LIMIT and not self.block_m
            if banded:
                block_m, block_n = band_tiles(band)
                self.count("banded_tiles")
            self.count("regions_tiled")
            op = replace(node.op, block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
                         bwd_block_m=self.bwd_block_m, bwd_block_n=self.bwd_block_n,
                         bwd_num_warps=self.bwd_num_warps, bwd_num_stages=self.bwd_num_stages)  # fmt: skip
            if any((self.bwd_block_m, self.bwd_block_n, self.bwd_num_warps, self.bwd_num_stages)):
                self.count("backward_tiles")
            explicit_tiles = self.block_m or self.block_n
            kernel = fused_kernel(node) if self.target == "pytorch" and self.fused_kernel and not explicit_tiles else ""
            if kernel == "masked" and banded and all(shift_invariant(e) for e in (op.mask, split_linear(op.score)[1])):
                kernel = "band"  # the band's inner query tiles share one bias: one kernel call for them all
            if kernel:
                op = replace(op, fused_kernel=kernel)
                self.count("fused_kernel")
            return builder.add(op, *inputs)

        return rebuild(graph, rule)
