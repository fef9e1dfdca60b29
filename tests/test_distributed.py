"""Context parallelism on 2 and 4 gloo processes: shards against the float64 attention of the whole sequence.

Each world size starts one process group for the module; every case runs on every rank,
which checks its own output shard and gradients against the reference of the whole
sequence (computed on every rank, from the same seeds) and reports back.
"""

from __future__ import annotations

import datetime
import json
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attncc
from attncc import distributed as cp
from attncc import parallel_cost
from tests.reference import dense_attention
from tests.test_triton import requires_triton

TIMEOUT = datetime.timedelta(seconds=30)


def _qkv(seed, batch, heads, kv_heads, length, dim, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, length, dim, generator=generator).to(dtype)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def _close(actual, expected, tolerance, what):
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=tolerance, rtol=tolerance, msg=lambda m: f"{what}: {m}"
    )


def check_attention(seed, shape, layout, reference, *, dtype=torch.float32, tolerance=1e-5, **call):
    """One rank's output, lse and q/k/v gradients against autograd through the float64 reference."""
    batch, heads, kv_heads, length, dim = shape
    q, k, v = _qkv(seed, batch, heads, kv_heads, length, dim, dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    weight_o, weight_lse = (
        torch.randn(batch, heads, length, dim, generator=generator),
        torch.randn(batch, heads, length, generator=generator),
    )
    local = [cp.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
    o, lse = cp.context_parallel_attention(*local, layout=layout, return_lse=True, **call)
    loss = (o.float() * cp.shard(weight_o, layout=layout)).sum()
    loss = loss + (torch.where(lse.isinf(), 0.0, lse) * cp.shard(weight_lse, layout=layout)).sum()
    loss.backward()
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_o, ref_lse = dense_attention(*leaves, **reference)
    ((ref_o * weight_o).sum() + (torch.where(ref_lse.isinf(), 0.0, ref_lse) * weight_lse).sum()).backward()
    assert o.dtype == dtype and lse.dtype == torch.float32
    _close(o, cp.shard(ref_o, layout=layout), tolerance, "o")
    _close(lse, cp.shard(ref_lse, layout=layout), 1e-5, "lse")
    assert torch.equal(torch.isinf(lse), cp.shard(torch.isinf(ref_lse), layout=layout))
    for name, leaf, ref in zip("qkv", local, leaves):
        _close(leaf.grad, cp.shard(ref.grad, layout=layout), 2e-5 if dtype == torch.float32 else tolerance, f"d{name}")
    return o


def case_causal_zigzag_gqa():
    check_attention(
        1, (2, 4, 2, 37, 16), "zigzag", {"causal": True}, spec=attncc.AttentionSpec(4, 16, num_kv_heads=2, causal=True)
    )


def case_causal_contiguous():
    mask = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx  # noqa: E731
    check_attention(2, (1, 2, 2, 41, 8), "contiguous", {"causal": True}, mask_mod=mask)


def case_sliding_window_both_layouts():
    spec = attncc.AttentionSpec(2, 8, causal=True, window=(5, 0))
    for layout in cp.LAYOUTS:
        check_attention(3, (1, 2, 2, 48, 8), layout, {"causal": True, "window": (5, 0)}, spec=spec)


def case_documents_with_global_ids_and_all_gather():
    lengths = torch.tensor([9, 14, 3, 20, 6])
    doc = torch.repeat_interleave(torch.arange(5), lengths)

    def mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    for exchange in cp.KV_EXCHANGES:
        check_attention(4, (1, 2, 1, 52, 8), "zigzag", {"mask_mod": mask}, mask_mod=mask, enable_gqa=True,
                        kv_exchange=exchange)  # fmt: skip


def case_alibi_and_bidirectional_window():
    spec = attncc.AttentionSpec(3, 8, alibi=True, window=(4, 7))
    check_attention(5, (1, 3, 3, 45, 8), "contiguous", {"alibi": True, "window": (4, 7)}, spec=spec)
    check_attention(5, (1, 3, 3, 45, 8), "zigzag", {"alibi": True, "window": (4, 7)}, spec=spec)


def case_score_mod_with_trainable_bias_table():
    table = torch.randn(2, 9, generator=torch.Generator().manual_seed(6)).requires_grad_()
    reference_table = table.detach().double().requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, (kv_idx - q_idx).clamp(-4, 4) + 4]

    def reference_mod(score, b, h, q_idx, kv_idx):
        return score + reference_table[h, (kv_idx - q_idx).clamp(-4, 4) + 4]

    check_attention(7, (1, 2, 2, 30, 8), "zigzag", {"score_mod": reference_mod, "causal": True}, score_mod=score_mod,
                    mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx)  # fmt: skip
    _close(table.grad, reference_table.grad, 2e-5, "d table")


def case_no_mask_and_tiny_shards():
    """Plain attention (the program reads no position) on shards of one or two positions."""
    check_attention(13, (1, 2, 2, 2 * dist.get_world_size() + 1, 8), "zigzag", {}, spec=attncc.AttentionSpec(2, 8))


def case_queries_and_keys_of_different_lengths():
    """Two sharded sequences (N = 26 queries, M = 35 keys): causal aligns at the bottom right of the global lengths."""
    generator = torch.Generator().manual_seed(16)
    q, k, v = torch.randn(1, 2, 26, 8, generator=generator), *torch.randn(2, 1, 2, 35, 8, generator=generator)
    local = [cp.shard(t).requires_grad_() for t in (q, k, v)]
    o = cp.context_parallel_attention(*local, spec=attncc.AttentionSpec(2, 8, causal=True))
    o.sum().backward()
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected, _ = dense_attention(*leaves, causal=True)
    expected.sum().backward()
    _close(o, cp.shard(expected), 1e-5, "o")
    for name, leaf, ref in zip("qkv", local, leaves):
        _close(leaf.grad, cp.shard(ref.grad), 2e-5, f"d{name}")


def case_bfloat16():
    spec = attncc.AttentionSpec(2, 16, causal=True)
    check_attention(8, (1, 2, 2, 40, 16), "zigzag", {"causal": True}, dtype=torch.bfloat16, tolerance=8e-3, spec=spec)


def case_unshard_inverts_shard():
    x = torch.randn(2, 3, 23, 5, generator=torch.Generator().manual_seed(12))
    for layout in cp.LAYOUTS:
        for dim in (2, 1, -1):
            assert torch.equal(cp.unshard(cp.shard(x, layout=layout, dim=dim), layout=layout, dim=dim), x)


def _expect_error(call, *fragments):
    try:
        call()
    except cp.DistributedError as error:
        for fragment in fragments:
            assert fragment in str(error), str(error)
        return
    raise AssertionError("no DistributedError")


def case_mismatched_inputs_fail_on_every_rank():
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = attncc.AttentionSpec(2, 8, causal=True)
    q, k, v = (cp.shard(t) for t in _qkv(9, 1, 2, 2, 32, 8))
    layouts = "contiguous" if rank == world - 1 else "zigzag"
    _expect_error(lambda: cp.context_parallel_attention(q, k, v, spec=spec, layout=layouts), "different layout",
                  f"rank {world - 1}: 'contiguous'")  # fmt: skip
    short = q[:, :, 1:] if rank == 1 else q
    _expect_error(lambda: cp.context_parallel_attention(short, k, v, spec=spec), "query shards of lengths",
                  "not a 'zigzag' sharding")  # fmt: skip
    name = "diagonal" if rank == 0 else "zigzag"
    _expect_error(lambda: cp.context_parallel_attention(q, k, v, spec=spec, layout=name), "rank 0 of the group",
                  "layout='diagonal' is invalid")  # fmt: skip
    wrong = q.double() if rank == 1 else q
    _expect_error(lambda: cp.context_parallel_attention(wrong, k, v, spec=spec), "rank 1 of the group", "float64")
    _expect_error(lambda: cp.unshard(q[:, :, : 1 + 2 * rank]), "not a 'zigzag' sharding")
    _expect_error(lambda: cp.shard(q, group="world"), "ProcessGroup or None is allowed")
    first_only = dist.new_group([0])
    if rank != 0:
        _expect_error(lambda: cp.context_parallel_attention(q, k, v, spec=spec, group=first_only), "not a member")
    other = attncc.AttentionSpec(2, 8, causal=rank == 0)
    _expect_error(lambda: cp.context_parallel_attention(q, k, v, spec=other), "different program")


def case_attention_module():
    torch.manual_seed(10)
    serial = attncc.nn.Attention(32, 4, num_kv_heads=2, causal=True, rope=True)
    parallel = attncc.nn.Attention(
        32, 4, num_kv_heads=2, causal=True, rope=True, context_parallel_group=dist.group.WORLD
    )
    parallel.load_state_dict(serial.state_dict())
    x = torch.randn(2, 29, 32, generator=torch.Generator().manual_seed(11))
    expected = serial(x)
    expected.sum().backward()
    out = parallel(cp.shard(x, dim=1))
    out.sum().backward()
    _close(out, cp.shard(expected.detach(), dim=1), 2e-5, "module output")
    for (name, p), q in zip(parallel.named_parameters(), serial.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        _close(grad, q.grad, 5e-5, f"d{name}")


CASES = {name: fn for name, fn in globals().items() if name.startswith("case_")}


def _worker(rank: int, world: int, init: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=TIMEOUT)
    torch.set_num_threads(1)
    outcome, durations = {}, {}
    for name, case in CASES.items():
        try:
            start = time.perf_counter()
            case()
            outcome[name] = "ok"
            durations[name] = time.perf_counter() - start
        except Exception:  # noqa: BLE001 - every failure is reported to the test
            outcome[name] = traceback.format_exc()
    with open(f"{results}.{rank}", "w") as file:
        json.dump({"outcome": outcome, "seconds": durations}, file)
    dist.destroy_process_group()


def _run_world(world: int, tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp(f"world{world}")
    results = str(folder / "results")
    mp.start_processes(_worker, args=(world, f"file://{folder / 'store'}", results), nprocs=world,
                       start_method="fork")  # fmt: skip
    outcomes = []
    for rank in range(world):
        with open(f"{results}.{rank}") as file:
            outcomes.append(json.load(file)["outcome"])
    return outcomes


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    return {world: _run_world(world, tmp_path_factory) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_context_parallel(worlds, world, case):
    failures = [f"rank {rank}:\n{outcome[case]}" for rank, outcome in enumerate(worlds[world]) if outcome[case] != "ok"]
    assert not failures, "\n".join(failures)


def test_window_pairs_are_neighbours_and_causal_pairs_skip_the_future():
    """A window narrower than a shard: only the diagonal and the previous shard have work."""
    window = cp.pair_kinds(attncc.AttentionSpec(2, 8, causal=True, window=(5, 0)), 4, 64, layout="contiguous")
    assert window == [
        ["partial", "empty", "empty", "empty"],
        ["partial", "partial", "empty", "empty"],
        ["empty", "partial", "partial", "empty"],
        ["empty", "empty", "partial", "partial"],
    ]
    causal = cp.pair_kinds(attncc.AttentionSpec(2, 8, causal=True), 4, 64, layout="contiguous")
    assert causal == [["partial" if q == kv else "full" if kv < q else "empty" for kv in range(4)] for q in range(4)]
    zigzag = cp.pair_kinds(attncc.AttentionSpec(2, 8, causal=True), 4, 64)
    assert all(kind != "empty" for row in zigzag for kind in row)  # every rank holds an early and a late chunk


def test_chunks_follow_tensor_split():
    assert cp.chunk_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    for length in (8, 13):
        for layout in cp.LAYOUTS:
            blocks = [cp.rank_blocks(length, layout, 4, r) for r in range(4)]
            starts = sorted(b.start for rank in blocks for b in rank)
            assert sum(b.length for rank in blocks for b in rank) == length and starts[0] == 0
    assert [b.start for b in cp.rank_blocks(16, "zigzag", 4, 1)] == [2, 12]


def test_sharded_program_reads_global_positions_from_shard():
    text = str(attncc.compile(attncc.AttentionSpec(2, 8, causal=True), sharded=True).unoptimized_graph)
    assert "%shard: i64[shard_d0]" in text
    assert "kv_idx + shard[1] <= q_idx + shard[0] - shard[2] + shard[3]" in text


def test_reserved_captured_name_is_rejected():
    shard = torch.zeros(8, dtype=torch.long)
    spec = attncc.AttentionSpec(2, 8, mask_mod=lambda b, h, q_idx, kv_idx: shard[q_idx] == shard[kv_idx])
    with pytest.raises(attncc.ModError, match="'shard' is reserved"):
        attncc.compile(spec, sharded=True)


def test_calls_without_a_process_group_fail_clearly():
    with pytest.raises(cp.DistributedError, match="init_process_group"):
        cp.shard(torch.zeros(1, 1, 4, 2))


def test_cost_model_counts_visible_scores_per_rank_pair():
    causal = attncc.AttentionSpec(2, 8, causal=True)
    lo, hi = parallel_cost.row_intervals(causal, 8)
    assert lo.tolist() == [0] * 8 and hi.tolist() == list(range(1, 9))
    assert parallel_cost.visible_scores(lo, hi, 2, "contiguous").tolist() == [[10, 0], [16, 10]]
    assert parallel_cost.visible_scores(lo, hi, 2, "zigzag").tolist() == [[10, 8], [8, 10]]
    lo, hi = parallel_cost.row_intervals(causal, 8, documents=[3, 5])
    assert lo.tolist() == [0, 0, 0, 3, 3, 3, 3, 3] and hi.tolist() == list(range(1, 9))
    with pytest.raises(attncc.SpecError, match="documents sum to 7"):
        parallel_cost.row_intervals(causal, 8, documents=[3, 4])


def test_cost_model_window_needs_two_steps_and_a_fast_enough_link():
    spec = attncc.AttentionSpec(2, 8, causal=True, window=(5, 0))
    lo, hi = parallel_cost.row_intervals(spec, 64)
    fast = parallel_cost.ring_cost(spec, lo, hi, 4, "contiguous", parallel_cost.Link("fast", 1e12, 1e12))
    slow = parallel_cost.ring_cost(spec, lo, hi, 4, "contiguous", parallel_cost.Link("slow", 1e12, 1e6))
    assert fast.steps_with_work == 2 and fast.hidden and not slow.hidden
    assert fast.shard_bytes == 2 * 16 * 16 * 2  # KV heads x positions x (D + Dv) x 2 bytes
    # rows see 6 keys (rank 0's first five rows 1..5): 96 or 81 scores, 2 heads x 2 (D + Dv) FLOPs each
    assert fast.flops_max == 96 * 64 and fast.flops_min == 81 * 64


@pytest.mark.parametrize("backend", ["pytorch", pytest.param("triton", marks=requires_triton)])
def test_block_pairs_merge_and_differentiate_to_whole_attention(backend):
    """What each rank does, in one process: sharded programs on block pairs, merged; backward from the merged lse."""
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([7, 9, 8]))

    def mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    program = attncc.compile(
        attncc.AttentionSpec(4, 16, num_kv_heads=2, mask_mod=mask, alibi=True), backend, sharded=True
    )
    q, k, v = _qkv(14, 1, 4, 2, 24, 16)
    labels = [node.op.label for node in program.graph.captured]

    def inputs(q_block, kv_block):
        values = {"doc": doc, "shard": torch.tensor([q_block.start, kv_block.start, 24, 24])}
        return [values[label] for label in labels]

    blocks = (slice(0, 10), slice(10, 24))
    merged = []
    for qb in blocks:
        parts = [program.op(q[:, :, qb].contiguous(), k[:, :, kb], v[:, :, kb], inputs(qb, kb)) for kb in blocks]
        merged.append(attncc.merge_attention_states(*zip(*parts)))
    o, lse = torch.cat([m[0] for m in merged], 2), torch.cat([m[1] for m in merged], 2)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_o, ref_lse = dense_attention(*leaves, mask_mod=mask, alibi=True)
    grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(15))
    ref_o.backward(grad_o.double())
    _close(o, ref_o, 1e-5, "o")
    _close(lse, ref_lse, 1e-5, "lse")
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for qb in blocks:
        for kb in blocks:
            tensors = [t[:, :, qb].contiguous() for t in (q,)] + [k[:, :, kb].contiguous(), v[:, :, kb].contiguous()]
            row = [t[:, :, qb].contiguous() for t in (o, lse, grad_o)]
            dq, dk, dv, _ = program.backward_op(*tensors, *row, torch.zeros_like(row[1]), inputs(qb, kb), [])
            grads[0][:, :, qb] += dq
            grads[1][:, :, kb] += dk
            grads[2][:, :, kb] += dv
    for name, grad, leaf in zip("qkv", grads, leaves):
        _close(grad, leaf.grad, 2e-5, f"d{name}")
