"""The GPU suite: attncc's Triton kernels against SDPA's backends and compiled FlexAttention.

``run_gpu_suite()`` first validates every implementation against a float64 reference
(outputs and gradients), then times the forward and forward + backward passes at
B=4, H=32, N=M in {1024, 4096, 16384}, D in {64, 128}, bf16, for dense, causal,
sliding-window (1024) and grouped-query (32/8, causal) attention, and prints one table
headed by the GPU's name and the date.

TFLOP/s count useful work: ``4 * D`` FLOPs per visible (query, key) pair for the
forward (QK^T and PV), 2.5 times that for the backward (five matmuls instead of two),
as FlashAttention's benchmarks do; masked pairs count nothing, so skipping them shows
up as speed. Times are medians of ``triton.testing.do_bench`` (L2 flushed between calls).
An implementation that cannot run a case (no kernel for that mask, out of memory) gets
its reason in the table instead of numbers.
"""

from __future__ import annotations

import datetime
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tabulate import tabulate

import attncc
from attncc.errors import BackendError

LENGTHS = (1024, 4096, 16384)
HEAD_DIMS = (64, 128)
BATCH, HEADS = 4, 32
VALIDATION_LENGTH = 1536  # longer than the window, so the sliding window hides keys
# |x - ref| <= atol * max|ref| + rtol * |ref| in bf16 (unit roundoff u = 2^-9), for o and
# for the gradients: kernels round P and dS to bf16 before their matmuls, as FlashAttention does.
BF16_ATOL, BF16_RTOL = 16 * 2.0**-9, 2 * 2.0**-9


@dataclass(frozen=True)
class Case:
    name: str
    kv_heads: int
    causal: bool
    window: int | None = None  # keys j with i - window <= j <= i, with causal

    def keep(self, n: int, device) -> torch.Tensor | None:
        """The visible (query, key) pairs as a [n, n] boolean mask; None when all are."""
        if not self.causal:
            return None
        i = torch.arange(n, device=device).view(-1, 1)
        j = torch.arange(n, device=device).view(1, -1)
        keep = j <= i
        return keep & (j >= i - self.window) if self.window is not None else keep

    def visible_pairs(self, n: int) -> int:
        if not self.causal:
            return n * n
        if self.window is None:
            return n * (n + 1) // 2
        full = min(n, self.window + 1)
        return full * (full + 1) // 2 + (n - full) * (self.window + 1)

    def spec(self, head_dim: int) -> attncc.AttentionSpec:
        window = (self.window, 0) if self.window is not None else None
        return attncc.AttentionSpec(num_heads=HEADS, num_kv_heads=self.kv_heads, head_dim=head_dim,
                                    causal=self.causal, window=window)  # fmt: skip


CASES = (
    Case("dense", HEADS, causal=False),
    Case("causal", HEADS, causal=True),
    Case("sliding window 1024", HEADS, causal=True, window=1024),
    Case("gqa 32/8 causal", 8, causal=True),
)


class Unsupported(Exception):
    """An implementation does not run a case; the message says why."""


# An implementation makes, for a case, a head dim and a length, a function (q, k, v) -> o.
Maker = Callable[[Case, int, int], Callable]


def _attncc_triton(case: Case, head_dim: int, n: int, tile: str | None = None) -> Callable:
    pipeline = None
    if tile is not None:
        from attncc.passes import PIPELINES

        pipeline = [*PIPELINES["triton"][:-1], tile]
    attn = attncc.compile(case.spec(head_dim), backend="triton", pipeline=pipeline).cuda()
    return lambda q, k, v: attn(q, k, v)


def tile_variant(config: str) -> tuple[str, Maker]:
    """An implementation for ``BMxBNxWARPSxSTAGES`` (e.g. ``128x64x8x2``): attncc triton with those tiles."""
    try:
        block_m, block_n, warps, stages = (int(part) for part in config.lower().split("x"))
    except ValueError:
        raise attncc.AttnccError(
            f"tile config {config!r} is not BLOCK_MxBLOCK_NxWARPSxSTAGES, e.g. 128x64x8x2"
        ) from None
    tile = f"tile{{target=triton,block_m={block_m},block_n={block_n},num_warps={warps},num_stages={stages}}}"
    return f"attncc triton {config}", lambda case, head_dim, n: _attncc_triton(case, head_dim, n, tile)


def _sdpa(backend_name: str) -> Maker:
    def make(case: Case, head_dim: int, n: int) -> Callable:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        if backend_name == "MATH" and n > 4096:
            raise Unsupported("skipped: materialises B*H*N*N scores")
        mask = case.keep(n, "cuda") if case.window is not None else None
        causal = case.causal and case.window is None
        gqa = case.kv_heads != HEADS

        def run(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa
                )

        return run

    return make


def _flex(case: Case, head_dim: int, n: int) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        return keep & (kv_idx >= q_idx - case.window) if case.window is not None else keep

    block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda") if case.causal else None
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = case.kv_heads != HEADS
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


IMPLEMENTATIONS: dict[str, Maker] = {
    "attncc triton": _attncc_triton,
    "sdpa flash": _sdpa("FLASH_ATTENTION"),
    "sdpa efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa math": _sdpa("MATH"),
    "flex (torch.compile)": _flex,
}


def _inputs(case: Case, batch: int, n: int, head_dim: int, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(heads):
        return torch.randn(batch, heads, n, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)

    q, k, v = randn(HEADS), randn(case.kv_heads), randn(case.kv_heads)
    return q, k, v, randn(HEADS)


def _reference(case: Case, q, k, v, grad_o):
    """o and (dq, dk, dv) in float64, densely."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    groups = HEADS // case.kv_heads
    k64, v64 = (t.repeat_interleave(groups, dim=1) for t in leaves[1:])
    scores = leaves[0] @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    keep = case.keep(q.shape[2], q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, -math.inf)
    o = torch.softmax(scores, dim=-1) @ v64
    return o.detach(), torch.autograd.grad(o, leaves, grad_o.double())


def _error_ratio(actual, reference) -> float:
    """The worst |actual - ref| / (atol * max|ref| + rtol * |ref|); at most 1 passes."""
    reference = reference.double()
    allowed = BF16_ATOL * reference.abs().max() + BF16_RTOL * reference.abs()
    return float(((actual.double() - reference).abs() / allowed).max())


def _validate(run: Callable, case: Case, head_dim: int) -> str:
    q, k, v, grad_o = _inputs(case, 1, VALIDATION_LENGTH, head_dim, seed=1)
    reference_o, reference_grads = _reference(case, q, k, v, grad_o)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = run(*leaves)
    grads = torch.autograd.grad(o, leaves, grad_o)
    ratios = {"o": _error_ratio(o, reference_o)}
    ratios.update({name: _error_ratio(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, reference_grads)})
    worst = max(ratios, key=ratios.get)
    if not all(math.isfinite(r) and r <= 1 for r in ratios.values()):
        return f"FAIL ({worst} error {ratios[worst]:.2f}x allowed)"
    return f"ok ({ratios[worst]:.2f})"


def _time_ms(run: Callable, case: Case, batch: int, n: int, head_dim: int) -> tuple[float, float]:
    from triton.testing import do_bench

    q, k, v, grad_o = _inputs(case, batch, n, head_dim)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        forward = do_bench(lambda: run(q, k, v), return_mode="median")

    def forward_backward():
        run(*leaves).backward(grad_o)

    both = do_bench(forward_backward, grad_to_none=leaves, return_mode="median")
    return forward, both


def _reason(error: Exception) -> str:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out of memory"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:80]


def run_gpu_suite(lengths=LENGTHS, head_dims=HEAD_DIMS, cases=CASES, implementations=None, batch: int = BATCH,
                  verbose: bool = True) -> list[dict]:  # fmt: skip
    """Validate, then time every implementation on every case; print the table (``verbose``) and return its rows.

    ``implementations`` picks names of ``IMPLEMENTATIONS`` (default: all) or gives
    ``(name, maker)`` pairs such as ``tile_variant("128x64x8x2")``. Needs a CUDA GPU.
    An implementation that fails on a case (no kernel for it, out of memory) gets the
    reason in its row; the suite goes on.
    """
    if not torch.cuda.is_available():
        raise BackendError("run_gpu_suite needs a CUDA GPU, and torch.cuda.is_available() is False on this machine")
    chosen = dict(item if isinstance(item, tuple) else (item, IMPLEMENTATIONS[item])
                  for item in (implementations or IMPLEMENTATIONS))  # fmt: skip
    rows = []
    for case in cases:
        for head_dim in head_dims:
            for name, make in chosen.items():
                try:
                    validation = _validate(make(case, head_dim, VALIDATION_LENGTH), case, head_dim)
                except Exception as error:  # a row reports what went wrong; the suite goes on
                    validation = f"error: {_reason(error)}"
                for n in lengths:
                    row = {"case": case.name, "D": head_dim, "N=M": n, "implementation": name, "validation": validation}
                    try:
                        forward, both = _time_ms(make(case, head_dim, n), case, batch, n, head_dim)
                    except Exception as error:  # likewise
                        row["note"] = _reason(error)
                    else:
                        flops = 4 * head_dim * case.visible_pairs(n) * batch * HEADS
                        row.update(fwd_ms=forward, fwd_tflops=flops / forward / 1e9,
                                   fwd_bwd_ms=both, fwd_bwd_tflops=3.5 * flops / both / 1e9)  # fmt: skip
                    torch.cuda.empty_cache()
                    rows.append(row)
                    if verbose:  # each row as it comes, so that a run cut short still says what it measured
                        measured = row.get("note") or (
                            f"fwd {forward:.3g} ms {row['fwd_tflops']:.3g} TFLOP/s, "
                            f"fwd+bwd {both:.3g} ms {row['fwd_bwd_tflops']:.3g} TFLOP/s"
                        )
                        print(f"{case.name}, D={head_dim}, N={n}, {name}: {measured}; validation {validation}",
                              file=sys.stderr, flush=True)  # fmt: skip
    if verbose:
        print(format_table(rows, batch))
    return rows


def format_table(rows: list[dict], batch: int = BATCH) -> str:
    """The suite's table, headed by the GPU's name, the date and the versions."""
    import triton

    header = (
        f"attncc GPU suite on {torch.cuda.get_device_name()}, {datetime.date.today().isoformat()}: "
        f"B={batch}, H={HEADS}, bf16; attncc {attncc.__version__}, torch {torch.__version__}, triton {triton.__version__}"
    )
    body = [
        [r["case"], r["D"], r["N=M"], r["implementation"], _number(r.get("fwd_ms")), _number(r.get("fwd_tflops")),
         _number(r.get("fwd_bwd_ms")), _number(r.get("fwd_bwd_tflops")), r["validation"], r.get("note", "")]
        for r in rows
    ]  # fmt: skip
    headers = ["case", "D", "N=M", "implementation", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
               "validation", "note"]  # fmt: skip
    return header + "\n" + tabulate(body, headers=headers)


def _number(value) -> str:
    return "-" if value is None else f"{value:.3g}"


__all__ = ["CASES", "IMPLEMENTATIONS", "Case", "format_table", "run_gpu_suite", "tile_variant"]


def main(argv: list[str] | None = None) -> None:
    """``python -m attncc.benchmarks_gpu [--length N ...] [--head-dim D ...] [--case NAME ...] [--impl NAME ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m attncc.benchmarks_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, action="append", help=f"N = M (repeatable; default {LENGTHS})")
    parser.add_argument("--head-dim", type=int, action="append", help=f"head dim (repeatable; default {HEAD_DIMS})")
    parser.add_argument("--case", action="append", choices=[case.name for case in CASES],
                        help="mask case (repeatable; default all)")  # fmt: skip
    parser.add_argument("--impl", action="append", choices=list(IMPLEMENTATIONS),
                        help="implementation (repeatable; default all)")  # fmt: skip
    parser.add_argument("--tiles", action="append", metavar="BMxBNxWxS",
                        help="also time attncc triton with these tiles, warps and stages (repeatable)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    cases = tuple(case for case in CASES if case.name in args.case) if args.case else CASES
    implementations = [*(args.impl or ([] if args.tiles else IMPLEMENTATIONS)), *map(tile_variant, args.tiles or ())]
    rows = run_gpu_suite(tuple(args.length or LENGTHS), tuple(args.head_dim or HEAD_DIMS), cases, implementations,
                         args.batch)  # fmt: skip
    if args.json:
        import json

        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
