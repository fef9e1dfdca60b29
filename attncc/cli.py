"""The attncc command line: compile, inspect, validate and benchmark TOML attention specs."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

import attncc
import attncc.bench
from attncc.backends import BACKENDS
from attncc.cache import CacheWarning
from attncc.errors import AttnccError
from attncc.ir.cost import cost_table, parse_sizes
from attncc.tiles import tile_report

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _compile(args) -> int:
    attn = attncc.compile(attncc.load_spec(args.spec), backend=args.backend)
    if attn.backend == "cuda":
        return _export_cuda(attn, args.output)
    if args.output is None:
        sys.stdout.write(attn.source)
        return 0
    Path(args.output).write_text(attn.source, encoding="utf-8")
    if isinstance(attn, attncc.CompiledLinearAttention):
        signature = "attention(q, k, v, kv=None, k_sum=None) -> (o, kv, k_sum)"
    else:
        signature = f"attention(q, k, v{''.join(', ' + n for n in attn._captured_meta)}) -> (o, lse)"
    print(f"wrote {args.output}: {signature}, backend {attn.backend}")
    return 0


def _export_cuda(attn, output: str | None) -> int:
    """The self-contained CUDA source (and, next to it, the header declaring its C ABI)."""
    source, header = attn.module.CUDA_SOURCE, attn.module.CUDA_HEADER
    if output is None:
        sys.stdout.write(source)
        return 0
    path = Path(output)
    header_path = path.with_suffix(".h")
    if header_path == path:
        raise AttnccError(f"-o {output!r} is invalid for backend cuda: a .cu file name is allowed (the header is .h)")
    path.write_text(source, encoding="utf-8")
    header_path.write_text(header, encoding="utf-8")
    captured = "".join(f", {name}" for name in attn.module.CAPTURED_NAMES)
    print(f"wrote {output} and {header_path}: attncc_attention_forward / attncc_attention_backward(q, k, v{captured}, "
          "stream), backend cuda")  # fmt: skip
    return 0


def _inspect(args) -> int:
    spec = attncc.load_spec(args.spec)
    attn = attncc.compile(
        spec,
        backend=args.backend,
        print_after_all=args.print_after_all,
        print_after=tuple(args.print_after or ()),
        validate_each=args.validate_each,
    )
    if not args.print_after_all:
        print(f"// ----- input IR -----\n{attn.unoptimized_graph}")
        print(f"// ----- optimized IR ({attn.backend} pipeline) -----\n{attn.graph}")
    if args.validate_each:
        worst = max((r.max_change or 0.0) for r in attn.pass_records)
        print(f"translation validation: every pass preserved the meaning (largest change {worst:.1e}, float64)")
    if args.cost:
        sizes = parse_sizes(args.cost)
        stages = [("(input)", attn.unoptimized_graph)] + [(r.description, r.graph) for r in attn.pass_records]
        print(f"cost at {', '.join(f'{k}={v}' for k, v in sizes.items())} (T = 2 bytes):")
        print(cost_table(stages, sizes))
    if args.tiles:
        sizes = parse_sizes(args.tiles, "--tiles")
        print(tile_report(attn, sizes.get("N", 1), sizes.get("M", sizes.get("N", 1)), sizes["B"], args.tile_png))
    if args.dot:
        Path(args.dot).write_text(attn.graph.to_dot() + "\n", encoding="utf-8")
        print(f"wrote {args.dot}")
    return 0


def _validate(args) -> int:
    spec = attncc.load_spec(args.spec)
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else list(DTYPES.values())
    report = attncc.validate(spec, backend=args.backend, dtypes=dtypes, seed=args.seed, verbose=True)
    print("all outputs match the float64 reference" if report.ok else "MISMATCH against the float64 reference")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attncc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"attncc {attncc.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    compile_ = commands.add_parser("compile", help="generate the attention module for a spec")
    compile_.add_argument("spec", help="a TOML spec file (see examples/)")
    compile_.add_argument("--backend", default="pytorch", choices=sorted(BACKENDS))
    compile_.add_argument("-o", "--output", help="write the standalone source here instead of printing it")
    compile_.set_defaults(run=_compile)

    inspect = commands.add_parser("inspect", help="print the IR of a spec before and after the passes")
    inspect.add_argument("spec")
    inspect.add_argument("--backend", default="pytorch", choices=sorted(BACKENDS), help="whose pass pipeline to run")
    inspect.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    inspect.add_argument("--print-after", action="append", metavar="PASS", help="print the IR after this pass")
    inspect.add_argument("--validate-each", action="store_true", help="check every pass against the reference")
    inspect.add_argument("--cost", metavar="N=..,M=..", help="print FLOPs, bytes and peak memory after each pass")
    inspect.add_argument("--dot", help="also write the optimized graph in Graphviz format to this file")
    inspect.add_argument("--tiles", metavar="N=..,M=..", help="count the tiles computed against the minimum needed")
    inspect.add_argument("--tile-png", metavar="FILE", help="with --tiles: draw the tile map (needs matplotlib)")
    inspect.set_defaults(run=_inspect)

    validate = commands.add_parser("validate", help="check the compiled program against the float64 reference")
    validate.add_argument("spec")
    validate.add_argument("--backend", default="pytorch", choices=sorted(BACKENDS))
    validate.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default: all")
    validate.add_argument("--seed", type=int, default=0)
    validate.set_defaults(run=_validate)

    bench = commands.add_parser(
        "bench", help="time attncc against SDPA, naive eager attention and torch.compile(flex_attention)"
    )
    attncc.bench.add_arguments(bench)
    bench.set_defaults(run=attncc.bench.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores showwarning afterwards
        warnings.showwarning = _show_warning
        try:
            return args.run(args)
        except AttnccError as error:
            print(f"attncc: error: {error}", file=sys.stderr)
            return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A CacheWarning as one line without a source location; other warnings as Python prints them."""
    if issubclass(category, CacheWarning):
        print(f"attncc: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


if __name__ == "__main__":
    sys.exit(main())
