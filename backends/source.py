"""Collects generated source lines and remembers which IR line each block came from."""

from __future__ import annotations

from dataclasses import dataclass, field

from sympy.printing.pycode import PythonCodePrinter


@dataclass
class SourceWriter:
    lines: list[str] = field(default_factory=list)
    line_map: dict[int, str] = field(default_factory=dict)
    indent: int = 0

    def line(self, text: str = "", ir: str | None = None) -> None:
        """Append one line; ``ir`` is the printed IR node it implements (kept in line_map)."""
        self.lines.append(("    " * self.indent + text).rstrip())
        if ir is not None:
            self.line_map[len(self.lines)] = ir

    def comment_block(self, text: str, prefix: str = "# ") -> None:
        for row in text.splitlines():
            self.line(prefix + row)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass(frozen=True)
class GeneratedSource:
    """What a backend produces: the source, the entry point's name, and line -> IR line."""

    source: str
    entry: str
    line_map: dict[int, str]
    backend: str


def unique_names(base_names) -> list[str]:
    """Make names unique in order: scores, scores_1, scores_2, ..."""
    seen: dict[str, int] = {}
    result = []
    for base in base_names:
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.append(base if count == 0 else f"{base}_{count}")
    return result


class ExpressionPrinter(PythonCodePrinter):
    """What the backends' expression printers share: comparisons, boolean constants, and the
    dispatch of IR functions to three hooks each backend writes in its own language:
    ``_rounding(expr, fn)`` for floor / ceil, ``_min_max(expr, fn)`` for minimum / maximum,
    ``_logical(expr, operator)`` for ``&``, ``|``, ``^``."""

    def __init__(self):
        super().__init__({"fully_qualified_modules": False, "standard": "python3"})

    def _print_floor(self, expr):
        return self._rounding(expr, "floor")

    def _print_ceiling(self, expr):
        return self._rounding(expr, "ceil")

    def _print_Min(self, expr):
        return self._min_max(expr, "minimum")

    def _print_Max(self, expr):
        return self._min_max(expr, "maximum")

    def _print_And(self, expr):
        return self._logical(expr, "&")

    def _print_Or(self, expr):
        return self._logical(expr, "|")

    def _print_Xor(self, expr):
        return self._logical(expr, "^")

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"
