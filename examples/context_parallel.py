"""Context parallelism on CPU processes: one sequence of packed documents sharded over the ranks.

    torchrun --nproc-per-node 4 examples/context_parallel.py

Every rank builds the same whole sequence (same seed), keeps its zigzag shard, and
runs causal document attention over the whole sequence with attncc.distributed; the
mask reads the document ids of the whole sequence at global positions. Rank 0 checks
the gathered output and gradients against single-process attncc.flex_attention and
prints which (query rank, KV rank) pairs had work.
"""

import time

import torch
import torch.distributed as dist

import attncc
from attncc import distributed as cp


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 1, 8, 2, 4096, 64
    q = torch.randn(batch, heads, length, dim)
    k, v = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([1500, 700, 1200, 696]))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    local = [cp.shard(t).requires_grad_() for t in (q, k, v)]
    for _ in range(2):  # the first call compiles; time the second
        start = time.perf_counter()
        for leaf in local:
            leaf.grad = None
        o = cp.context_parallel_attention(*local, mask_mod=document_causal, enable_gqa=True)
        o.sum().backward()
    seconds = torch.tensor([time.perf_counter() - start])
    times = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(times, seconds)
    whole = [cp.unshard(t) for t in (o.detach(), *(leaf.grad for leaf in local))]
    if rank == 0:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = attncc.flex_attention(*leaves, mask_mod=document_causal, enable_gqa=True)
        expected.sum().backward()
        errors = [(a - b).abs().max().item() for a, b in zip(whole, (expected, *(t.grad for t in leaves)))]
        print(f"{world} ranks, N = {length}, zigzag shards of {length // world} positions")
        print(
            "max |error| vs one process: " + ", ".join(f"{n} {e:.1e}" for n, e in zip(("o", "dq", "dk", "dv"), errors))
        )
        print("forward + backward seconds per rank: " + ", ".join(f"{float(t):.2f}" for t in times))
    if rank == 0:
        spec = attncc.AttentionSpec(heads, dim, num_kv_heads=kv_heads, mask_mod=document_causal)
        print("pairs (query rank x KV rank):")
        for r, kinds in enumerate(cp.pair_kinds(spec, world, length)):
            print(f"  rank {r}: " + " ".join(f"{kind:8}" for kind in kinds).rstrip())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
