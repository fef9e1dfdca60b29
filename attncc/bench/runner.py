"""Runs (case, implementation) pairs, each in a worker process of its own, round after round, into result rows."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from attncc.bench.cases import BenchCase, input_bytes, kv_bytes, useful_flops
from attncc.bench.check import check_implementation
from attncc.bench.peers import (
    SDPA_BACKENDS,
    Unsupported,
    available_implementations,
    runnable_implementations,
    tile_variant,
)
from attncc.bench.suites import CaseSource
from attncc.bench.timing import GIB, memory_bandwidth, memory_limit_default, peak_extra_memory, time_calls
from attncc.errors import AttnccError

RESULT_MARKER = "attncc-bench-result: "


def make_inputs(case: BenchCase, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    spec = case.spec
    shapes = ((case.batch, spec.num_heads, case.n, spec.head_dim), (case.batch, spec.num_kv_heads, case.m, spec.head_dim),
              (case.batch, spec.num_kv_heads, case.m, spec.v_head_dim))  # fmt: skip
    return tuple(torch.randn(shape, generator=generator).to(device, case.dtype) for shape in shapes)


def measure(case: BenchCase, implementation: str, setup: Callable, device, *, warmup: int = 1, repeats: int = 5,
            budget_s: float = 30.0, memory_limit: int | None = None, output_path: str | None = None,
            validate: bool = False, warm_compile: bool = True) -> dict:  # fmt: skip
    """Run one implementation on one case in this process; a result row (see ``run_benchmarks``).

    An implementation that cannot express the case gives status "n/a", one over the
    memory limit "skipped", one that raises "failed"; the note says why. ``validate``
    first checks it against float64 attention (``attncc.bench.check``); ``warm_compile``
    compiles a second time to time a warm compile (FlexAttention: after resetting dynamo).
    """
    row = _row_without_result(case, implementation, "ok", "")
    limit = memory_limit_default(device) if memory_limit is None else memory_limit
    try:
        if validate:
            row["validation"] = check_implementation(case, setup, device, make_inputs)
        _measure_into(row, case, setup, device, warmup, repeats, budget_s, limit, output_path, warm_compile)
    except Unsupported as reason:
        row.update(status="n/a", note=str(reason))
    except torch.OutOfMemoryError:
        row.update(status="failed", note="out of memory")
    except Exception as error:  # a failing implementation is a row of the table, not the end of the run
        first_line = (str(error).splitlines() or [""])[0]
        row.update(status="failed", note=f"{type(error).__name__}: {first_line[:200]}")
    return row


def _measure_into(row: dict, case: BenchCase, setup: Callable, device, warmup: int, repeats: int, budget_s: float,
                  limit: int, output_path: str | None, warm_compile: bool) -> None:  # fmt: skip
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
    if case.backward:
        leaves = [t.requires_grad_() for t in make_inputs(case, device)]
        call = prepared.bind(*leaves)
        grad_o = torch.randn_like(call())

        def forward_backward():
            return torch.autograd.grad(call(), leaves, grad_o)

        _, backward_times = time_calls(forward_backward, warmup, repeats, budget_s)
        row.update(fwd_bwd_times_s=backward_times, fwd_bwd_median_s=statistics.median(backward_times))
        del leaves, call, grad_o
    if warm_compile and prepared.warm_compile is not None:  # last: FlexAttention's resets torch.compile's caches
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
    setup = tile_variant(job["implementation"]) or runnable_implementations(device)[job["implementation"]]
    row = measure(case, job["implementation"], setup, device, warmup=job["warmup"], repeats=job["repeats"],
                  budget_s=job["budget_s"], memory_limit=job["memory_limit"], output_path=job["output_path"],
                  validate=job["validate"], warm_compile=job["warm_compile"])  # fmt: skip
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
    entry = "import sys, attncc.bench.runner; sys.exit(attncc.bench.runner.worker_main())"
    command = [sys.executable, "-c", entry, json.dumps(job)]
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
                   rounds: int = 1, validate: bool = False, warm_compile: bool = True) -> list[dict]:  # fmt: skip
    """Measure every (case, implementation) of ``source``; one row (a dict) per pair.

    ``implementations`` overrides the cases' own lists (names from
    ``available_implementations``, plus ``sdpa``, ``flex-eager`` and Triton tile variants
    ``attncc-triton@BMxBNxWxS``). A ``CaseSource``
    runs each pair in a worker process unless ``isolate=False``; a list of cases (which
    a worker could not rebuild) runs in this process, where compile latencies are not
    cold. ``progress(done, total, row)`` is called after each row.

    ``rounds`` > 1 measures every pair again, round after round (A, B, A, B, ...), so
    that a slow spell of a shared machine falls on all of them: a row's median is then
    the median of its rounds' medians, and ``versus_first`` (its time over the first
    implementation of its case) the median of the rounds' ratios. Cases with ``backward``
    also time forward + backward (``fwd_bwd_*`` fields, ``versus_first_fwd_bwd``).
    ``validate`` checks each implementation against float64 attention before timing it
    (``validation`` field). ``warm_compile=False`` skips the second, warm compile.
    Cases with ``bandwidth`` get ``kv_bytes_per_s`` (K and V bytes over the median) and
    ``bandwidth_fraction`` (the median over rounds of that rate over the machine's memory
    bandwidth, measured before each round: ``memory_bandwidths``).
    """
    if rounds < 1:
        raise AttnccError(f"rounds={rounds} is invalid: at least 1 is allowed")
    device = torch.device(device)
    if isinstance(source, CaseSource):
        cases = source.cases(device)
    else:
        cases, isolate = list(source), False
    runnable = runnable_implementations(device)
    known = sorted(set(runnable) | {f"attncc-{b}" for b in _backend_names()} | set(SDPA_BACKENDS) | {"naive"})
    for name in implementations or ():
        variant = tile_variant(name)
        if variant is not None:
            runnable[name] = variant
        elif name not in known:
            raise AttnccError(f"implementation {name!r} is unknown; known: {', '.join(known)}, attncc-triton@BMxBNxWxS")
    jobs = []
    for index, case in enumerate(cases):
        names = implementations or case.implementations or list(available_implementations(device))
        jobs.extend((index, case, name) for name in names)
    limit = memory_limit_default(device) if memory_limit is None else memory_limit
    rows, bandwidths = [], []
    with tempfile.TemporaryDirectory(prefix="attncc-bench-") as scratch:
        for position, (index, case, name) in enumerate(jobs * rounds):
            if position % len(jobs) == 0 and any(case.bandwidth for case in cases):
                bandwidths.append(memory_bandwidth(device))
            # outputs are compared once, in the first round
            output_path = str(Path(scratch) / f"output-{position}.pt") if position < len(jobs) else None
            if name not in runnable:
                row = _row_without_result(case, name, "n/a", f"not available on {device.type}")
            elif isolate:
                job = {"source": asdict(source), "index": index, "implementation": name, "device": str(device),
                       "warmup": warmup, "repeats": repeats, "budget_s": budget_s, "memory_limit": limit,
                       "output_path": output_path, "validate": validate, "warm_compile": warm_compile}  # fmt: skip
                result = _run_worker(job, Path(scratch), timeout_s)
                row = result if isinstance(result, dict) else _row_without_result(case, name, "failed", result)
            else:
                row = measure(case, name, runnable[name], device, warmup=warmup, repeats=repeats, budget_s=budget_s,
                              memory_limit=limit, output_path=output_path, validate=validate,
                              warm_compile=warm_compile)  # fmt: skip
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
        both = row.get("fwd_bwd_median_s")
        # the backward does 2.5 times the forward's matmul work (five matmuls instead of two)
        row["fwd_bwd_flops_per_s"] = 3.5 * flops[row["case"]] / both if both and flops[row["case"]] else None
    by_name = {case.name: case for case in cases}
    for row in rows:
        if by_name[row["case"]].bandwidth and row.get("median_s"):
            moved = kv_bytes(by_name[row["case"]])
            medians = row.get("round_medians_s") or [row["median_s"]]
            row["kv_bytes_per_s"] = moved / row["median_s"]
            row["memory_bandwidths"] = bandwidths
            row["bandwidth_fraction"] = statistics.median(moved / t / bw for t, bw in zip(medians, bandwidths))
    return rows


def _merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (case, implementation) from the rows of every round; ``versus_first`` per row."""
    merged = []
    for rows in zip(*rounds):
        row = dict(rows[0])  # the first round's compile latencies are the cold ones
        if len(rows) > 1 and all(r["status"] == "ok" for r in rows):
            for key in ("", "fwd_bwd_"):
                if f"{key}median_s" in row:
                    row[f"{key}round_medians_s"] = [r[f"{key}median_s"] for r in rows]
                    row[f"{key}median_s"] = statistics.median(row[f"{key}round_medians_s"])
                    row[f"{key}times_s"] = [t for r in rows for t in r[f"{key}times_s"]]
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
        for key, versus in (("median_s", "versus_first"), ("fwd_bwd_median_s", "versus_first_fwd_bwd")):
            if key in row and key in merged[first[row["case"]]]:
                ratios = [rows[position][key] / rows[first[row["case"]]][key] for rows in rounds]
                row[versus] = statistics.median(ratios)
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
