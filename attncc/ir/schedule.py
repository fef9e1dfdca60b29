"""The tile schedule of a fused region: which keys each query tile visits, and which need no mask.

For a query tile whose rows are ``q_first .. q_last``, the keys outside
``[kv_lo, kv_hi)`` are invisible to every row, and, when ``residual`` is true, the
keys in ``[full_lo, full_hi)`` are visible to every row. The bounds are sympy
expressions over ``q_first``, ``q_last``, ``N``, ``M`` and, for data-dependent
masks, ``b``, ``h`` and captured tensors indexed by them. ``residual`` is the part
of the mask the bounds do not express (true if none): with a residual, a tile
table classifies tiles at call time from the captured tensors (``table``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

q_first, q_last = sympy.symbols("q_first q_last", integer=True, nonnegative=True)


@dataclass(frozen=True)
class TileSchedule:
    kv_lo: sympy.Expr
    kv_hi: sympy.Expr
    full_lo: sympy.Expr
    full_hi: sympy.Expr
    residual: sympy.Basic
    table: bool

    def __str__(self) -> str:
        text = f"visit [{self.kv_lo}, {self.kv_hi}), full [{self.full_lo}, {self.full_hi})"
        if self.residual is not sympy.true:
            text += f", residual {self.residual}"
        return "{" + text + (", table" if self.table else "") + "}"

    def expressions(self) -> tuple:
        return (self.kv_lo, self.kv_hi, self.full_lo, self.full_hi, self.residual)


@dataclass(frozen=True)
class DecodeSchedule:
    """How a region decodes: few query rows against many keys (flash-decoding).

    When the query rows of one KV head (``groups x N``, the query heads of a group
    packed as rows of one tile) are at most ``max_rows``, one program handles one
    KV head of one sequence and the keys it visits are split across ``splits``
    programs, each at least ``min_keys`` keys long; the partial results merge
    exactly by their (o, lse). The backends choose the number of splits at call
    time from the number of keys, batch x KV heads and the device's parallel
    workers: ``waves`` programs per worker, a power of two (so that splits of a
    power-of-two cache are equal).
    """

    max_rows: int
    min_keys: int
    waves: int = 2  # programs per worker, so uneven splits still keep every worker busy

    def __str__(self) -> str:
        return f"{{rows <= {self.max_rows}, splits of >= {self.min_keys} keys, {self.waves} per worker}}"

    def applies(self, rows: int) -> bool:
        return rows <= self.max_rows
