"""Benchmarks: attncc's backends side by side with SDPA, a naive eager attention and compiled FlexAttention.

The package: ``cases`` (a problem at fixed sizes and what it computes), ``suites`` (named
suites), ``peers`` (the implementations timed), ``timing`` (timed calls, peak memory),
``runner`` (worker processes, rounds, result rows), ``report`` (table, plot, machine) and
``cli`` (``attncc bench``).

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

from attncc.bench.cases import (
    DTYPES,
    BenchCase,
    describe_mask,
    document_causal_mask,
    document_ids,
    input_bytes,
    mask_bytes,
    naive_extra_bytes,
    useful_flops,
    visible_pairs,
)
from attncc.bench.cli import add_arguments, main
from attncc.bench.peers import Unsupported, available_implementations, naive_attention, optional_implementations
from attncc.bench.report import format_quantity, format_seconds, plot_results, results_table
from attncc.bench.runner import measure, run_benchmarks, worker_main
from attncc.bench.suites import SUITES, CaseSource
from attncc.bench.timing import GIB, time_calls

__all__ = [
    "DTYPES",
    "GIB",
    "SUITES",
    "BenchCase",
    "CaseSource",
    "Unsupported",
    "add_arguments",
    "available_implementations",
    "describe_mask",
    "document_causal_mask",
    "document_ids",
    "format_quantity",
    "format_seconds",
    "input_bytes",
    "main",
    "mask_bytes",
    "measure",
    "naive_attention",
    "naive_extra_bytes",
    "optional_implementations",
    "plot_results",
    "results_table",
    "run_benchmarks",
    "time_calls",
    "useful_flops",
    "visible_pairs",
    "worker_main",
]
