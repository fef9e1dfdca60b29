"""Drop-ins for torch.nn.attention.flex_attention: ``flex_attention`` and ``create_block_mask``.

Programs are cached by the traced expressions of the mods (and the shapes that fix
the IR), not by function identity: a new lambda with the same body reuses the
compiled program, and the tensors it captures are passed in fresh on every call.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from attncc.api import CompiledAttention, InputTypeError, compile
from attncc.errors import InputError, ModError
from attncc.frontend.mod import TracedMod
from attncc.frontend.trace import expression_key, trace_mask_mod, trace_score_mod
from attncc.interpreter import evaluate, index_grids
from attncc.spec import AttentionSpec

_PROGRAMS: OrderedDict[tuple, CompiledAttention] = OrderedDict()
_MAX_PROGRAMS = 256


@dataclass(frozen=True)
class BlockMask:
    """Which (query block, KV block) pairs have visible elements, FlexAttention's layout.

    ``kv_num_blocks[b, h, i]`` partial KV blocks (some elements visible) are listed
    first in ``kv_indices[b, h, i]``; ``full_kv_*`` lists the blocks whose every
    element is visible. ``b``/``h`` have size 1 when the mask does not depend on them (B or H None).
    """

    mask_mod: TracedMod
    seq_lengths: tuple[int, int]
    BLOCK_SIZE: tuple[int, int]
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (*self.kv_num_blocks.shape[:2], *self.seq_lengths)

    def sparsity(self) -> float:
        """Percentage of blocks skipped entirely."""
        return 100.0 * (1 - float(self.to_dense().float().mean()))

    def to_dense(self) -> torch.Tensor:
        """The block-level mask [B, H, query blocks, KV blocks]: True where a block is visited."""
        return _blocks_of(self.kv_num_blocks, self.kv_indices) | _blocks_of(
            self.full_kv_num_blocks, self.full_kv_indices
        )

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, sparsity={self.sparsity():.2f}%, "
                f"mask_mod={self.mask_mod.source or self.mask_mod.expr})")  # fmt: skip


def create_block_mask(mask_mod, B, H, Q_LEN: int, KV_LEN: int, device="cpu", BLOCK_SIZE=128) -> BlockMask:
    """Evaluate ``mask_mod`` blockwise into a BlockMask; B or H None means it does not vary along them."""
    traced = trace_mask_mod(mask_mod)
    for label, value in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{label}={value!r} is invalid: a positive integer is allowed")
    for label, value in (("B", B), ("H", H)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise InputError(f"{label}={value!r} is invalid: a positive integer or None is allowed")
    sizes = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else BLOCK_SIZE
    if not isinstance(sizes, (tuple, list)) or len(sizes) != 2 or any(
        isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in sizes
    ):
        raise InputError(f"BLOCK_SIZE={BLOCK_SIZE!r} is invalid: a positive integer or a pair of them is allowed")
    block_q, block_kv = sizes
    batch, heads = B or 1, H or 1
    missing = [c.name for c in traced.captured if c.value is None]
    if missing:
        raise InputError(f"mask_mod's captured tensor {missing[0]!r} has no value; a BlockMask needs it")
    captured = {c.name: c.value.to(device) for c in traced.captured}
    q_blocks, kv_blocks = math.ceil(Q_LEN / block_q), math.ceil(KV_LEN / block_kv)
    any_visible = torch.zeros(batch, heads, q_blocks, kv_blocks, dtype=torch.bool, device=device)
    all_visible = torch.zeros_like(any_visible)
    grids = index_grids(batch, heads, Q_LEN, KV_LEN, device)
    # Evaluate a few query blocks at a time: about 16M mask elements per step.
    step = max(1, 2**24 // (batch * heads * block_q * kv_blocks * block_kv))
    for first in range(0, q_blocks, step):
        done = min(q_blocks, first + step)
        rows = slice(first * block_q, min(Q_LEN, done * block_q))
        chunk = {**grids, "q_idx": grids["q_idx"][:, :, rows]}
        visible = torch.as_tensor(evaluate(traced.expr, chunk, captured), device=device)
        visible = visible.expand(batch, heads, rows.stop - rows.start, KV_LEN)
        pad = (0, kv_blocks * block_kv - KV_LEN, 0, (done - first) * block_q - visible.shape[2])
        blocks = (batch, heads, done - first, block_q, kv_blocks, block_kv)
        # Padding past the sequence ends neither adds a visible element nor spoils a full block.
        any_visible[:, :, first:done] = torch.nn.functional.pad(visible, pad, value=False).view(blocks).any(5).any(3)
        all_visible[:, :, first:done] = torch.nn.functional.pad(visible, pad, value=True).view(blocks).all(5).all(3)
    partial = any_visible & ~all_visible
    return BlockMask(traced, (Q_LEN, KV_LEN), (block_q, block_kv), *_block_lists(partial), *_block_lists(all_visible))


def _blocks_of(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    return torch.zeros_like(listed).scatter(-1, indices.long(), listed)


def _block_lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = selected.sum(-1).to(torch.int32)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, order


def flex_attention(query, key, value, score_mod=None, block_mask: BlockMask | None = None, scale=None,
                   enable_gqa: bool = False, return_lse: bool = False, *, mask_mod=None, backend=None):  # fmt: skip
    """torch.nn.attention.flex_attention, compiled by attncc.

    Same positional order as torch's; ``mask_mod`` (instead of a block mask) and
    ``backend`` are keyword-only. ``backend=None`` picks the preferred backend for
    the query's device. Returns ``o``, or ``(o, lse)`` with ``return_lse``.
    """
    from attncc.backends import backend_for_device

    for label, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputTypeError(f"{label} is {shape}: a 4-D tensor [batch, heads, length, head_dim] is allowed")
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise InputTypeError(f"block_mask is a {type(block_mask).__name__}: an attncc.BlockMask is allowed")
        if mask_mod is not None:
            raise ModError("pass mask_mod or block_mask, not both (a BlockMask carries its mask_mod)")
        expected = (query.shape[2], key.shape[2])
        if tuple(block_mask.seq_lengths) != expected:
            raise InputError(
                f"block_mask was made for (Q_LEN, KV_LEN) = {block_mask.seq_lengths}, the inputs have {expected}"
            )
        mask_mod = block_mask.mask_mod
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads and not enable_gqa:
        raise InputError(
            f"query has {heads} heads and key has {kv_heads}: pass enable_gqa=True for grouped-query attention"
        )
    if heads % kv_heads:
        raise InputError(f"query has {heads} heads, not a multiple of key's {kv_heads} heads")
    score = None if score_mod is None else trace_score_mod(score_mod)
    mask = None if mask_mod is None else trace_mask_mod(mask_mod)
    backend = backend or backend_for_device(query.device.type)
    spec = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=query.shape[3], v_head_dim=value.shape[3],
                         scale=scale, score_mod=score, mask_mod=mask)  # fmt: skip
    program_key = (heads, kv_heads, query.shape[3], value.shape[3], spec.scale, backend,
                   score and expression_key(score), mask and expression_key(mask))  # fmt: skip
    program = _PROGRAMS.get(program_key)
    if program is None:
        program = compile(spec, backend=backend)
        _PROGRAMS[program_key] = program
        if len(_PROGRAMS) > _MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(program_key)
    captured = {c.name: c.value for mod in (score, mask) if mod for c in mod.captured if c.value is not None}
    return program(query, key, value, return_lse=return_lse, **captured)
