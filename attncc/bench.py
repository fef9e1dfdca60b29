"""Benchmarks: attncc's backends side by side with SDPA, a naive eager attention and compiled FlexAttention.

``attncc bench`` times one spec file at the sequence lengths asked for, or a named
suite (``SUITES``). Every (case, implementation) pair runs in its own Python process
(``worker_main``), so that peak memory and compile latency start from a clean
state and a crash or an out-of-memory kill costs one row, not the run.

What a row reports:

- ``median``: the median wall time of the timed calls after ``warmup`` untimed ones
  (at least ``repeats`` calls, fewer only when one call takes longer than the time
  budget allows; CUDA is synchronised around each call).
- ``useful FLOP/s``: ``2 * (D + Dv)`` FLOPs per *visible* (query, key) pair (the two
  matmuls; masked pairs and softmax are not counted) divided by the median time, so
  a causal mask halves the work and skipping masked tiles shows up as speed.
- ``peak extra``: memory the call adds over what the process held just before it,
  its output included; inputs (q, k, v and any precomputed mask) are excluded. CPU:
  the resident-set high-water mark (Linux ``VmHWM``) is reset through
  ``/proc/self/clear_refs`` after warm-up and ``malloc_trim``, one call runs, and
  ``VmHWM - VmRSS(before)`` is reported: what the operating system had to provide,
  including allocations outside torch (oneDNN, BLAS). CUDA:
  ``torch.cuda.max_memory_allocated()`` over the call minus ``memory_allocated()``
  before it.
- ``compile``: spec to runnable module, in a process whose attncc and inductor caches
  are empty ("cold"), and a second time in the same process with the caches filled
  ("warm"; FlexAttention: after ``torch._dynamo.reset()``). For
  ``torch.compile(flex_attention)``, compilation happens in the first call, so its
  compile time is the first call minus the median; ``block mask`` is the time of
  ``create_block_mask``, reported separately.
- ``max |o - first|``: every implementation's output against the case's first one,
  so a baseline that computes something else cannot hide in a table.

Implementations whose memory need (from a formula, or from attncc's cost model) is
above ``memory_limit`` are not run; the row says how much they would need.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import sympy
import torch
from tabulate import tabulate

import attncc
from attncc.errors import AttnccError
from attncc.frontend.lower import alibi_slope, mask_predicate, merged_captured, trace_mods
from attncc.interpreter import evaluate, index_grids
from attncc.ir.cost import graph_cost
from attncc.ir.expr import free_symbol_names
from attncc.spec import AttentionSpec
from attncc.validation import example_captured

GIB = 2**30
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESULT_MARKER = "attncc-bench-result: "
# torch.nn.attention.SDPBackend member per implementation name; "sdpa" is torch's own choice.
SDPA_BACKENDS = {
    "sdpa-math": "MATH",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}
MAX_LIMIT_BYTES = 20 * GIB  # never plan to allocate more than this, whatever the machine has
# (backend, device type) pairs whose programs run in an interpreter: not timing targets, so
# they run only when asked for by name (e.g. --impl attncc-triton on CPU).
INTERPRETED = {("triton", "cpu"): "Triton runs its kernels in an interpreter on CPU tensors"}


class Unsupported(Exception):
    """An implementation cannot express this case (e.g. SDPA and a score_mod); the row says why."""


# --------------------------------------------------------------------------- cases and suites


@dataclass(frozen=True)
class BenchCase:
    """One attention problem: a spec at fixed sizes.

    ``mask`` labels the case in tables and plots; ``implementations`` limits what runs
    (None: every implementation available on the device).
    """

    name: str
    mask: str
    spec: AttentionSpec
    batch: int
    n: int
    m: int
    dtype: torch.dtype = torch.float32
    implementations: tuple[str, ...] | None = None


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


def cpu_suite(device) -> list[BenchCase]:
    """B=1, H=8, D=64, fp32, N=M in {1024, 4096}: dense, causal, sliding window 256, 8 packed documents."""
    cases = []
    for n in (1024, 4096):
        masks = {
            "dense": {},
            "causal": {"causal": True},
            "sliding window 256": {"causal": True, "window": (256, 0)},
            "document (8 docs)": {"mask_mod": document_causal_mask(document_ids(n, 8, seed=n, device=device))},
        }
        for mask, fields in masks.items():
            spec = AttentionSpec(num_heads=8, head_dim=64, **fields)
            cases.append(BenchCase(f"{mask} N=M={n}", mask, spec, 1, n, n))
    return cases


def passes_suite(device) -> list[BenchCase]:
    """The [passes] issue's benchmark: streaming memory against naive eager attention, time against SDPA."""
    causal = AttentionSpec(num_heads=8, head_dim=64, causal=True)
    dense = AttentionSpec(num_heads=8, head_dim=64)
    against_naive = ("attncc-pytorch", "naive")
    return [
        BenchCase("causal N=M=8192", "causal", causal, 1, 8192, 8192, implementations=against_naive),
        BenchCase("causal N=M=16384", "causal", causal, 1, 16384, 16384, implementations=against_naive),
        BenchCase("dense N=M=8192", "dense", dense, 1, 8192, 8192, implementations=("attncc-pytorch", "sdpa")),
    ]


def sparsity_suite(device) -> list[BenchCase]:
    """The [sparsity] issue's benchmark: B=1, H=8, N=M=8192, D=64, fp32.

    Causal sliding window 256 against SDPA with a dense boolean mask and against
    torch.compile(flex_attention); dense causal against SDPA(is_causal=True); 8 packed
    documents of random lengths (causal within each) against SDPA with the dense mask.
    """
    n = 8192
    window = AttentionSpec(num_heads=8, head_dim=64, causal=True, window=(256, 0))
    causal = AttentionSpec(num_heads=8, head_dim=64, causal=True)
    documents = AttentionSpec(num_heads=8, head_dim=64,
                              mask_mod=document_causal_mask(document_ids(n, 8, seed=n, device=device)))  # fmt: skip
    return [
        BenchCase(f"sliding window 256 N=M={n}", "sliding window 256", window, 1, n, n,
                  implementations=("attncc-pytorch", "sdpa", "flex-compiled")),  # fmt: skip
        BenchCase(f"causal N=M={n}", "causal", causal, 1, n, n, implementations=("attncc-pytorch", "sdpa")),
        BenchCase(f"document (8 docs) N=M={n}", "document (8 docs)", documents, 1, n, n,
                  implementations=("attncc-pytorch", "sdpa")),  # fmt: skip
    ]


# Named suites: name -> function(device) -> cases. A new suite is one line here
# (e.g. "gpu": gpu_suite); workers rebuild a suite's cases by name, so a suite
# function must return the same cases every time it is called.
SUITES: dict[str, Callable[[torch.device], list[BenchCase]]] = {
    "cpu": cpu_suite,
    "passes": passes_suite,
    "sparsity": sparsity_suite,
}


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


@dataclass(frozen=True)
class CaseSource:
    """Where cases come from, so that a worker process can rebuild them: a suite, or a spec file at sizes."""

    suite: str | None = None
    spec_path: str | None = None
    batch: int = 1
    lengths: tuple[tuple[int, int], ...] = ()
    dtype: str = "float32"

    def cases(self, device) -> list[BenchCase]:
        device = torch.device(device)
        if self.suite is not None:
            if self.suite not in SUITES:
                raise AttnccError(f"suite={self.suite!r} is unknown; known suites: {', '.join(SUITES)}")
            return SUITES[self.suite](device)
        spec = attncc.load_spec(self.spec_path)
        label = describe_mask(spec)
        return [
            BenchCase(f"{Path(self.spec_path).stem} N={n} M={m}", label, spec, self.batch, n, m, DTYPES[self.dtype])
            for n, m in self.lengths
        ]


# --------------------------------------------------------------------------- what a case computes


def captured_values(spec: AttentionSpec, device) -> dict[str, torch.Tensor]:
    """The tensors the spec's mods read: their values, else random ones of the declared shape (seeded)."""
    score_mod, mask_mod = trace_mods(spec)
    return example_captured(merged_captured(score_mod, mask_mod), torch.Generator().manual_seed(0), device)


def _predicate(spec: AttentionSpec):
    return mask_predicate(spec, trace_mods(spec)[1])


def keep_mask(case: BenchCase, device, rows: slice | None = None) -> torch.Tensor | None:
    """The case's mask as a bool tensor [B or 1, H or 1, N, M] (``rows`` of it), None when nothing is masked."""
    predicate = _predicate(case.spec)
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
    if _predicate(case.spec) is sympy.true:
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
    """2 * D FLOPs for q . k and 2 * Dv for p * v, per visible (query, key) pair."""
    return visible_pairs(case) * 2 * (case.spec.head_dim + case.spec.v_head_dim)


def input_bytes(case: BenchCase) -> int:
    spec, size = case.spec, case.dtype.itemsize
    q = case.batch * spec.num_heads * case.n * spec.head_dim
    kv = case.batch * spec.num_kv_heads * case.m * (spec.head_dim + spec.v_head_dim)
    return (q + kv) * size


def mask_bytes(case: BenchCase) -> int:
    """Bytes of the precomputed bool mask the dense baselines take as input (0 when nothing is masked)."""
    predicate = _predicate(case.spec)
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


# --------------------------------------------------------------------------- implementations


@dataclass
class Setup:
    """An implementation ready for a case: ``bind(q, k, v)`` gives the call to time.

    ``extra_bytes``: memory one call needs beyond its inputs, when known beforehand;
    ``compile_s``: spec to runnable module; ``warm_compile()`` compiles again and
    returns the seconds it took (or None); ``compiles_on_first_call``: compile time is
    the first call minus the median (torch.compile).
    """

    bind: Callable
    extra_bytes: int | None = None
    compile_s: float | None = None
    block_mask_s: float | None = None
    warm_compile: Callable | None = None
    compiles_on_first_call: bool = False
    precomputed_bytes: int = 0


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _setup_attncc(backend: str):
    def setup(case: BenchCase, device) -> Setup:
        attn, seconds = _timed(lambda: attncc.compile(case.spec, backend=backend))
        attn = attn.to(device)
        sizes = {"B": case.batch, "N": case.n, "M": case.m}
        peak = graph_cost(attn.graph, dtype_bytes=case.dtype.itemsize).at(sizes).peak_memory
        extra = int(peak) if sympy.sympify(peak).is_number else None

        def warm() -> float:
            return _timed(lambda: attncc.compile(case.spec, backend=backend))[1]

        captured = captured_values(case.spec, device)  # spec files may leave their values to the call
        return Setup(lambda q, k, v: lambda: attn(q, k, v, **captured), extra, seconds, warm_compile=warm)

    return setup


def naive_attention(q, k, v, scale: float, hidden: torch.Tensor | None = None, score_fn=None):
    """Textbook eager attention: softmax(q k^T * scale, masked) v, every score materialised.

    ``hidden`` is True where a score is masked out. Computes in the input dtype, as
    eager model code does. A fully masked row gives NaN (softmax of all -inf).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if score_fn is not None:
        scores = score_fn(scores)
    if hidden is not None:
        scores.masked_fill_(hidden, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    del scores
    return torch.matmul(probs, v)


def _scale(spec: AttentionSpec) -> float:
    return spec.scale if spec.scale is not None else 1 / math.sqrt(spec.head_dim)


def _setup_naive(case: BenchCase, device) -> Setup:
    score_fn = score_function(case, device)

    def bind(q, k, v):
        keep = keep_mask(case, device)
        hidden = None if keep is None else ~keep
        return lambda: naive_attention(q, k, v, _scale(case.spec), hidden, score_fn)

    return Setup(bind, naive_extra_bytes(case), precomputed_bytes=mask_bytes(case))


def _sdpa_plan(case: BenchCase) -> tuple[str, int]:
    """How SDPA expresses the case ("none", "causal", "mask" or "bias"), and the bytes of the mask it takes."""
    spec = case.spec
    if spec.score_mod is not None or spec.softcap is not None:
        raise Unsupported("SDPA cannot apply a score_mod or softcap")
    if spec.alibi:  # the ALiBi bias, -inf where masked, as a float attn_mask
        return "bias", spec.num_heads * case.n * case.m * case.dtype.itemsize
    plain_causal = spec.causal and spec.window is None and spec.mask_mod is None
    if plain_causal and (case.n == case.m or spec.causal == "top_left"):
        return "causal", 0  # SDPA's is_causal is top-left aligned: exact when N == M
    return ("mask", mask_bytes(case)) if mask_bytes(case) else ("none", 0)


def _sdpa_arguments(case: BenchCase, device, plan: str) -> dict:
    if plan == "causal":
        return {"is_causal": True}
    keep = keep_mask(case, device)
    if plan != "bias":
        return {"attn_mask": keep}
    heads = case.spec.num_heads
    bias = score_function(case, device)(torch.zeros(1, heads, case.n, case.m, device=device))
    if keep is not None:
        bias = bias.masked_fill(~keep, -math.inf)
    return {"attn_mask": bias.to(case.dtype)}


def _setup_sdpa(name: str):
    def setup(case: BenchCase, device) -> Setup:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        plan, precomputed = _sdpa_plan(case)
        backend = SDPA_BACKENDS.get(name)
        extra = None
        if name == "sdpa-math":
            # The math backend materialises scores and probabilities, and a float copy of a mask.
            extra = naive_extra_bytes(case) + case.batch * case.spec.num_heads * case.n * case.m * case.dtype.itemsize

        def bind(q, k, v):
            options = {**_sdpa_arguments(case, device, plan), "scale": case.spec.scale,
                       "enable_gqa": case.spec.groups > 1}  # fmt: skip

            def run():
                context = sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext()
                with context:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **options)

            return run

        return Setup(bind, extra, precomputed_bytes=precomputed)

    return setup


def flex_mods(case: BenchCase, device) -> tuple[Callable | None, Callable | None, tuple[int | None, int | None]]:
    """(score_mod, mask_mod, (B, H) for create_block_mask) expressing the case with FlexAttention's mods."""
    spec = case.spec
    offset = 0 if spec.alignment == "top_left" else case.m - case.n
    score_parts = []
    if spec.alibi:
        heads = {"h": torch.arange(spec.num_heads, device=device)}
        slopes = torch.as_tensor(evaluate(alibi_slope(spec.num_heads), heads, {})).to(device, torch.float32)
        score_parts.append(lambda score, b, h, q_idx, kv_idx: score - slopes[h] * (q_idx + offset - kv_idx).abs())
    if spec.score_mod is not None:
        if not callable(spec.score_mod):
            raise Unsupported("FlexAttention needs a Python score_mod; this spec's score is an expression")
        score_parts.append(spec.score_mod)
    if spec.softcap is not None:
        cap = spec.softcap
        score_parts.append(lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap))

    mask_parts = []
    if spec.causal:
        mask_parts.append(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + offset)
    if spec.window is not None:
        left, right = spec.window
        if left is not None:
            mask_parts.append(lambda b, h, q_idx, kv_idx: kv_idx >= q_idx + offset - left)
        if right is not None and not spec.causal:
            mask_parts.append(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + offset + right)
    if callable(spec.mask_mod):
        mask_parts.append(spec.mask_mod)
    elif spec.mask_mod is not None:
        keep = keep_mask(case, device)  # an expression from a spec file: look its values up
        mask_parts = [lambda b, h, q_idx, kv_idx: keep[b * int(keep.shape[0] > 1), h * int(keep.shape[1] > 1),
                                                         q_idx, kv_idx]]  # fmt: skip

    def score_mod(score, b, h, q_idx, kv_idx):
        for part in score_parts:
            score = part(score, b, h, q_idx, kv_idx)
        return score

    def mask_mod(b, h, q_idx, kv_idx):
        keep = mask_parts[0](b, h, q_idx, kv_idx)
        for part in mask_parts[1:]:
            keep = keep & part(b, h, q_idx, kv_idx)
        return keep

    names = free_symbol_names(_predicate(spec))
    sizes = (case.batch if "b" in names else None, spec.num_heads if "h" in names else None)
    return (score_mod if score_parts else None), (mask_mod if mask_parts else None), sizes


def _setup_flex(compiled: bool):
    def setup(case: BenchCase, device) -> Setup:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        score_mod, mask_mod, (batch, heads) = flex_mods(case, device)
        block_mask, block_seconds = None, None
        if mask_mod is not None:
            block_mask, block_seconds = _timed(
                lambda: create_block_mask(mask_mod, batch, heads, case.n, case.m, device=device)
            )
        function = torch.compile(flex_attention) if compiled else flex_attention
        options = {"score_mod": score_mod, "block_mask": block_mask, "scale": case.spec.scale,
                   "enable_gqa": case.spec.groups > 1}  # fmt: skip
        inputs = {}

        def bind(q, k, v):
            inputs.update(q=q, k=k, v=v)
            return lambda: function(q, k, v, **options)

        def warm() -> float:
            torch._dynamo.reset()
            again = torch.compile(flex_attention)
            _, first = _timed(lambda: _synchronized(lambda: again(inputs["q"], inputs["k"], inputs["v"], **options)))
            return first

        return Setup(bind, block_mask_s=block_seconds, warm_compile=warm if compiled else None,
                     compiles_on_first_call=compiled)  # fmt: skip

    return setup


def available_implementations(device) -> dict[str, Callable]:
    """Implementation name -> setup(case, device) for everything that runs on this device."""
    from attncc.backends import BACKENDS, get_backend

    device = torch.device(device)
    found = {}
    for backend in BACKENDS:
        try:
            module = get_backend(backend)
        except (ImportError, AttnccError):
            continue  # e.g. triton not installed
        if device.type in module.devices and (backend, device.type) not in INTERPRETED:
            found[f"attncc-{backend}"] = _setup_attncc(backend)
    for name in sdpa_backends_available(device):
        found[name] = _setup_sdpa(name)
    found["naive"] = _setup_naive
    if _flex_importable():
        found["flex-compiled"] = _setup_flex(compiled=True)
    return found


def optional_implementations(device) -> dict[str, Callable]:
    """Implementations that run only when asked for by name: SDPA's own dispatch, eager FlexAttention,
    attncc backends that would run in an interpreter (``INTERPRETED``)."""
    device = torch.device(device)
    found = {f"attncc-{backend}": _setup_attncc(backend) for backend, kind in INTERPRETED if kind == device.type}
    found["sdpa"] = _setup_sdpa("sdpa")
    if _flex_importable():
        found["flex-eager"] = _setup_flex(compiled=False)
    return found


def _flex_importable() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def sdpa_backends_available(device) -> list[str]:
    """The SDPA backends that run a small causal problem on this device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 16, 64, device=device)
    names = []
    for name, member in SDPA_BACKENDS.items():
        if not hasattr(SDPBackend, member):
            continue
        try:
            with sdpa_kernel([getattr(SDPBackend, member)]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        except RuntimeError:
            continue
        names.append(name)
    return names


# --------------------------------------------------------------------------- measuring


def _synchronized(fn):
    result = fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result


def time_calls(run: Callable, warmup: int, repeats: int, budget_s: float) -> tuple[float, list[float]]:
    """Time ``run``: (seconds of the first call, seconds of each timed call).

    After the first call, ``warmup`` untimed calls, then ``repeats`` timed ones; once
    three timed calls took longer than ``budget_s`` together, the rest are skipped.
    """
    _, first = _timed(lambda: _synchronized(run))
    for _ in range(warmup):
        _synchronized(run)
    times = []
    while len(times) < repeats:
        times.append(_timed(lambda: _synchronized(run))[1])
        if len(times) >= 3 and sum(times) > budget_s:
            break
    return first, times


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} is not in /proc/self/status")


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: hand freed heap pages back, so reuse shows up


def peak_extra_memory(run: Callable, device) -> tuple[torch.Tensor, int | None]:
    """(output, bytes the call added at its peak over the memory held before it); None if unmeasurable here."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        output = _synchronized(run)
        return output, torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return run(), None
    _release_free_memory()
    try:
        before = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # reset VmHWM to the current resident size (Linux >= 4.0)
    except OSError:
        return run(), None
    output = run()
    return output, _proc_status_bytes("VmHWM") - before


def memory_limit_default(device) -> int:
    """Half the memory available now (CPU) or 90% of the free device memory (CUDA), at most 20 GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 8 * GIB
    return min(MAX_LIMIT_BYTES, available // 2)


def make_inputs(case: BenchCase, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    spec = case.spec
    shapes = ((case.batch, spec.num_heads, case.n, spec.head_dim), (case.batch, spec.num_kv_heads, case.m, spec.head_dim),
              (case.batch, spec.num_kv_heads, case.m, spec.v_head_dim))  # fmt: skip
    return tuple(torch.randn(shape, generator=generator).to(device, case.dtype) for shape in shapes)


def measure(case: BenchCase, implementation: str, setup: Callable, device, *, warmup: int = 1, repeats: int = 5,
            budget_s: float = 30.0, memory_limit: int | None = None, output_path: str | None = None) -> dict:  # fmt: skip
    """Run one implementation on one case in this process; a result row (see ``run_benchmarks``).

    An implementation that cannot express the case gives status "n/a", one over the
    memory limit "skipped", one that raises "failed"; the note says why.
    """
    row = _row_without_result(case, implementation, "ok", "")
    limit = memory_limit_default(device) if memory_limit is None else memory_limit
    try:
        _measure_into(row, case, setup, device, warmup, repeats, budget_s, limit, output_path)
    except Unsupported as reason:
        row.update(status="n/a", note=str(reason))
    except torch.OutOfMemoryError:
        row.update(status="failed", note="out of memory")
    except Exception as error:  # a failing implementation is a row of the table, not the end of the run
        first_line = (str(error).splitlines() or [""])[0]
        row.update(status="failed", note=f"{type(error).__name__}: {first_line[:200]}")
    return row


def _measure_into(row: dict, case: BenchCase, setup: Callable, device, warmup: int, repeats: int, budget_s: float,
                  limit: int, output_path: str | None) -> None:  # fmt: skip
    prepared = setup(case, device)
    row.update(compile_s=prepared.compile_s, block_mask_s=prepared.block_mask_s)
    if prepared.extra_bytes is not None:
        needs = prepared.extra_bytes + input_bytes(case) + prepared.precomputed_bytes
        row["needs_bytes"] = needs
        if needs > limit:
            note = f"out of memory / skipped (needs {needs / GIB:.1f} GiB, limit {limit / GIB:.1f} GiB)"
            row.update(status="skipped", note=note)
            return
    run = prepared.bind(*make_inputs(case, device))
    first, times = time_calls(run, warmup, repeats, budget_s)
    median = statistics.median(times)
    row.update(first_s=first, times_s=times, median_s=median)
    if prepared.compiles_on_first_call:
        row["compile_s"] = max(0.0, first - median)
    output, peak = peak_extra_memory(run, device)
    row["peak_bytes"] = peak
    if output_path is not None:
        torch.save(output.detach().cpu(), output_path)
    del output
    if prepared.warm_compile is not None:  # last: FlexAttention's resets torch.compile's caches
        warm = prepared.warm_compile()
        row["compile_warm_s"] = max(0.0, warm - median) if prepared.compiles_on_first_call else warm


# --------------------------------------------------------------------------- worker processes


def worker_main(argv: list[str] | None = None) -> int:
    """Entry of a worker process: measure one (case, implementation) and print the row as JSON."""
    job = json.loads((argv if argv is not None else sys.argv[1:])[0])
    device = torch.device(job["device"])
    case = CaseSource(**{**job["source"], "lengths": tuple(map(tuple, job["source"]["lengths"]))}).cases(device)[
        job["index"]
    ]
    implementations = {**available_implementations(device), **optional_implementations(device)}
    row = measure(case, job["implementation"], implementations[job["implementation"]], device,
                  warmup=job["warmup"], repeats=job["repeats"], budget_s=job["budget_s"],
                  memory_limit=job["memory_limit"], output_path=job["output_path"])  # fmt: skip
    print(RESULT_MARKER + json.dumps(row), flush=True)
    return 0


def _run_worker(job: dict, scratch: Path, timeout_s: float) -> dict | str:
    """The worker's row, or why there is none. Each worker gets empty attncc and inductor caches."""
    caches = Path(tempfile.mkdtemp(dir=scratch, prefix="caches-"))
    env = {
        **os.environ,
        "ATTNCC_CACHE_DIR": str(caches / "attncc"),
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
    }
    command = [sys.executable, "-c", "import sys, attncc.bench; sys.exit(attncc.bench.worker_main())", json.dumps(job)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s"
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    if done.returncode < 0:
        signal = -done.returncode
        return f"worker killed by signal {signal}" + (" (out of memory?)" if signal == 9 else "")
    lines = done.stderr.strip().splitlines() or ["no output"]
    return f"worker failed: {lines[-1][:200]}"


def run_benchmarks(source: CaseSource | list[BenchCase], device="cpu", implementations: list[str] | None = None, *, warmup: int = 1,
                   repeats: int = 5, budget_s: float = 30.0, memory_limit: int | None = None,
                   timeout_s: float = 3600.0, isolate: bool = True, progress: Callable | None = None,
                   rounds: int = 1) -> list[dict]:  # fmt: skip
    """Measure every (case, implementation) of ``source``; one row (a dict) per pair.

    ``implementations`` overrides the cases' own lists (names from
    ``available_implementations``, plus ``sdpa`` and ``flex-eager``). A ``CaseSource``
    runs each pair in a worker process unless ``isolate=False``; a list of cases (which
    a worker could not rebuild) runs in this process, where compile latencies are not
    cold. ``progress(done, total, row)`` is called after each row.

    ``rounds`` > 1 measures every pair again, round after round (A, B, A, B, ...), so
    that a slow spell of a shared machine falls on all of them: a row's median is then
    the median of its rounds' medians, and ``versus_first`` (its time over the first
    implementation of its case) the median of the rounds' ratios.
    """
    if rounds < 1:
        raise AttnccError(f"rounds={rounds} is invalid: at least 1 is allowed")
    device = torch.device(device)
    if isinstance(source, CaseSource):
        cases = source.cases(device)
    else:
        cases, isolate = list(source), False
    runnable = {**available_implementations(device), **optional_implementations(device)}
    known = sorted(set(runnable) | {f"attncc-{b}" for b in _backend_names()} | set(SDPA_BACKENDS) | {"naive"})
    for name in implementations or ():
        if name not in known:
            raise AttnccError(f"implementation {name!r} is unknown; known: {', '.join(known)}")
    jobs = []
    for index, case in enumerate(cases):
        names = implementations or case.implementations or list(available_implementations(device))
        jobs.extend((index, case, name) for name in names)
    limit = memory_limit_default(device) if memory_limit is None else memory_limit
    rows = []
    with tempfile.TemporaryDirectory(prefix="attncc-bench-") as scratch:
        for position, (index, case, name) in enumerate(jobs * rounds):
            # outputs are compared once, in the first round
            output_path = str(Path(scratch) / f"output-{position}.pt") if position < len(jobs) else None
            if name not in runnable:
                row = _row_without_result(case, name, "n/a", f"not available on {device.type}")
            elif isolate:
                job = {"source": asdict(source), "index": index, "implementation": name, "device": str(device),
                       "warmup": warmup, "repeats": repeats, "budget_s": budget_s, "memory_limit": limit,
                       "output_path": output_path}  # fmt: skip
                result = _run_worker(job, Path(scratch), timeout_s)
                row = result if isinstance(result, dict) else _row_without_result(case, name, "failed", result)
            else:
                row = measure(case, name, runnable[name], device, warmup=warmup, repeats=repeats, budget_s=budget_s,
                              memory_limit=limit, output_path=output_path)  # fmt: skip
            row["output_path"] = output_path if output_path and Path(output_path).exists() else None
            rows.append(row)
            if progress is not None:
                progress(position + 1, len(jobs) * rounds, row)
        _compare_outputs(rows)
    rows = _merge_rounds([rows[r * len(jobs) : (r + 1) * len(jobs)] for r in range(rounds)])
    flops = {case.name: _useful_flops_if_known(case) for case in cases}
    for row in rows:
        row["useful_flops"] = flops[row["case"]]
        median = row.get("median_s")
        row["flops_per_s"] = flops[row["case"]] / median if median and flops[row["case"]] else None
    return rows


def _merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (case, implementation) from the rows of every round; ``versus_first`` per row."""
    merged = []
    for rows in zip(*rounds):
        row = dict(rows[0])  # the first round's compile latencies are the cold ones
        if len(rows) > 1 and all(r["status"] == "ok" for r in rows):
            row["round_medians_s"] = [r["median_s"] for r in rows]
            row["median_s"] = statistics.median(row["round_medians_s"])
            row["times_s"] = [t for r in rows for t in r["times_s"]]
            peaks = [r["peak_bytes"] for r in rows if r.get("peak_bytes") is not None]
            row["peak_bytes"] = max(peaks) if peaks else None
        elif len(rows) > 1:
            failed = next(r for r in rows if r["status"] != "ok")
            row.update(status=failed["status"], note=failed["note"])
        merged.append(row)
    first: dict[str, int] = {}
    for position, row in enumerate(merged):
        if row["status"] != "ok":
            continue
        if row["case"] not in first:
            first[row["case"]] = position
        ratios = [rows[position]["median_s"] / rows[first[row["case"]]]["median_s"] for rows in rounds]
        row["versus_first"] = statistics.median(ratios)
    return merged


def _useful_flops_if_known(case: BenchCase) -> int | None:
    try:
        return useful_flops(case)
    except AttnccError:  # the mask reads a tensor whose values only a call supplies
        return None


def _backend_names() -> list[str]:
    from attncc.backends import BACKENDS

    return list(BACKENDS)


def _row_without_result(case: BenchCase, name: str, status: str, note: str) -> dict:
    return {"case": case.name, "mask": case.mask, "implementation": name, "batch": case.batch, "n": case.n,
            "m": case.m, "dtype": str(case.dtype).removeprefix("torch."), "status": status, "note": note}  # fmt: skip


def _compare_outputs(rows: list[dict]) -> None:
    """max |o - o_first| per row, against the first row of its case that produced an output."""
    first: dict[str, tuple[str, torch.Tensor]] = {}
    for row in rows:
        path = row.pop("output_path", None)
        if path is None:
            continue
        output = torch.load(path).double()
        Path(path).unlink()
        if row["case"] not in first:
            first[row["case"]] = (row["implementation"], output)
            row["compared_to"] = None
            continue
        name, reference = first[row["case"]]
        row["compared_to"] = name
        row["max_abs_diff"] = float((output - reference).abs().max()) if output.shape == reference.shape else math.inf


# --------------------------------------------------------------------------- reporting


def format_quantity(value: float | None, unit: str, binary: bool = False) -> str:
    """3 significant digits with an SI (or, for bytes, binary) prefix; '-' for None."""
    if value is None:
        return "-"
    base = 1024.0 if binary else 1000.0
    prefixes = ["", "Ki", "Mi", "Gi", "Ti"] if binary else ["", "K", "M", "G", "T", "P"]
    index = 0
    while abs(value) >= 1000.0 and index < len(prefixes) - 1:  # 1020 MiB reads better as 0.996 GiB
        value /= base
        index += 1
    return f"{value:.3g} {prefixes[index]}{unit}"


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"


def results_table(rows: list[dict]) -> str:
    headers = ["case", "implementation", "median", "time / first", "useful FLOP/s", "peak extra", "compile cold",
               "compile warm", "block mask", "max |o - first|", "note"]  # fmt: skip
    body = []
    for row in rows:
        if row["status"] != "ok":
            body.append([row["case"], row["implementation"], "-", "-", "-", "-", "-", "-", "-", "-",
                         f"{row['status']}: {row['note']}"])  # fmt: skip
            continue
        diff = row.get("max_abs_diff")
        versus = "(first)" if row.get("compared_to") is None else f"{diff:.1e}"
        ratio = row.get("versus_first")
        body.append([
            row["case"], row["implementation"], format_seconds(row.get("median_s")),
            "-" if ratio is None else f"{ratio:.2f}x",
            format_quantity(row.get("flops_per_s"), "FLOP/s"), format_quantity(row.get("peak_bytes"), "B", True),
            format_seconds(row.get("compile_s")), format_seconds(row.get("compile_warm_s")),
            format_seconds(row.get("block_mask_s")), versus, row.get("note", ""),
        ])  # fmt: skip
    return tabulate(body, headers=headers)


def machine_description(device) -> dict:
    """What the numbers were measured on."""
    device = torch.device(device)
    info = {"python": platform.python_version(), "torch": torch.__version__, "attncc": attncc.__version__,
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}  # fmt: skip
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                               info["cpu"])  # fmt: skip
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/meminfo", encoding="ascii") as handle:
            kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
            info["memory_gib"] = round(kib / 2**20, 1)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def plot_results(rows: list[dict], path: str, title: str) -> None:
    """Median time against sequence length, one panel per mask, one line per implementation."""
    try:
        import matplotlib
    except ImportError:
        raise AttnccError("--plot needs matplotlib: pip install 'attncc[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = list(dict.fromkeys(row["mask"] for row in rows))
    figure, axes = plt.subplots(1, len(masks), figsize=(4.5 * len(masks), 4), squeeze=False)
    for axis, mask in zip(axes[0], masks):
        mine = [row for row in rows if row["mask"] == mask and row.get("median_s")]
        for name in dict.fromkeys(row["implementation"] for row in mine):
            points = sorted((row["n"], row["median_s"]) for row in mine if row["implementation"] == name)
            axis.plot([n for n, _ in points], [t * 1000 for _, t in points], marker="o", label=name)
        axis.set_title(mask)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("N = query length")
        axis.set_ylabel("median time (ms)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``attncc bench``."""
    parser.add_argument("spec", nargs="?", help="a TOML spec file to time (or give --suite)")
    parser.add_argument("--suite", help=f"a named suite instead of a spec: {', '.join(SUITES)}")
    parser.add_argument("--impl", action="append", metavar="NAME",
                        help="repeatable; default: every implementation available on the device "
                             "(attncc-<backend>, sdpa-<backend>, naive, flex-compiled; also sdpa, flex-eager)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", default="1024", help="query lengths N, comma-separated (spec files)")
    parser.add_argument("--kv-seq", help="key lengths M, comma-separated (default: M = N)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported (default 5)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every implementation this many times, alternating, and report the median "
                             "of the rounds (default 1)")  # fmt: skip
    parser.add_argument("--budget", type=float, default=30.0, metavar="S",
                        help="seconds of timed calls after which slow cases stop at 3 repeats (default 30)")  # fmt: skip
    parser.add_argument("--memory-limit", type=float, metavar="GIB",
                        help="skip implementations needing more (default: half the available memory, at most 20)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="per worker process")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="write the results as JSON to FILE (no FILE: print JSON instead of the table)")  # fmt: skip
    parser.add_argument("--plot", metavar="FILE.png", help="plot median time against N (needs matplotlib)")
    return parser


def _lengths(args) -> tuple[tuple[int, int], ...]:
    def numbers(text: str, flag: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            values = []
        if not values or any(v <= 0 for v in values):
            raise AttnccError(f"{flag}={text!r} is invalid: positive integers separated by commas are allowed")
        return values

    queries = numbers(args.seq, "--seq")
    keys = numbers(args.kv_seq, "--kv-seq") if args.kv_seq else queries
    if len(keys) == 1:
        keys = keys * len(queries)
    if len(keys) != len(queries):
        raise AttnccError(f"--kv-seq has {len(keys)} lengths and --seq {len(queries)}: give one or as many")
    return tuple(zip(queries, keys))


def command_line(args: argparse.Namespace) -> str:
    """The ``attncc bench`` command that repeats this run (options at their defaults left out)."""
    defaults = vars(add_arguments(argparse.ArgumentParser()).parse_args([]))
    words = ["attncc", "bench"] + ([args.spec] if args.spec else [])
    for key, value in vars(args).items():
        if key not in defaults or key == "spec" or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            words += [flag] if item is True or (key == "json" and item == "-") else [flag, str(item)]
    return " ".join(shlex.quote(word) for word in words)


def _progress_printer():
    """A tqdm bar when tqdm is installed, else one line per row on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = {}

    def report(done: int, total: int, row: dict) -> None:
        text = f"{row['case']} | {row['implementation']}: " + (
            format_seconds(row.get("median_s")) if row["status"] == "ok" else row["status"]
        )
        if tqdm is not None:
            if "bar" not in bar:
                bar["bar"] = tqdm(total=total, unit="run", file=sys.stderr)
            bar["bar"].set_postfix_str(text)
            bar["bar"].update(1)
            if done == total:
                bar["bar"].close()
            return
        print(f"[{done:>{len(str(total))}}/{total}] {text}", file=sys.stderr, flush=True)

    return report


def main(args: argparse.Namespace) -> int:
    """``attncc bench``: measure, then print a table (or JSON) and optionally write JSON and a plot."""
    if (args.spec is None) == (args.suite is None):
        raise AttnccError("give a spec file or --suite NAME (one of them)")
    if args.suite is not None:
        source = CaseSource(suite=args.suite)
    else:
        source = CaseSource(spec_path=args.spec, batch=args.batch, lengths=_lengths(args), dtype=args.dtype)
    if args.warmup < 0 or args.repeats < 1 or args.rounds < 1:
        raise AttnccError(f"--warmup={args.warmup} --repeats={args.repeats} --rounds={args.rounds}: "
                          "warmup >= 0, repeats >= 1 and rounds >= 1 are allowed")  # fmt: skip
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise AttnccError(f"--device={args.device!r} is invalid: e.g. cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AttnccError("--device=cuda is invalid: torch sees no CUDA device here")
    limit = None if args.memory_limit is None else int(args.memory_limit * GIB)
    rows = run_benchmarks(source, device, args.impl, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget,
                          memory_limit=limit, timeout_s=args.timeout, progress=_progress_printer(),
                          rounds=args.rounds)  # fmt: skip
    report = {
        "command": command_line(args),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "machine": machine_description(device),
        "results": rows,
    }
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(results_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
    if args.plot:
        plot_results(rows, args.plot, f"attncc bench on {report['machine'].get('gpu') or report['machine']['cpu']}")
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0 if all(row["status"] != "failed" for row in rows) else 1


__all__ = [
    "SUITES",
    "BenchCase",
    "CaseSource",
    "add_arguments",
    "available_implementations",
    "main",
    "measure",
    "naive_attention",
    "naive_extra_bytes",
    "run_benchmarks",
    "useful_flops",
    "visible_pairs",
    "worker_main",
]
