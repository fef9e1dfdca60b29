"""Bench cases: one attention problem at fixed sizes, and what it computes (masks, visible pairs, FLOPs, bytes)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch

from attncc.errors import AttnccError
from attncc.frontend.lower import alibi_slope, mask_predicate, merged_captured, trace_mods
from attncc.interpreter import evaluate, index_grids
from attncc.ir.expr import free_symbol_names
from attncc.spec import AttentionSpec
from attncc.validation import example_captured

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BenchCase:
    """One attention problem: a spec at fixed sizes.

    ``mask`` labels the case in tables and plots; ``implementations`` limits what runs
    (None: every implementation available on the device); ``backward`` also times
    forward + backward; ``bandwidth`` reports the bytes of K and V read per second
    (decoding, where reading the cache is the cost).
    """

    name: str
    mask: str
    spec: AttentionSpec
    batch: int
    n: int
    m: int
    dtype: torch.dtype = torch.float32
    implementations: tuple[str, ...] | None = None
    backward: bool = False
    bandwidth: bool = False  # also report K/V read per second against the machine's measured bandwidth


def document_ids(length: int, documents: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """Document id of every position: ``documents`` documents of random lengths (at least 1) filling ``length``."""
    generator = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(length - 1, generator=generator)[: documents - 1] + 1).sort().values
    lengths = torch.diff(cuts, prepend=torch.tensor([0]), append=torch.tensor([length]))
    return torch.repeat_interleave(torch.arange(documents), lengths).to(device)


def document_causal_mask(doc: torch.Tensor):
    """FlexAttention's document masking: causal attention within each packed document."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    return mask_mod


def describe_mask(spec: AttentionSpec) -> str:
    """A short label of what a spec masks and modifies, e.g. ``causal, window (256, 0), softcap``."""
    parts = []
    if spec.causal:
        parts.append("causal" if spec.causal is True or spec.causal == "bottom_right" else "causal top-left")
    if spec.window is not None:
        parts.append(f"window {tuple(spec.window)}")
    for field, label in (("mask_mod", "mask_mod"), ("score_mod", "score_mod"), ("softcap", "softcap")):
        if getattr(spec, field) is not None:
            parts.append(label)
    if spec.alibi:
        parts.append("alibi")
    return ", ".join(parts) or "dense"


# --------------------------------------------------------------------------- what a case computes


def captured_values(spec: AttentionSpec, device) -> dict[str, torch.Tensor]:
    """The tensors the spec's mods read: their values, else random ones of the declared shape (seeded)."""
    score_mod, mask_mod = trace_mods(spec)
    return example_captured(merged_captured(score_mod, mask_mod), torch.Generator().manual_seed(0), device)


def spec_predicate(spec: AttentionSpec):
    return mask_predicate(spec, trace_mods(spec)[1])


def keep_mask(case: BenchCase, device, rows: slice | None = None) -> torch.Tensor | None:
    """The case's mask as a bool tensor [B or 1, H or 1, N, M] (``rows`` of it), None when nothing is masked."""
    predicate = spec_predicate(case.spec)
    if predicate is sympy.true:
        return None
    grids = index_grids(case.batch, case.spec.num_heads, case.n, case.m, device)
    if rows is not None:
        grids["q_idx"] = grids["q_idx"][:, :, rows]
    keep = torch.as_tensor(evaluate(predicate, grids, captured_values(case.spec, device)), device=device)
    return keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))


def visible_pairs(case: BenchCase) -> int:
    """How many (batch, head, query, key) elements the mask keeps, evaluated a block of rows at a time."""
    total_rows = case.batch * case.spec.num_heads * case.n
    if spec_predicate(case.spec) is sympy.true:
        return total_rows * case.m
    step = max(1, 2**24 // max(1, case.m))
    visible = 0
    for first in range(0, case.n, step):
        rows = slice(first, min(case.n, first + step))
        keep = keep_mask(case, "cpu", rows)
        full_shape = (case.batch, case.spec.num_heads, rows.stop - rows.start, case.m)
        repeats = math.prod(size // max(1, got) for size, got in zip(full_shape, keep.shape))
        visible += int(keep.sum()) * repeats
    return visible


def useful_flops(case: BenchCase) -> int:
    """2 * D FLOPs for q . k and 2 * Dv for p * v, per visible (query, key) pair (softmax attention only)."""
    if case.spec.kind == "linear":
        raise AttnccError("useful FLOPs count softmax attention's (query, key) pairs; linear attention has none")
    return visible_pairs(case) * 2 * (case.spec.head_dim + case.spec.v_head_dim)


def input_bytes(case: BenchCase) -> int:
    spec, size = case.spec, case.dtype.itemsize
    q = case.batch * spec.num_heads * case.n * spec.head_dim
    kv = case.batch * spec.num_kv_heads * case.m * (spec.head_dim + spec.v_head_dim)
    return (q + kv) * size


def kv_bytes(case: BenchCase) -> int:
    """Bytes of K and V: what one call reads at least (all of them, for an unmasked decode step)."""
    spec = case.spec
    return case.batch * spec.num_kv_heads * case.m * (spec.head_dim + spec.v_head_dim) * case.dtype.itemsize


def mask_bytes(case: BenchCase) -> int:
    """Bytes of the precomputed bool mask the dense baselines take as input (0 when nothing is masked)."""
    predicate = spec_predicate(case.spec)
    if predicate is sympy.true:
        return 0
    names = free_symbol_names(predicate)
    batch = case.batch if "b" in names else 1
    heads = case.spec.num_heads if "h" in names else 1
    return batch * heads * case.n * case.m


def has_score_changes(spec: AttentionSpec) -> bool:
    return spec.score_mod is not None or spec.softcap is not None or spec.alibi


def naive_extra_bytes(case: BenchCase) -> int:
    """Peak memory ``naive_attention`` adds over its inputs: the formula the memory guard uses.

    Two score-sized tensors are alive at once (the scores and softmax's output), a third
    when a score modification builds a new tensor; plus the output and, for GQA, K and
    V repeated to every query head. The mask is an input (``mask_bytes``).
    """
    spec, size = case.spec, case.dtype.itemsize
    scores = case.batch * spec.num_heads * case.n * case.m * size
    total = (3 if has_score_changes(spec) else 2) * scores
    total += case.batch * spec.num_heads * case.n * spec.v_head_dim * size
    if spec.groups > 1:
        total += case.batch * spec.num_heads * case.m * (spec.head_dim + spec.v_head_dim) * size
    return total


def score_function(case: BenchCase, device) -> Callable | None:
    """The spec's score changes (alibi, score_mod, softcap) applied to a dense [B, H, N, M] score tensor."""
    spec = case.spec
    if not has_score_changes(spec):
        return None
    grids = index_grids(case.batch, spec.num_heads, case.n, case.m, device)
    captured = captured_values(spec, device)
    offset = 0 if spec.alignment == "top_left" else case.m - case.n

    def apply(scores):
        if spec.alibi:
            slope = torch.as_tensor(evaluate(alibi_slope(spec.num_heads), grids, captured)).to(device, scores.dtype)
            scores = scores - slope * (grids["q_idx"] + offset - grids["kv_idx"]).abs()
        if callable(spec.score_mod):
            scores = spec.score_mod(scores, grids["b"], grids["h"], grids["q_idx"], grids["kv_idx"]).to(scores.dtype)
        elif spec.score_mod is not None:
            env = {**grids, "score": scores}
            scores = torch.as_tensor(evaluate(spec.score_mod.expr, env, captured)).to(scores.dtype)
        if spec.softcap is not None:
            scores = spec.softcap * torch.tanh(scores / spec.softcap)
        return scores

    return apply
