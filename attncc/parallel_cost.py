"""The cost of context-parallel attention per rank: FLOPs, bytes sent per ring step, and whether the transfer hides.

Each query row sees the keys ``[lo, hi)`` that the program's sparsity schedule gives a
one-row query tile (exact for closed-form masks: causal, windows, prefixes), cut to
its document when ``documents`` lists the lengths of packed documents. Per (query
rank, KV rank) pair this counts the visible scores; a pair without one is skipped and
its KV shard not sent. At ring step s rank r computes its queries against the shard of
rank r - s while the shard of step s + 1 arrives, so the transfer hides when it takes
no longer than the step's computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
from tabulate import tabulate

from attncc.api import compile
from attncc.distributed import LAYOUTS, rank_blocks
from attncc.errors import SpecError
from attncc.interpreter import evaluate
from attncc.ir import ops
from attncc.spec import AttentionSpec

BACKWARD_MATMULS = 5  # the backward's recomputed QK^T, dV, dP, dQ, dK against the forward's two


@dataclass(frozen=True)
class Link:
    """A device's attention throughput and the bandwidth of its ring link, for the hiding estimate."""

    name: str
    flops_per_second: float
    bytes_per_second: float


def row_intervals(
    spec: AttentionSpec, length: int, documents: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lo, hi`` [length]: the keys ``[lo, hi)`` each query row of a self-attention of ``length`` positions sees."""
    region = compile(spec).graph.nodes_of(ops.FlashAttention)
    schedule = region[0].op.schedule if region else None
    rows = torch.arange(length)
    if schedule is None:
        lo, hi = torch.zeros(length, dtype=torch.long), torch.full((length,), length)
    else:
        if schedule.table or any(e.atoms(sympy.Indexed) for e in schedule.expressions()[:2]):
            raise SpecError("the cost model needs a mask whose key range has a closed form (no captured tensors)")
        env = {"q_first": rows, "q_last": rows, "N": length, "M": length, "b": 0, "h": 0}
        lo, hi = (
            torch.broadcast_to(torch.as_tensor(evaluate(e, env, {})), rows.shape) for e in schedule.expressions()[:2]
        )
    if documents is not None:
        if sum(documents) != length:
            raise SpecError(f"documents sum to {sum(documents)} positions; the sequence has {length}")
        ends = torch.cumsum(torch.tensor(documents), 0)
        end = torch.repeat_interleave(ends, torch.tensor(documents))
        start = end - torch.repeat_interleave(torch.tensor(documents), torch.tensor(documents))
        lo, hi = torch.maximum(lo, start), torch.minimum(hi, end)
    return lo.long(), hi.long()


def visible_scores(lo, hi, world: int, layout: str) -> torch.Tensor:
    """[world, world]: the visible scores of each (query rank, KV rank) pair, per batch and head."""
    length = lo.shape[0]
    blocks = [rank_blocks(length, layout, world, r) for r in range(world)]
    counts = torch.zeros(world, world, dtype=torch.float64)
    for q_rank in range(world):
        for qb in blocks[q_rank]:
            row_lo, row_hi = lo[qb.start : qb.start + qb.length], hi[qb.start : qb.start + qb.length]
            for kv_rank in range(world):
                for kb in blocks[kv_rank]:
                    seen = torch.minimum(row_hi, torch.tensor(kb.start + kb.length)) - torch.maximum(
                        row_lo, torch.tensor(kb.start)
                    )
                    counts[q_rank, kv_rank] += seen.clamp(min=0).sum()
    return counts


@dataclass(frozen=True)
class RankCost:
    layout: str
    world: int
    flops_max: float
    flops_min: float
    shard_bytes: float
    steps_with_work: int
    hidden: bool
    worst_ratio: float


def ring_cost(spec: AttentionSpec, lo, hi, world: int, layout: str, link: Link, batch: int = 1,
              dtype_bytes: int = 2) -> RankCost:  # fmt: skip
    """Forward cost per rank.

    ``worst_ratio``: the largest ratio of a KV transfer's time to the computation it
    overlaps (the rank's previous step with work); at most 1 means every transfer hides.
    ``steps_with_work``: ring steps at which some rank computes (the others are skipped).
    """
    counts = visible_scores(lo, hi, world, layout)
    per_score = batch * spec.num_heads * 2 * (spec.head_dim + spec.v_head_dim)
    flops = counts.sum(dim=1) * per_score
    length = lo.shape[0]
    shard_bytes = batch * spec.num_kv_heads * (length / world) * (spec.head_dim + spec.v_head_dim) * dtype_bytes
    transfer = shard_bytes / link.bytes_per_second
    worst = 0.0
    for r in range(world):
        # Step s brings rank r the shard of rank r - s; its transfer runs during the previous step with work.
        work = [float(counts[r, (r - step) % world]) * per_score for step in range(world)]
        previous = work[0]
        for step in range(1, world):
            if work[step] > 0:
                worst = max(worst, transfer * link.flops_per_second / previous if previous > 0 else float("inf"))
                previous = work[step]
    steps = sum(any(counts[r, (r - step) % world] > 0 for r in range(world)) for step in range(world))
    return RankCost(layout, world, float(flops.max()), float(flops.min()), shard_bytes, steps, worst <= 1.0, worst)


def _human(value: float, unit: str, scale: float = 1000.0) -> str:
    prefixes = ["", "K", "M", "G", "T", "P", "E"] if scale == 1000.0 else ["", "Ki", "Mi", "Gi", "Ti"]
    index = 0
    while abs(value) >= scale and index < len(prefixes) - 1:
        value /= scale
        index += 1
    return f"{value:.3g} {prefixes[index]}{unit}"


def cost_table(cases: dict[str, tuple[AttentionSpec, list[int] | None]], length: int, worlds, links: dict[int, Link],
               batch: int = 1, dtype_bytes: int = 2) -> str:  # fmt: skip
    """A table of ``ring_cost`` for each named (spec, documents) case, world size and layout.

    ``links[world]`` is the link the ring runs over at that world size.
    """
    rows = []
    for name, (spec, documents) in cases.items():
        lo, hi = row_intervals(spec, length, documents)
        for world in worlds:
            for layout in LAYOUTS:
                cost = ring_cost(spec, lo, hi, world, layout, links[world], batch, dtype_bytes)
                compute = cost.flops_max / links[world].flops_per_second
                rows.append([
                    name, world, layout, _human(cost.flops_max, "FLOP"), f"{cost.flops_max / max(cost.flops_min, 1):.2f}",
                    f"{compute * 1000:.3g} ms", _human(cost.shard_bytes, "B", 1024.0), cost.steps_with_work,
                    f"{cost.worst_ratio:.2g}", "yes" if cost.hidden else "no",
                ])  # fmt: skip
    headers = ["mask", "ranks", "layout", "FLOPs / rank (max)", "max / min", "compute / rank", "KV sent / step",
               "steps with work", "transfer / compute", "hidden"]  # fmt: skip
    return tabulate(rows, headers=headers)


def packed_documents(length: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """Lengths of documents drawn uniformly from [shortest, longest) and packed into ``length`` positions."""
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < length:
        lengths.append(int(torch.randint(shortest, longest, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - length
    return lengths


def main() -> None:
    """The table of docs/distributed.md: Llama-3-8B attention over 1M tokens on 8 to 64 ranks."""
    length = 1 << 20
    shape = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128}
    cases = {
        "causal": (AttentionSpec(**shape, causal=True), None),
        "window 4K": (AttentionSpec(**shape, causal=True, window=(4096, 0)), None),
        "documents": (AttentionSpec(**shape, causal=True), packed_documents(length, 1024, 65536)),
    }
    nvlink = Link("NVLink", 400e12, 450e9)
    infiniband = Link("InfiniBand", 400e12, 50e9)
    print(cost_table(cases, length, (8, 16, 32, 64), {8: nvlink, 16: infiniband, 32: infiniband, 64: infiniband}))


__all__ = ["Link", "RankCost", "cost_table", "packed_documents", "ring_cost", "row_intervals", "visible_scores"]


if __name__ == "__main__":
    main()
