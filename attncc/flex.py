"""Drop-ins for torch.nn.attention.flex_attention: ``flex_attention`` and ``create_block_mask``.

Programs are cached by the traced expressions of the mods (and the shapes that fix
the IR), not by function identity: a new lambda with the same body reuses the
compiled program, and the tensors it captures are passed in fresh on every call.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import sympy
import torch

from attncc.api import CompiledAttention, InputTypeError, compile
from attncc.errors import InputError, ModError
from attncc.frontend.mod import TracedMod
from attncc.frontend.trace import expression_key, trace_mask_mod, trace_score_mod
from attncc.integrations import flex_compile
from attncc.interpreter import evaluate, index_grids
from attncc.kernel_options import KernelOptions, parse_kernel_options
from attncc.spec import AttentionSpec

try:  # torch >= 2.9 names the auxiliary outputs; the same fields otherwise
    from torch.nn.attention.flex_attention import AuxOutput, AuxRequest
except ImportError:  # pragma: no cover - older torch

    class AuxRequest(NamedTuple):
        lse: bool = False
        max_scores: bool = False

    class AuxOutput(NamedTuple):
        lse: torch.Tensor | None = None
        max_scores: torch.Tensor | None = None


from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
from torch.nn.attention.flex_attention import noop_mask as torch_noop_mask

_PROGRAMS: OrderedDict[tuple, CompiledAttention] = OrderedDict()
_MAX_PROGRAMS = 256


@dataclass(frozen=True)
class BlockMask:
    """Which (query block, KV block) pairs have visible elements, FlexAttention's layout.

    ``kv_num_blocks[b, h, i]`` partial KV blocks (some elements visible) are listed
    first in ``kv_indices[b, h, i]``; ``full_kv_*`` lists the blocks whose every
    element is visible. ``b``/``h`` have size 1 when the mask does not depend on them (B or H None).
    ``mask_mod`` is the traced mask, or the mask_mod itself in a BlockMask made in code torch.compile traces.
    """

    mask_mod: TracedMod | Callable
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
                f"mask_mod={self._mask_text()})")  # fmt: skip

    def _mask_text(self) -> str:
        if isinstance(self.mask_mod, TracedMod):
            return self.mask_mod.source or str(self.mask_mod.expr)
        return getattr(self.mask_mod, "__name__", repr(self.mask_mod))


def create_block_mask(mask_mod, B, H, Q_LEN: int, KV_LEN: int, device=None, BLOCK_SIZE=128, _compile=False,
                      separate_full_blocks: bool = True, compute_dq_write_order: bool = False,
                      dq_kv_order: bool = True) -> BlockMask:  # fmt: skip
    """Evaluate ``mask_mod`` blockwise into a BlockMask; B or H None means it does not vary along them.

    torch's signature. ``device=None`` is the current accelerator, else the CPU.
    ``separate_full_blocks=False`` lists full blocks as partial ones. ``_compile``,
    ``compute_dq_write_order`` and ``dq_kv_order`` have no effect: the mask is evaluated
    from its traced expression (no compiler involved), and attncc's backward needs no
    dQ write order.
    """
    for label, flag in (("_compile", _compile), ("separate_full_blocks", separate_full_blocks),
                        ("compute_dq_write_order", compute_dq_write_order), ("dq_kv_order", dq_kv_order)):  # fmt: skip
        if not isinstance(flag, bool):
            raise InputError(f"{label}={flag!r} is invalid: True or False is allowed")
    if device is None:
        accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        device = accelerator or "cpu"
    for label, value in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):  # symbolic under torch.compile's dynamic shapes
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value <= 0:
            raise InputError(f"{label}={value!r} is invalid: a positive integer is allowed")
    for label, value in (("B", B), ("H", H)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise InputError(f"{label}={value!r} is invalid: a positive integer or None is allowed")
    sizes = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else BLOCK_SIZE
    if (
        not isinstance(sizes, (tuple, list))
        or len(sizes) != 2
        or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in sizes)
    ):
        raise InputError(f"BLOCK_SIZE={BLOCK_SIZE!r} is invalid: a positive integer or a pair of them is allowed")
    block_q, block_kv = sizes
    if torch.compiler.is_compiling():
        blocks = flex_compile.block_lists(mask_mod, B, H, Q_LEN, KV_LEN, torch.device(device), block_q, block_kv,
                                          separate_full_blocks)  # fmt: skip
        return BlockMask(mask_mod, (Q_LEN, KV_LEN), (block_q, block_kv), *blocks)
    traced = trace_mask_mod(mask_mod)
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
    if not separate_full_blocks:
        all_visible = torch.zeros_like(any_visible)
    partial = any_visible & ~all_visible
    return BlockMask(traced, (Q_LEN, KV_LEN), (block_q, block_kv), *_block_lists(partial), *_block_lists(all_visible))


def _blocks_of(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    return torch.zeros_like(listed).scatter(-1, indices.long(), listed)


def _block_lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = selected.sum(-1).to(torch.int32)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, order


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa: bool = False,
                   return_lse: bool = False, kernel_options=None, *, return_aux=None, mask_mod=None, backend=None):  # fmt: skip
    """torch.nn.attention.flex_attention, compiled by attncc.

    Same arguments as torch's; ``block_mask`` is an attncc or a torch BlockMask.
    ``mask_mod`` (instead of a block mask) and ``backend`` are attncc's, keyword-only;
    ``backend=None`` picks the preferred backend for the query's device. Returns ``o``,
    ``(o, lse)`` with ``return_lse``, or ``(o, AuxOutput(lse, max_scores))`` with
    ``return_aux=AuxRequest(...)``. K/V with batch 1 serve every query batch.
    """
    for label, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputTypeError(f"{label} is {shape}: a 4-D tensor [batch, heads, length, head_dim] is allowed")
    _check_shapes(query, key, value, enable_gqa)
    if query.shape[0] != key.shape[0]:  # K/V batch 1, checked above
        key, value = (t.expand(query.shape[0], *t.shape[1:]) for t in (key, value))
    if return_lse and return_aux is not None:
        raise InputError("pass return_lse or return_aux, not both (return_aux=AuxRequest(lse=True) returns the lse)")
    if return_aux is not None and not isinstance(return_aux, AuxRequest):
        raise InputTypeError(
            f"return_aux is a {type(return_aux).__name__}: an AuxRequest(lse=..., max_scores=...) is allowed"
        )
    wants_lse = return_lse or (return_aux is not None and return_aux.lse)
    if block_mask is not None:
        if mask_mod is not None:
            raise ModError("pass mask_mod or block_mask, not both (a BlockMask carries its mask_mod)")
        mask_mod = _block_mask_mod(block_mask, query.shape[2], key.shape[2])
    if torch.compiler.is_compiling():
        if return_aux is not None and return_aux.max_scores:
            raise InputError("return_aux=AuxRequest(max_scores=True) is not supported under torch.compile")
        out, lse = flex_compile.flex_attention(query, key, value, score_mod, mask_mod, scale, kernel_options, backend)
        return _returned(out, lse if wants_lse else None, None, return_lse, return_aux)
    from attncc.backends import backend_for_device

    options = parse_kernel_options(kernel_options)
    score = None if score_mod is None else trace_score_mod(score_mod)
    mask = None if mask_mod is None else trace_mask_mod(mask_mod)
    if options.backend is not None and backend not in (None, options.backend):
        raise InputError(f"backend={backend!r} and kernel_options BACKEND (attncc's {options.backend!r}) disagree")
    backend = backend or options.backend or backend_for_device(query.device.type)
    program = program_for(score, mask, query.shape[1], key.shape[1], query.shape[3], value.shape[3], scale, backend,
                          options)  # fmt: skip
    captured = {c.name: c.value for mod in (score, mask) if mod for c in mod.captured if c.value is not None}
    result = program(query, key, value, return_lse=wants_lse, **captured)
    out, lse = result if wants_lse else (result, None)
    max_scores = None
    if return_aux is not None and return_aux.max_scores:
        scale = program.spec.scale if program.spec.scale is not None else 1 / math.sqrt(query.shape[3])
        max_scores = row_max_scores(query, key, scale, score, mask, captured)
    return _returned(out, lse, max_scores, return_lse, return_aux)


def _returned(out, lse, max_scores, return_lse: bool, return_aux):
    """torch's return value: ``o``, ``(o, lse)``, or ``(o, AuxOutput(lse, max_scores))``."""
    if return_aux is not None:
        return out, AuxOutput(lse=lse, max_scores=max_scores)
    return (out, lse) if return_lse else out


def program_for(score: TracedMod | None, mask: TracedMod | None, heads: int, kv_heads: int, head_dim: int,
                v_head_dim: int, scale, backend: str, options: KernelOptions) -> CompiledAttention:  # fmt: skip
    """The compiled program of these traced mods and sizes, from the program cache (compiled on a miss)."""
    spec = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim,
                         scale=scale, score_mod=score, mask_mod=mask)  # fmt: skip
    program_key = (heads, kv_heads, head_dim, v_head_dim, spec.scale, backend, options.tile,
                   score and expression_key(score), mask and expression_key(mask))  # fmt: skip
    program = _PROGRAMS.get(program_key)
    if program is None:
        program = compile(spec, backend=backend, pipeline=_pipeline(backend, options))
        _PROGRAMS[program_key] = program
        if len(_PROGRAMS) > _MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(program_key)
    return program


def _check_shapes(query, key, value, enable_gqa: bool) -> None:
    """torch 2.13's rules for what the compiled program cannot see: K/V batch equal to the query's or 1, GQA by
    request (the program checks the lengths and head dims)."""
    for label, t in (("key", key), ("value", value)):
        if t.shape[0] not in (query.shape[0], 1) or t.shape[0] != key.shape[0]:
            raise InputError(
                f"{label} has batch {t.shape[0]}, query {query.shape[0]}, key {key.shape[0]}: K and V need one "
                "batch, equal to the query's or 1 (shared by every query batch)"
            )
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads and not enable_gqa:
        raise InputError(
            f"query has {heads} heads and key has {kv_heads}: pass enable_gqa=True for grouped-query attention"
        )
    if heads % kv_heads:
        raise InputError(f"query has {heads} heads, not a multiple of key's {kv_heads} heads")


def _pipeline(backend: str, options: KernelOptions):
    if not options.tile:
        return None
    from attncc.passes import PIPELINES, Tile

    return [*PIPELINES[backend][:-1], Tile(target=backend, **dict(options.tile))]


def _block_mask_mod(block_mask, q_len: int, kv_len: int):
    """The mask a BlockMask stands for: its mask_mod, or (a torch BlockMask built from blocks alone) its blocks."""
    if isinstance(block_mask, BlockMask):
        lengths, mask_mod = tuple(block_mask.seq_lengths), block_mask.mask_mod
    elif isinstance(block_mask, TorchBlockMask):
        lengths, mask_mod = tuple(block_mask.seq_lengths), block_mask.mask_mod
        if getattr(mask_mod, "__name__", "") == "_sliced_mask_mod_error":
            raise InputError("block_mask is a sliced torch BlockMask, which has no mask_mod; pass the whole BlockMask")
        if mask_mod is torch_noop_mask:
            if torch.compiler.is_compiling():
                raise ModError(
                    "block_mask is a torch BlockMask without a mask_mod (BlockMask.from_kv_blocks), which attncc "
                    "reads from its blocks outside torch.compile only: make it with create_block_mask"
                )
            mask_mod = _blocks_mask_mod(block_mask)
    else:
        raise InputTypeError(
            f"block_mask is a {type(block_mask).__name__}: an attncc.BlockMask is allowed, or torch's BlockMask"
        )
    if lengths != (q_len, kv_len):
        raise InputError(f"block_mask was made for (Q_LEN, KV_LEN) = {lengths}, the inputs have {(q_len, kv_len)}")
    return mask_mod


def _blocks_mask_mod(block_mask):
    """A torch BlockMask whose mask_mod is noop_mask (BlockMask.from_kv_blocks): visible = its block is listed."""
    visible_blocks = block_mask.to_dense().bool().contiguous()
    if bool(visible_blocks.all()):
        return None
    block_q, block_kv = block_mask.BLOCK_SIZE
    one_batch, one_head = visible_blocks.shape[0] == 1, visible_blocks.shape[1] == 1

    def listed_blocks(b, h, q_idx, kv_idx):
        return visible_blocks[0 if one_batch else b, 0 if one_head else h, q_idx // block_q, kv_idx // block_kv]

    return listed_blocks


def row_max_scores(query, key, scale: float, score: TracedMod | None, mask: TracedMod | None, captured: dict):
    """FlexAttention's ``max_scores``: each row's largest modified, visible score (-inf for a row with none).

    A separate pass over blocks of query rows in float32, O(rows x M) memory per block;
    it has no gradient, as in torch.
    """
    score_expr = score.expr if score is not None else sympy.Symbol("score")
    batch, heads, n, _ = query.shape
    kv_heads, m = key.shape[1], key.shape[2]
    k = key.float().repeat_interleave(heads // kv_heads, dim=1)
    values = {name: t.float() if t.is_floating_point() else t for name, t in captured.items()}
    result = torch.empty(batch, heads, n, device=query.device)
    rows = max(1, 2**22 // max(1, batch * heads * m))
    with torch.no_grad():
        for first in range(0, n, rows):
            last = min(n, first + rows)
            grids = index_grids(batch, heads, n, m, query.device)
            grids["q_idx"] = grids["q_idx"][:, :, first:last]
            raw = torch.matmul(query[:, :, first:last].float(), k.transpose(-1, -2)) * scale
            scores = evaluate(score_expr, {**grids, "score": raw}, values)
            scores = torch.as_tensor(scores, device=query.device).expand_as(raw)
            if mask is not None:
                keep = torch.as_tensor(evaluate(mask.expr, grids, values), device=query.device)
                scores = scores.masked_fill(~keep.expand_as(raw), float("-inf"))
            result[:, :, first:last] = scores.amax(dim=-1)
    return result
