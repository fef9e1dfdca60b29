"""Per-rank forward time of context-parallel attention, for both layouts: how even is the work?

    torchrun --nproc-per-node 4 examples/context_parallel_balance.py --length 65536

For a causal mask and a causal 4K window, each rank times its forward pass (after one
short call that compiles the program) with one thread: the CPU seconds its process spent
(its share of the work; waiting for another rank's shard costs none) and the wall
seconds of the call (a rank returns once the ranks it sends to have received, so
the slowest rank sets them all). Rank 0 prints both and the ratio of the busiest
rank's CPU seconds to the idlest's.
"""

import argparse
import time

import torch
import torch.distributed as dist
from tabulate import tabulate

import attncc
from attncc import distributed as cp


def timed_forward(spec, q, k, v, layout: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of this rank's forward call, after a short one that compiles the program."""
    short = [cp.shard(t[:, :, : 8 * dist.get_world_size()], layout=layout) for t in (q, k, v)]
    cp.context_parallel_attention(*short, spec=spec, layout=layout)
    local = [cp.shard(t, layout=layout) for t in (q, k, v)]
    dist.barrier()
    cpu, wall = time.process_time(), time.perf_counter()
    cp.context_parallel_attention(*local, spec=spec, layout=layout)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=4096)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.length, args.head_dim, generator=generator) for _ in range(3))
    specs = {
        "causal": attncc.AttentionSpec(args.heads, args.head_dim, causal=True),
        f"window {args.window}": attncc.AttentionSpec(args.heads, args.head_dim, causal=True, window=(args.window, 0)),
    }
    rows = []
    for name, spec in specs.items():
        for layout in cp.LAYOUTS:
            times = [None] * world
            dist.all_gather_object(times, timed_forward(spec, q, k, v, layout))
            cpu = [t[0] for t in times]
            wall = max(t[1] for t in times)
            rows.append([name, layout, *(f"{c:.2f}" for c in cpu), f"{max(cpu) / min(cpu):.2f}", f"{wall:.2f}"])
    if rank == 0:
        print(f"N = {args.length}, heads = {args.heads}, head_dim = {args.head_dim}, {world} processes, forward")
        headers = ["mask", "layout", *(f"rank {r} CPU s" for r in range(world)), "max / min", "wall s (slowest)"]
        print(tabulate(rows, headers=headers))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
