"""What a pass is: a small frozen object with a name, typed options and ``run(graph) -> graph``.

A pass never mutates its input graph. It counts what it changed in ``stats``
(a Counter the PassManager clears before each run), so tests and ``explain()``
can say what happened.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from attncc.ir.graph import Graph


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str]
    stats: Counter = field(default_factory=Counter, compare=False, repr=False, kw_only=True)

    def run(self, graph: Graph) -> Graph:
        raise NotImplementedError(type(self).__name__)

    def count(self, counter: str, amount: int = 1) -> None:
        self.stats[counter] += amount

    def options(self) -> dict:
        """The options that differ from their defaults (required options always)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "stats" and (f.default is MISSING or getattr(self, f.name) != f.default)
        }

    def __str__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}{{{options}}}" if options else self.name
