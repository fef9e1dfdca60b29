"""Run the fuzzer's long profile as parallel worker processes and count what they ran.

    python -m tests.fuzz_workers --workers 4 --seed 1 pytorch=10000 triton=1000

For each backend in turn, starts ``--workers`` pytest processes of
``tests/test_fuzz.py::test_random_specs_match_reference[backend]`` with
``ATTNCC_FUZZ_PROFILE=long``, a share of the count in ``ATTNCC_FUZZ_EXAMPLES`` and a
seed of their own in ``ATTNCC_FUZZ_SEED`` (derived from ``--seed``, the backend and the
worker, so workers draw different programs and a run can be repeated). Each worker runs
its share with no time budget and records failures instead of stopping at the first.
Prints, per backend, the examples the workers report having run, the failures, the wall
time and the worker-seconds per example; each worker's output (with every failing
program) is kept in ``--logs``. Exits 1 if any example failed or a worker ended without
its report.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from attncc.backends import BACKENDS

REPORT = re.compile(r"^fuzz (\S+) \(long, seed (-?\d+)\): (\d+) examples run, (\d+) failed, in ([\d.]+) s$", re.M)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Worker:
    backend: str
    seed: int
    examples: int
    log: Path
    process: subprocess.Popen


def worker_seed(seed: int, backend: str, worker: int) -> int:
    """A seed per (run seed, backend, worker): distinct programs in every worker of every backend."""
    return int(hashlib.sha256(f"{seed}/{backend}/{worker}".encode()).hexdigest()[:8], 16)


def shares(total: int, workers: int) -> list[int]:
    """``total`` split into ``workers`` counts that differ by at most one (no empty shares)."""
    base, extra = divmod(total, workers)
    return [base + (i < extra) for i in range(workers) if base + (i < extra) > 0]


def start_worker(backend: str, seed: int, examples: int, log: Path) -> Worker:
    env = dict(os.environ, ATTNCC_FUZZ_PROFILE="long", ATTNCC_FUZZ_EXAMPLES=f"{backend}={examples}",
               ATTNCC_FUZZ_SEED=str(seed))  # fmt: skip
    test = f"tests/test_fuzz.py::test_random_specs_match_reference[{backend}]"
    # -n 0: one process per worker (not the suite's pytest-xdist workers), so -s shows its report
    command = [sys.executable, "-m", "pytest", test, "-p", "no:cacheprovider", "-n", "0", "-q", "-s"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Worker(backend, seed, examples, log, process)


def run_backend(backend: str, total: int, workers: int, seed: int, logs: Path) -> dict:
    start = time.monotonic()
    running = [
        start_worker(backend, worker_seed(seed, backend, i), share, logs / f"{backend}-{i}.log")
        for i, share in enumerate(shares(total, workers))
    ]
    examples = failed = 0
    busy = 0.0
    missing = []
    for worker in running:
        worker.process.wait()
        found = REPORT.search(worker.log.read_text())
        if found is None:
            missing.append(str(worker.log))
            continue
        examples += int(found.group(3))
        failed += int(found.group(4))
        busy += float(found.group(5))
    wall = time.monotonic() - start
    return {
        "backend": backend,
        "workers": len(running),
        "examples run": examples,
        "failed": failed,
        "wall s": round(wall),
        "worker s / example": round(busy / examples, 2) if examples else None,
        "workers without a report": ", ".join(missing) or "-",
    }


def parse_counts(items: list[str]) -> dict[str, int]:
    counts = {}
    for item in items:
        backend, _, count = item.partition("=")
        if backend not in BACKENDS or not count.isdigit() or int(count) == 0:
            raise SystemExit(
                f"{item!r} is invalid: backend=count with a backend among {', '.join(BACKENDS)} and a positive "
                "count, e.g. pytorch=10000"
            )
        counts[backend] = int(count)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="+", help="backend=examples, e.g. pytorch=10000 triton=1000")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes per backend")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (each worker derives its own)")
    parser.add_argument("--logs", type=Path, default=None, help="directory for the workers' output")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise SystemExit(f"--workers={args.workers} is invalid: at least 1 is allowed")
    counts = parse_counts(args.counts)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="attncc-fuzz-"))
    logs.mkdir(parents=True, exist_ok=True)
    rows = [run_backend(backend, total, args.workers, args.seed, logs) for backend, total in counts.items()]
    print(tabulate(rows, headers="keys"))
    print(f"worker logs: {logs}")
    return int(any(row["failed"] or row["workers without a report"] != "-" for row in rows))


if __name__ == "__main__":
    sys.exit(main())
