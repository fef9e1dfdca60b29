"""Collects generated source lines and remembers which IR line each block came from."""

from __future__ import annotations

from dataclasses import dataclass, field


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
