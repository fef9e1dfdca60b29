"""Context parallelism: attention over sequences sharded across the ranks of a ``torch.distributed`` group.

``shard`` splits a sequence into one shard per rank; ``context_parallel_attention``
computes each rank's queries against every rank's keys and values, merging the
partial results by (o, lse); ``unshard`` gathers the shards back. The sequence is cut
into chunks as ``torch.tensor_split`` cuts it: W chunks for the ``"contiguous"``
layout (rank r holds chunk r) or 2W for ``"zigzag"`` (rank r holds chunks r and
2W-1-r, which evens out causal work). Each chunk is one query block and one KV block.

Masks and mods see global positions: every block runs one compiled program, compiled
with ``sharded=True``, which reads the block's global offsets and the global lengths
from the captured tensor ``shard``. The program's tile schedule, evaluated over a whole
(query block, KV block) pair, says whether the pair is empty (skipped, and its KV block
never sent), full or partial. KV shards go directly from their owner to the ranks
that need them, step s moving shards s ranks along the ring, the next step's transfer
overlapping the current step's computation (or are all-gathered). The backward sends
the K and V shards the same way and returns each rank's dK/dV share to the owner.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attncc.api import CompiledAttention, InputTypeError, check_inputs, compile
from attncc.errors import AttnccError, BackendError, InputError, SpecError
from attncc.frontend.lower import SHARD, trace_mods
from attncc.frontend.trace import expression_key
from attncc.integrations.custom_op import direct_region
from attncc.interpreter import evaluate
from attncc.ir import ops
from attncc.ir.expr import bare_index_uses
from attncc.merge import merge_attention_states
from attncc.spec import AttentionSpec

LAYOUTS = ("contiguous", "zigzag")
KV_EXCHANGES = ("ring", "all_gather")

_PROGRAMS: OrderedDict[tuple, CompiledAttention] = OrderedDict()
_MAX_PROGRAMS = 64


class DistributedError(InputError):
    """The ranks of a group disagree (layout, shard lengths, shapes, program), or the group is unusable."""


def chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk when ``torch.tensor_split`` cuts ``length`` into ``chunks``."""
    size, extra = divmod(length, chunks)
    starts = [c * size + min(c, extra) for c in range(chunks + 1)]
    return list(zip(starts[:-1], starts[1:]))


def chunks_of_rank(layout: str, world: int, rank: int) -> tuple[int, ...]:
    """The chunks rank ``rank`` holds, in the order its shard stores them."""
    return (rank,) if layout == "contiguous" else (rank, 2 * world - 1 - rank)


def chunk_count(layout: str, world: int) -> int:
    return world if layout == "contiguous" else 2 * world


@dataclass(frozen=True)
class Block:
    """A chunk as a rank holds it: its first global position, its first position in the shard, its length."""

    start: int
    local_start: int
    length: int


def rank_blocks(length: int, layout: str, world: int, rank: int) -> list[Block]:
    """The blocks of rank ``rank``'s shard of a sequence of ``length`` positions."""
    bounds = chunk_bounds(length, chunk_count(layout, world))
    blocks, local = [], 0
    for chunk in chunks_of_rank(layout, world, rank):
        start, stop = bounds[chunk]
        blocks.append(Block(start, local, stop - start))
        local += stop - start
    return blocks


def _group_and_rank(group) -> tuple[object, int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group first "
            "(or launch with torchrun)"
        )
    # new_group gives the ranks it leaves out a sentinel instead of a group
    member = group is not dist.GroupMember.NON_GROUP_MEMBER
    if member and group is not None and not isinstance(group, dist.ProcessGroup):
        raise DistributedError(
            f"group is a {type(group).__name__}: a torch.distributed ProcessGroup or None is allowed"
        )
    group = group or dist.group.WORLD
    if not member or dist.get_rank(group) < 0:
        raise DistributedError(
            f"this process (global rank {dist.get_rank()}) is not a member of the group it passed: "
            "call it only on the group's ranks"
        )
    return group, dist.get_rank(group), dist.get_world_size(group)


def _check_choice(field: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{field}={value!r} is invalid: allowed are {', '.join(map(repr, allowed))}")


def _check_dim(x, dim) -> int:
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"x is a {type(x).__name__}: a torch.Tensor is allowed")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -x.dim() <= dim < x.dim():
        raise InputError(
            f"dim={dim!r} is invalid for a {x.dim()}-D tensor: an integer in [{-x.dim()}, {x.dim()}) is allowed"
        )
    return int(dim) % x.dim()


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard of the whole sequence ``x`` along ``dim`` (a copy; no communication).

    ``"contiguous"``: rank r holds chunk r of W; ``"zigzag"``: chunks r and 2W-1-r of 2W.
    Chunks are cut as ``torch.tensor_split`` cuts them, so any length works.
    """
    _check_choice("layout", layout, LAYOUTS)
    dim = _check_dim(x, dim)
    _, rank, world = _group_and_rank(group)
    blocks = rank_blocks(x.shape[dim], layout, world, rank)
    return torch.cat([x.narrow(dim, b.start, b.length) for b in blocks], dim=dim)


def _agree(group, world: int, entry: dict, problem: str | None) -> list[dict]:
    """Every rank's ``entry``; raises the same DistributedError on every rank if any rank reported a problem."""
    entries: list = [None] * world
    dist.all_gather_object(entries, {**entry, "problem": problem}, group=group)
    for rank, other in enumerate(entries):
        if other["problem"] is not None:
            raise DistributedError(f"rank {rank} of the group: {other['problem']}")
    return entries


def _same_on_every_rank(entries: list[dict], fields: tuple[str, ...], what: str) -> None:
    for field in fields:
        values = [e[field] for e in entries]
        if any(value != values[0] for value in values):
            listed = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise DistributedError(f"the ranks pass different {field} to {what} ({listed}): one value is allowed")


def _check_shard_lengths(entries: list[dict], field: str, layout: str, world: int, label: str) -> int:
    """The global length of shards whose local lengths are ``entries[r][field]``; raises unless they fit ``layout``."""
    lengths = [e[field] for e in entries]
    total = sum(lengths)
    expected = [sum(b.length for b in rank_blocks(total, layout, world, r)) for r in range(world)]
    if lengths != expected:
        raise DistributedError(
            f"{label} shards of lengths {lengths} on ranks 0..{world - 1} are not a {layout!r} sharding of "
            f"{total} positions over {world} ranks (expected {expected}); shard with attncc.distributed.shard "
            "and the same group and layout"
        )
    return total


def unshard(x_local: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's shard along ``dim`` (the inverse of ``shard``), on every rank."""
    group, rank, world = _group_and_rank(group)
    problem = None
    try:
        _check_choice("layout", layout, LAYOUTS)
        dim = _check_dim(x_local, dim)
    except AttnccError as error:
        problem = str(error)
    entry = {"layout": layout, "dim": dim}
    if problem is None:
        others = x_local.shape[:dim] + x_local.shape[dim + 1 :]
        entry.update(length=x_local.shape[dim], shape=tuple(others), dtype=str(x_local.dtype))
    entries = _agree(group, world, entry, problem)
    _same_on_every_rank(entries, ("layout", "dim", "shape", "dtype"), "unshard")
    total = _check_shard_lengths(entries, "length", layout, world, "the")
    longest = max(e["length"] for e in entries)
    padded = torch.nn.functional.pad(x_local.movedim(dim, -1), (0, longest - x_local.shape[dim])).contiguous()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    pieces = []
    for r, part in enumerate(gathered):
        for block in rank_blocks(total, layout, world, r):
            pieces.append((block.start, part[..., block.local_start : block.local_start + block.length]))
    whole = torch.cat([piece for _, piece in sorted(pieces, key=lambda p: p[0])], dim=-1)
    return whole.movedim(-1, dim)


def shard_positions(local_length: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The global positions of this rank's shard of ``local_length`` positions (gathers every rank's length)."""
    group, rank, world = _group_and_rank(group)
    problem = None
    try:
        _check_choice("layout", layout, LAYOUTS)
    except AttnccError as error:
        problem = str(error)
    entries = _agree(group, world, {"layout": layout, "length": local_length}, problem)
    _same_on_every_rank(entries, ("layout",), "shard_positions")
    total = _check_shard_lengths(entries, "length", layout, world, "the")
    return torch.cat([torch.arange(b.start, b.start + b.length) for b in rank_blocks(total, layout, world, rank)])


def _program(spec: AttentionSpec, backend: str) -> CompiledAttention:
    """The sharded program of ``spec``, compiled once per (spec fields, traced mods, backend)."""
    score, mask = trace_mods(spec)
    fields = tuple(getattr(spec, name) for name in spec.field_names() if name not in ("score_mod", "mask_mod"))
    key = (fields, backend, score and expression_key(score), mask and expression_key(mask))
    program = _PROGRAMS.get(key)
    if program is None:
        program = compile(spec.replace(score_mod=score, mask_mod=mask), backend=backend, sharded=True)
        if direct_region(program._function, program.graph) is None:
            raise BackendError(
                f"backend={backend!r} compiled this spec into more than one fused attention region; context "
                "parallelism needs one region, whose backward recomputes probabilities from the merged lse"
            )
        _PROGRAMS[key] = program
        if len(_PROGRAMS) > _MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(key)
    return program


def _spec_for(q, k, v, score_mod, mask_mod, spec, scale, enable_gqa) -> AttentionSpec:
    if spec is not None:
        if not isinstance(spec, AttentionSpec):
            raise SpecError(f"spec={spec!r} is invalid: an attncc.AttentionSpec (or None) is allowed")
        if score_mod is not None or mask_mod is not None or scale is not None:
            raise SpecError("pass spec, or score_mod / mask_mod / scale, not both (the spec holds them)")
        return spec
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputTypeError(f"{label} is {shape}: a 4-D tensor [batch, heads, length, head_dim] is allowed")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads and not enable_gqa:
        raise InputError(f"q has {heads} heads and k has {kv_heads}: pass enable_gqa=True for grouped-query attention")
    return AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=q.shape[3], v_head_dim=v.shape[3],
                         scale=scale, score_mod=score_mod, mask_mod=mask_mod)  # fmt: skip


def _captured_tensors(spec: AttentionSpec) -> tuple[dict[str, torch.Tensor], set]:
    """The mods' captured tensors by name, and their bare index uses (tensor, dim, symbol)."""
    values, uses = {}, set()
    for mod in trace_mods(spec):
        if mod is None:
            continue
        uses |= bare_index_uses(mod.expr)
        for captured in mod.captured:
            if captured.value is None:
                raise InputError(f"captured tensor {captured.name!r} has no value: capture a tensor in the mod")
            values[captured.name] = captured.value
    return values, uses


@dataclass(frozen=True)
class Pair:
    """One query block of the receiving rank against one KV block of the sending rank."""

    q_block: int
    kv_block: int
    kind: str
    shard: torch.Tensor


@dataclass
class RingPlan:
    """Who computes what: per (query rank, KV rank) the pairs of blocks with visible keys."""

    program: CompiledAttention
    group: object
    rank: int
    world: int
    exchange: str
    q_blocks: list[list[Block]]
    kv_blocks: list[list[Block]]
    pairs: dict[tuple[int, int], list[Pair]]
    captured: list[torch.Tensor]
    shard_index: int | None
    kv_shape: tuple[int, ...]
    v_dim: int

    def program_inputs(self, pair: Pair) -> list[torch.Tensor]:
        """The program's captured inputs for a pair: the mods' tensors with the pair's ``shard`` in its place."""
        if self.shard_index is None:  # a program that reads no position (no mask, no mod) takes no shard
            return self.captured
        return [*self.captured[: self.shard_index], pair.shard, *self.captured[self.shard_index :]]

    def program_index(self, captured_index: int) -> int:
        """The position of ``captured[captured_index]`` among the program's captured inputs."""
        return captured_index + (self.shard_index is not None and captured_index >= self.shard_index)

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def transfers(self, step: int) -> bool:
        """Whether this rank receives or sends a KV shard at ``step``."""
        source, target = self.sources(step)
        return (self.rank, source) in self.pairs or (target, self.rank) in self.pairs

    def sources(self, step: int) -> tuple[int, int]:
        """At ``step``, this rank receives the KV shard of the first rank and sends its own to the second."""
        return (self.rank - step) % self.world, (self.rank + step) % self.world


def _pair_kind(program: CompiledAttention, shard: torch.Tensor, captured: dict, q_len: int, kv_len: int,
               batch: int, heads: int) -> str:  # fmt: skip
    """Evaluate the program's tile schedule over a whole block pair: empty, full or partial."""
    region = program.graph.nodes_of(ops.FlashAttention)[0].op
    schedule = region.schedule
    if schedule is None:
        return "full"
    env = {"b": torch.arange(batch).view(-1, 1), "h": torch.arange(heads).view(1, -1), "q_first": 0,
           "q_last": q_len - 1, "N": q_len, "M": kv_len}  # fmt: skip
    values = {**captured, SHARD.name: shard}
    lo, hi, full_lo, full_hi = (torch.as_tensor(evaluate(e, env, values)) for e in schedule.expressions()[:4])
    lo, hi = max(int(lo.min()), 0), min(int(hi.max()), kv_len)
    if hi <= lo:
        return "empty"
    if not schedule.table and int(full_lo.max()) <= 0 and int(full_hi.min()) >= kv_len:
        return "full"
    return "partial"


def block_pairs(program, world: int, layout: str, q_len: int, kv_len: int, captured: dict, batch: int, heads: int,
                involving: int | None = None, device="cpu") -> dict[tuple[int, int], list[Pair]]:  # fmt: skip
    """Per (query rank, KV rank) the block pairs with visible keys (only pairs with rank ``involving``, if given)."""
    q_blocks = [rank_blocks(q_len, layout, world, r) for r in range(world)]
    kv_blocks = [rank_blocks(kv_len, layout, world, r) for r in range(world)]
    pairs = {}
    for q_rank in range(world):
        for kv_rank in range(world):
            if involving is not None and involving not in (q_rank, kv_rank):
                continue
            found = []
            for i, qb in enumerate(q_blocks[q_rank]):
                for j, kb in enumerate(kv_blocks[kv_rank]):
                    position = torch.tensor([qb.start, kb.start, q_len, kv_len], dtype=torch.int64)
                    kind = _pair_kind(program, position, captured, qb.length, kb.length, batch, heads)
                    if kind != "empty":
                        found.append(Pair(i, j, kind, position.to(device)))
            if found:
                pairs[(q_rank, kv_rank)] = found
    return pairs


def _kinds(pairs: dict, world: int) -> list[list[str]]:
    table = []
    for q_rank in range(world):
        row = []
        for kv_rank in range(world):
            found = pairs.get((q_rank, kv_rank), [])
            row.append("empty" if not found else ("full" if all(p.kind == "full" for p in found) else "partial"))
        table.append(row)
    return table


def pair_kinds(spec: AttentionSpec, world: int, length: int, layout: str = "zigzag", batch: int = 1,
               backend: str = "pytorch") -> list[list[str]]:  # fmt: skip
    """Per (query rank, KV rank) of ``world`` ranks sharing ``length`` positions: "empty", "full" or "partial".

    "empty" pairs are skipped and their KV shards never sent; "full" means no element is masked.
    The mods' captured tensors (of the whole sequence) are read as the mods capture them.
    """
    _check_choice("layout", layout, LAYOUTS)
    program = _program(spec, backend)
    captured, _ = _captured_tensors(spec)
    pairs = block_pairs(program, world, layout, length, length, captured, batch, spec.num_heads)
    return _kinds(pairs, world)


def plan_ring(program, group, rank, world, layout, exchange, q_len, kv_len, captured, batch, heads, kv_shape,
              v_dim, device) -> RingPlan:  # fmt: skip
    """The pairs this rank computes or feeds; every rank derives them from the same global facts."""
    q_blocks = [rank_blocks(q_len, layout, world, r) for r in range(world)]
    kv_blocks = [rank_blocks(kv_len, layout, world, r) for r in range(world)]
    pairs = block_pairs(program, world, layout, q_len, kv_len, captured, batch, heads, rank, device)
    labels = [n.op.label for n in program.graph.captured]
    inputs = [captured[label] for label in labels if label != SHARD.name]
    shard_index = labels.index(SHARD.name) if SHARD.name in labels else None
    return RingPlan(program, group, rank, world, exchange, q_blocks, kv_blocks, pairs, inputs, shard_index,
                    kv_shape, v_dim)  # fmt: skip


class KVExchange:
    """Delivers the KV shards this rank needs, one source rank per step, prefetching the next step's."""

    def __init__(self, plan: RingPlan, k: torch.Tensor, v: torch.Tensor, phase: int):
        self.plan, self.k, self.v, self.phase = plan, k.contiguous(), v.contiguous(), phase
        self.sends = []
        if plan.exchange == "all_gather":
            self.gathered = self._all_gather()

    def _shape(self, rank: int, dim: int) -> tuple[int, ...]:
        length = sum(b.length for b in self.plan.kv_blocks[rank])
        return (*self.plan.kv_shape[:2], length, dim)

    def _all_gather(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan
        longest = max(sum(b.length for b in blocks) for blocks in plan.kv_blocks)
        result = []
        for tensor in (self.k, self.v):
            padded = torch.nn.functional.pad(tensor, (0, 0, 0, longest - tensor.shape[2])).contiguous()
            parts = [torch.empty_like(padded) for _ in range(plan.world)]
            dist.all_gather(parts, padded, group=plan.group)
            result.append([part[:, :, : self._shape(r, 1)[2]] for r, part in enumerate(parts)])
        return list(zip(*result))

    def _post(self, step: int):
        """Start step ``step``'s transfers; returns the receive buffers (None if nothing arrives) and their requests."""
        plan = self.plan
        source, target = plan.sources(step)
        ops_ = []
        if (target, plan.rank) in plan.pairs:
            for kind, tensor in enumerate((self.k, self.v)):
                ops_.append(
                    dist.P2POp(dist.isend, tensor, plan.global_rank(target), plan.group, _tag(self.phase, step, kind))
                )
        buffers = None
        if (plan.rank, source) in plan.pairs:
            buffers = (self.k.new_empty(self._shape(source, self.k.shape[3])),
                       self.v.new_empty(self._shape(source, self.v.shape[3])))  # fmt: skip
            for kind, tensor in enumerate(buffers):
                ops_.append(
                    dist.P2POp(dist.irecv, tensor, plan.global_rank(source), plan.group, _tag(self.phase, step, kind))
                )
        requests = dist.batch_isend_irecv(ops_) if ops_ else []
        if buffers is None:
            self.sends += requests
            return None, []
        return buffers, requests

    def __iter__(self):
        """(step, source rank, its k, its v) for every step; k and v are None where this rank has no work."""
        plan = self.plan
        if plan.exchange == "all_gather":
            for step in range(plan.world):
                source = plan.sources(step)[0]
                yield (
                    (step, source, *self.gathered[source])
                    if (plan.rank, source) in plan.pairs
                    else (step, source, None, None)
                )
            return
        own = (self.k, self.v) if (plan.rank, plan.rank) in plan.pairs else (None, None)
        # Each transfer starts while the step with work before it computes: steps without any are skipped.
        active = iter([step for step in range(1, plan.world) if plan.transfers(step)])
        posted = next(active, None)
        pending = self._post(posted) if posted is not None else None
        yield 0, plan.rank, *own
        for step in range(1, plan.world):
            buffers, requests = None, []
            if step == posted:
                buffers, requests = pending
                posted = next(active, None)
                pending = self._post(posted) if posted is not None else None
            if buffers is None:
                yield step, plan.sources(step)[0], None, None
                continue
            for request in requests:
                request.wait()
            yield step, plan.sources(step)[0], *buffers

    def finish(self) -> None:
        for request in self.sends:
            request.wait()
        self.sends = []


def _tag(phase: int, step: int, kind: int) -> int:
    return (phase * 4096 + step) * 4 + kind


def _blocks(x: torch.Tensor, blocks: list[Block]) -> list[torch.Tensor]:
    return [x[:, :, b.local_start : b.local_start + b.length] for b in blocks]


def ring_forward(plan: RingPlan, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (o, lse): its query blocks against every visible KV block, merged by (o, lse)."""
    q_blocks = [t.contiguous() for t in _blocks(q, plan.q_blocks[plan.rank])]
    states = [(q.new_zeros((*t.shape[:3], plan.v_dim), dtype=torch.float32),
               torch.full(t.shape[:3], float("-inf"), device=q.device)) for t in q_blocks]  # fmt: skip
    exchange = KVExchange(plan, k, v, phase=0)
    for _, source, k_source, v_source in exchange:
        if k_source is None:
            continue
        k_parts, v_parts = _blocks(k_source, plan.kv_blocks[source]), _blocks(v_source, plan.kv_blocks[source])
        for pair in plan.pairs[(plan.rank, source)]:
            inputs = plan.program_inputs(pair)
            o, lse = plan.program.op(q_blocks[pair.q_block], k_parts[pair.kv_block].contiguous(),
                                     v_parts[pair.kv_block].contiguous(), inputs)  # fmt: skip
            o_sum, lse_sum = states[pair.q_block]
            states[pair.q_block] = merge_attention_states([o_sum, o], [lse_sum, lse])
    exchange.finish()
    o = torch.cat([state[0] for state in states], dim=2).to(q.dtype)
    return o, torch.cat([state[1] for state in states], dim=2)


class GradReturn:
    """Sends each rank's dK/dV share of another rank's shard back to the owner, who sums them."""

    def __init__(self, plan: RingPlan, grad_k: torch.Tensor, grad_v: torch.Tensor):
        self.plan, self.grad_k, self.grad_v = plan, grad_k, grad_v
        self.sends, self.receives = [], []

    def step(self, step: int, source: int, shares) -> None:
        """Send this step's shares (of ``source``'s shard; None if none) and post the receive of this rank's."""
        plan = self.plan
        if step == 0:
            if shares is not None:
                self.grad_k += shares[0]
                self.grad_v += shares[1]
            return
        ops_ = []
        if shares is not None:
            ops_ += [dist.P2POp(dist.isend, share, plan.global_rank(source), plan.group, _tag(2, step, kind))
                     for kind, share in enumerate(shares)]  # fmt: skip
        target = plan.sources(step)[1]
        buffers = None
        if (target, plan.rank) in plan.pairs:
            buffers = (torch.empty_like(self.grad_k), torch.empty_like(self.grad_v))
            ops_ += [dist.P2POp(dist.irecv, buffer, plan.global_rank(target), plan.group, _tag(2, step, kind))
                     for kind, buffer in enumerate(buffers)]  # fmt: skip
        requests = dist.batch_isend_irecv(ops_) if ops_ else []
        self.collect()
        if buffers is not None:
            self.receives.append((buffers, requests))
        else:
            self.sends += requests

    def collect(self) -> None:
        """Wait for the shares received so far and add them to this rank's gradients."""
        for buffers, requests in self.receives:
            for request in requests:
                request.wait()
            self.grad_k += buffers[0]
            self.grad_v += buffers[1]
        self.receives = []

    def finish(self) -> None:
        self.collect()
        for request in self.sends:
            request.wait()
        self.sends = []


def ring_backward(plan: RingPlan, q, k, v, o, lse, grad_o, grad_lse, trainable: list[int]):
    """dq, dk, dv of this rank's shards and the captured tensors' grads, summed over the group.

    Each pair's backward recomputes its probabilities from the merged lse, so its grads are
    exactly its share of single-process attention's.
    """
    mine = plan.q_blocks[plan.rank]
    q_parts, o_parts, grad_o_parts = _blocks(q, mine), _blocks(o, mine), _blocks(grad_o, mine)
    lse_parts, grad_lse_parts = _blocks(lse.unsqueeze(-1), mine), _blocks(grad_lse.unsqueeze(-1), mine)
    grad_q, grad_k, grad_v = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    grad_captured = [torch.zeros_like(plan.captured[i], dtype=torch.float32) for i in trainable]
    exchange = KVExchange(plan, k, v, phase=1)
    returns = GradReturn(plan, grad_k, grad_v)
    for step, source, k_source, v_source in exchange:
        if k_source is None:
            returns.step(step, source, None)
            continue
        share_k = torch.zeros_like(k_source, dtype=torch.float32)
        share_v = torch.zeros_like(v_source, dtype=torch.float32)
        for pair in plan.pairs[(plan.rank, source)]:
            qb, kb = mine[pair.q_block], plan.kv_blocks[source][pair.kv_block]
            kv = slice(kb.local_start, kb.local_start + kb.length)
            i = pair.q_block
            grads = plan.program.backward_op(
                q_parts[i].contiguous(), k_source[:, :, kv].contiguous(), v_source[:, :, kv].contiguous(),
                o_parts[i].contiguous(), lse_parts[i].squeeze(-1).contiguous(), grad_o_parts[i].contiguous(),
                grad_lse_parts[i].squeeze(-1).contiguous(), plan.program_inputs(pair), [plan.program_index(i) for i in trainable],
            )  # fmt: skip
            grad_q[:, :, qb.local_start : qb.local_start + qb.length] += grads[0]
            share_k[:, :, kv] += grads[1]
            share_v[:, :, kv] += grads[2]
            for total, grad in zip(grad_captured, grads[3]):
                total += grad
        returns.step(step, source, (share_k, share_v))
    returns.finish()
    exchange.finish()
    for grad in grad_captured:
        dist.all_reduce(grad, group=plan.group)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_captured


class ContextParallelAttention(torch.autograd.Function):
    """Ring attention over the plan's pairs; the backward sends dK/dV shares back to their owners."""

    @staticmethod
    def forward(ctx, plan: RingPlan, q, k, v, *captured):
        o, lse = ring_forward(plan, q, k, v)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, o, lse)
        return o, lse

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        plan = ctx.plan
        q, k, v, o, lse = ctx.saved_tensors
        grad_o = torch.zeros_like(o) if grad_o is None else grad_o
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        trainable = [i for i in range(len(plan.captured)) if ctx.needs_input_grad[4 + i]]
        grad_q, grad_k, grad_v, grad_trainable = ring_backward(plan, q, k, v, o, lse, grad_o, grad_lse, trainable)
        grad_captured = [None] * len(plan.captured)
        for i, grad in zip(trainable, grad_trainable):
            grad_captured[i] = grad.to(plan.captured[i].dtype)
        return None, grad_q, grad_k, grad_v, *grad_captured


def context_parallel_attention(q, k, v, *, score_mod=None, mask_mod=None, spec: AttentionSpec | None = None,
                               scale: float | None = None, enable_gqa: bool = False, group=None,
                               layout: str = "zigzag", return_lse: bool = False, backend: str | None = None,
                               kv_exchange: str = "ring"):  # fmt: skip
    """Attention of this rank's query shard over the whole sharded sequence; returns this rank's output shard.

    ``q [B, H, n, D]``, ``k [B, Hkv, m, D]``, ``v [B, Hkv, m, Dv]`` are this rank's shards
    (``attncc.distributed.shard`` with the same ``group`` and ``layout``). The mods (or a
    ``spec``) are those of single-process attention and see global positions; their
    captured tensors are the whole sequence's, equal on every rank. ``kv_exchange``:
    ``"ring"`` (point-to-point, only where a pair has work) or ``"all_gather"``. Returns
    ``o [B, H, n, Dv]`` (and ``lse [B, H, n]`` with ``return_lse``), differentiable.
    Every rank of the group must call it; inputs that do not fit raise the same
    ``DistributedError`` on every rank.
    """
    from attncc.backends import backend_for_device

    group, rank, world = _group_and_rank(group)
    problem, program, entry = None, None, {}
    try:
        _check_choice("layout", layout, LAYOUTS)
        _check_choice("kv_exchange", kv_exchange, KV_EXCHANGES)
        spec = _spec_for(q, k, v, score_mod, mask_mod, spec, scale, enable_gqa)
        check_inputs(spec, q, k, v)
        program = _program(spec, backend or backend_for_device(q.device.type))
        captured, index_uses = _captured_tensors(spec)
        entry = {"q_len": q.shape[2], "kv_len": k.shape[2], "shape": (q.shape[0], *q.shape[1:2], *k.shape[1:2],
                 q.shape[3], v.shape[3]), "dtype": str(q.dtype), "program": program.path.stem,
                 "grad": tuple(t.requires_grad for t in captured.values())}  # fmt: skip
    except AttnccError as error:
        problem = str(error)
    entry.update(layout=layout, kv_exchange=kv_exchange)
    entries = _agree(group, world, entry, problem)
    _same_on_every_rank(entries, ("layout", "kv_exchange", "shape", "dtype", "program", "grad"),
                        "context_parallel_attention")  # fmt: skip
    q_len = _check_shard_lengths(entries, "q_len", layout, world, "query")
    kv_len = _check_shard_lengths(entries, "kv_len", layout, world, "key")
    lengths = {"b": q.shape[0], "h": q.shape[1], "q_idx": q_len, "kv_idx": kv_len}
    for name, dim, symbol in sorted(index_uses):
        if captured[name].shape[dim] < lengths[symbol]:
            raise InputError(
                f"captured tensor {name!r} has {captured[name].shape[dim]} entries along dim {dim}, but is indexed "
                f"by the global {symbol} up to {lengths[symbol] - 1}"
            )
    for name, value in captured.items():
        if value.device != q.device:
            raise InputError(f"captured tensor {name!r} is on {value.device}, the inputs on {q.device}; move it")
    plan = plan_ring(program, group, rank, world, layout, kv_exchange, q_len, kv_len, captured, q.shape[0],
                     q.shape[1], tuple(k.shape), v.shape[3], q.device)  # fmt: skip
    o, lse = ContextParallelAttention.apply(plan, q, k, v, *plan.captured)
    return (o, lse) if return_lse else o


__all__ = [
    "DistributedError",
    "LAYOUTS",
    "chunk_bounds",
    "pair_kinds",
    "context_parallel_attention",
    "plan_ring",
    "shard",
    "shard_positions",
    "unshard",
]
