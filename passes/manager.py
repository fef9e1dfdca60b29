"""The PassManager: runs a pipeline, verifies the IR after every pass, prints and validates on request.

Translation validation (``validate_each``) runs the float64 reference interpreter on
the graph before and after each pass, on small random inputs, and raises a
ValidationError naming the pass that changed what the graph computes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from attncc.errors import AttnccError, ValidationError
from attncc.interpreter import run_reference
from attncc.ir.graph import Graph, verify
from attncc.passes.base import Pass
from attncc.validation import clip_lengths, graph_index_uses, random_qkv

# Translation validation compares float64 results: a correct rewrite changes them by rounding only.
VALIDATION_TOLERANCE = 1e-9
VALIDATION_SHAPES = ((2, 37, 45), (1, 45, 21))


@dataclass
class PassRecord:
    """What one pass did: its counters, the graph after it and, if validated, the largest change."""

    name: str
    description: str
    stats: dict
    graph: Graph
    seconds: float
    max_change: float | None = None


@dataclass
class PassManager:
    passes: list[Pass]
    print_after_all: bool = False
    print_after: tuple[str, ...] = ()
    validate_each: bool = False
    captured: dict = field(default_factory=dict)
    seed: int = 0
    stream: object = None
    records: list[PassRecord] = field(default_factory=list)

    def run(self, graph: Graph) -> Graph:
        unknown = sorted(set(self.print_after) - {p.name for p in self.passes})
        if unknown:
            names = ", ".join(p.name for p in self.passes)
            raise AttnccError(f"print_after={unknown[0]!r} names no pass of this pipeline; its passes: {names}")
        self.records = []
        probes = self._probe_inputs(graph) if self.validate_each else []
        expected = [run_reference(graph, *qkv, self.captured) for qkv in probes]
        for pass_ in self.passes:
            pass_.stats.clear()
            start = time.perf_counter()
            result = pass_.run(graph)
            verify(result)
            record = PassRecord(pass_.name, str(pass_), dict(pass_.stats), result, time.perf_counter() - start)
            if probes:
                record.max_change = self._check(pass_, result, probes, expected)
            self.records.append(record)
            if self.print_after_all or pass_.name in self.print_after:
                print(f"// ----- IR after {pass_} -----\n{result}", file=self.stream or sys.stdout)
            graph = result
        return graph

    def _probe_inputs(self, graph: Graph) -> list:
        generator = torch.Generator().manual_seed(self.seed)
        uses = graph_index_uses(graph)
        probes = []
        for batch, n, m in VALIDATION_SHAPES:
            batch, n, m = clip_lengths(uses, self.captured, batch, n, m)
            probes.append(random_qkv(graph, batch, n, m, torch.float64, generator))
        return probes

    def _check(self, pass_: Pass, graph: Graph, probes, expected) -> float:
        worst = 0.0
        for qkv, before in zip(probes, expected):
            after = run_reference(graph, *qkv, self.captured)
            for name, reference in before.items():
                finite = torch.isfinite(reference)
                if not torch.equal(finite, torch.isfinite(after[name])) or not torch.equal(
                    reference[~finite], after[name][~finite]
                ):
                    raise ValidationError(f"pass {pass_.name} changed which {name} values are infinite or NaN")
                relative = ((after[name] - reference).abs() / (1 + reference.abs()))[finite]
                change = float(relative.max()) if relative.numel() else 0.0
                if change > VALIDATION_TOLERANCE:
                    raise ValidationError(
                        f"pass {pass_.name} changed the meaning of the graph: {name} moved by {change:.3g} "
                        f"(relative, float64; allowed {VALIDATION_TOLERANCE:g})"
                    )
                worst = max(worst, change)
        return worst
