"""``attncc bench``: options, the command line that repeats a run, progress, and the table or JSON at the end."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

from attncc.bench.cases import DTYPES
from attncc.bench.report import format_quantity, format_seconds, machine_description, plot_results, results_table
from attncc.bench.runner import run_benchmarks
from attncc.bench.suites import SUITES, CaseSource
from attncc.bench.timing import GIB
from attncc.errors import AttnccError


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``attncc bench``."""
    parser.add_argument("spec", nargs="?", help="a TOML spec file to time (or give --suite)")
    parser.add_argument("--suite", help=f"a named suite instead of a spec file: {', '.join(SUITES)}")
    parser.add_argument("--impl", action="append", metavar="NAME",
                        help="repeatable; default: every implementation available on the device "
                             "(attncc-<backend>, sdpa-<backend>, naive, flex-compiled; also sdpa, flex-eager, "
                             "and attncc-triton@BMxBNxWxS for Triton tiles, warps and stages)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", help="query lengths N, comma-separated (spec files: default 1024; suites: only "
                                      "the cases of these lengths)")  # fmt: skip
    parser.add_argument("--kv-seq", help="key lengths M, comma-separated (default: M = N)")
    parser.add_argument("--case", action="append", metavar="MASK",
                        help="suites: only the cases of this mask label (repeatable), e.g. causal")  # fmt: skip
    parser.add_argument("--head-dim", type=int, action="append", metavar="D",
                        help="suites: only the cases of this head dim (repeatable)")  # fmt: skip
    parser.add_argument("--backward", action="store_true",
                        help="also time forward + backward (the gpu suite always does)")  # fmt: skip
    parser.add_argument("--validate", action="store_true",
                        help="check every implementation against float64 attention (and its gradients with "
                             "--backward) before timing it")  # fmt: skip
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process instead of one worker process per row (compile "
                             "latencies are then warm, and no second compile is timed)")  # fmt: skip
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

    queries = numbers(args.seq or "1024", "--seq")
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
        lengths = _lengths(args) if args.seq or args.kv_seq else ()
        source = CaseSource(suite=args.suite, lengths=lengths, masks=tuple(args.case or ()),
                            head_dims=tuple(args.head_dim or ()), backward=args.backward)  # fmt: skip
    else:
        if args.case or args.head_dim:
            raise AttnccError("--case and --head-dim narrow a suite: use them with --suite, not with a spec file")
        source = CaseSource(spec_path=args.spec, batch=args.batch, lengths=_lengths(args), dtype=args.dtype,
                            backward=args.backward)  # fmt: skip
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
                          rounds=args.rounds, validate=args.validate, isolate=not args.in_process,
                          warm_compile=not args.in_process)  # fmt: skip
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
        bandwidths = next((row["memory_bandwidths"] for row in rows if row.get("memory_bandwidths")), None)
        if bandwidths:
            kind = "copy kernel, read + written" if device.type == "cuda" else "reading a 1 GiB buffer"
            rates = ", ".join(format_quantity(b, "B/s") for b in bandwidths)
            print(f"memory bandwidth ({kind}), before each round: {rates}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
    if args.plot:
        plot_results(rows, args.plot, f"attncc bench on {report['machine'].get('gpu') or report['machine']['cpu']}")
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    failed = [row for row in rows if row["status"] == "failed" or row.get("validation", "").startswith("FAIL")]
    return 1 if failed else 0
