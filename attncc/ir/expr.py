"""Scalar expressions of the IR: sympy over the index symbols, the score and captured tensors.

A score modification is an expression over ``score, b, h, q_idx, kv_idx`` (and the
sequence lengths ``N``, ``M``); a mask is a sympy ``Boolean`` over the same symbols
without ``score``. A captured tensor ``doc`` is a ``sympy.IndexedBase``; ``doc[q_idx]``
is an ``Indexed``. Integer floor division is ``FloorDiv`` (sympy has none that prints as
``//``); ``Mod`` keeps Python's sign convention, as ``torch.remainder`` does.
"""

from __future__ import annotations

import sympy
from sympy.logic.boolalg import Boolean

from attncc.ir.types import FLOAT_DTYPES, M, N

b, h, q_idx, kv_idx = sympy.symbols("b h q_idx kv_idx", integer=True, nonnegative=True)
score = sympy.Symbol("score", real=True)
# The element a feature map of linear attention reads (one entry of q or k).
feature = sympy.Symbol("x", real=True)

INDEX_SYMBOLS = (b, h, q_idx, kv_idx)
LENGTH_SYMBOLS = (N, M)
SYMBOLS_BY_NAME = {str(s): s for s in (score, feature, *INDEX_SYMBOLS, *LENGTH_SYMBOLS)}


class FloorDiv(sympy.Function):
    """``a // b`` with Python's (and torch's) flooring semantics."""

    nargs = 2

    @classmethod
    def eval(cls, a, b):
        if a.is_Number and b.is_Number and b != 0:
            return sympy.floor(a / b)
        if b == 1 and a.is_integer:
            return a
        return None

    def _eval_is_integer(self):
        return True if all(arg.is_integer for arg in self.args) else None


# Whole floats up to 2^53 are written as integers: every one is exact in a double, so the
# value is the same, and torch's arithmetic on them only differs beyond int64 (2^63).
EXACT_WHOLE_FLOATS = 2**53


class Trunc(sympy.Function):
    """``torch.trunc``: rounds toward zero; a float of a float, the integer itself of an integer."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_integer:
            return x
        if x.is_Number:
            return sympy.Float(int(x)) if x.is_Float else sympy.Integer(int(x))
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(0)

    def _eval_is_integer(self):
        return self.args[0].is_integer


class RoundHalfEven(sympy.Function):
    """``torch.round``: to the nearest integer, halves to the even one."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_integer:
            return x
        if x.is_Rational:
            return sympy.Integer(round(x))
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(0)

    def _eval_is_integer(self):
        return self.args[0].is_integer


class FMod(sympy.Function):
    """``torch.fmod(a, b)``: ``a - b * trunc(a / b)``, the sign of ``a`` (``Mod`` is Python's ``%``)."""

    nargs = 2

    @classmethod
    def eval(cls, a, b):
        if a.is_Number and b.is_Number and a.is_finite and b.is_finite and b != 0:
            return a - b * Trunc(a / b)
        return None

    def fdiff(self, argindex=1):
        a, b = self.args
        return sympy.Integer(1) if argindex == 1 else -Trunc(a / b)

    def _eval_is_integer(self):
        return True if all(arg.is_integer for arg in self.args) else None


class _Bitwise(sympy.Function):
    """An integer bit operation with Python's (two's complement) semantics; integer arguments only."""

    operator = None

    @classmethod
    def eval(cls, *args):
        if all(arg.is_Integer for arg in args):
            return sympy.Integer(cls.operator(*(int(arg) for arg in args)))
        return None

    def _eval_is_integer(self):
        return True


class BitAnd(_Bitwise):
    nargs = 2
    operator = staticmethod(lambda a, c: a & c)
    symbol = "&"


class BitOr(_Bitwise):
    nargs = 2
    operator = staticmethod(lambda a, c: a | c)
    symbol = "|"


class BitXor(_Bitwise):
    nargs = 2
    operator = staticmethod(lambda a, c: a ^ c)
    symbol = "^"


class LeftShift(_Bitwise):
    nargs = 2
    operator = staticmethod(lambda a, c: a << c)
    symbol = "<<"


class RightShift(_Bitwise):
    nargs = 2
    operator = staticmethod(lambda a, c: a >> c)
    symbol = ">>"


class BitNot(_Bitwise):
    nargs = 1
    operator = staticmethod(lambda a: ~a)
    symbol = "~"


BITWISE = (BitAnd, BitOr, BitXor, LeftShift, RightShift, BitNot)


def number(value: float | int) -> sympy.Expr:
    """A Python number as an exact-looking sympy constant: 50.0 -> 50, 0.125 -> 1/8.

    Short decimals become rationals (what the user wrote); other floats keep all
    17 significant digits, so printing and reparsing gives the same double. A float
    stays a float (a sympy Float) beyond ``EXACT_WHOLE_FLOATS``: ``1e30`` and
    ``torch.finfo(torch.float32).min`` are no integers that overflow int64.
    """
    if isinstance(value, int) or (float(value).is_integer() and abs(value) <= EXACT_WHOLE_FLOATS):
        return sympy.Integer(int(value))
    text = repr(float(value))
    if len(text) <= 8 and "e" not in text:
        return sympy.Rational(text)
    return sympy.Float(value, 17)


def split_linear(expr) -> tuple[float | None, sympy.Expr]:
    """(c, rest) when expr = c * score + rest with a constant c != 0 and rest free of score, else (None, expr).

    rest is expr at score = 0, as written: expanding it would turn ``slope * (kv_idx - q_idx)`` into
    ``slope * kv_idx - slope * q_idx``, two large float terms whose difference loses the float32 precision
    the integer difference keeps (ALiBi at N = 4096: scores off by 1e-4)."""
    coefficient = sympy.expand(expr).coeff(score)
    if coefficient.is_number and coefficient != 0 and not sympy.expand(expr - coefficient * score).has(score):
        return float(coefficient), expr.xreplace({score: sympy.Integer(0)})
    return None, expr


def captured_symbol(name: str, dtype: str) -> sympy.IndexedBase:
    """The symbol of a captured tensor; its elements are real for float dtypes, else integer.

    Boolean tensors load as integers 0/1; the frontends compare them with 0.
    """
    if dtype in FLOAT_DTYPES:
        return sympy.IndexedBase(name, real=True)
    return sympy.IndexedBase(name, integer=True)


def is_boolean(expr) -> bool:
    """True for predicates (relations, And/Or/Not, true/false); sympy Symbols count as numbers here."""
    return isinstance(expr, Boolean) and not isinstance(expr, sympy.Expr)


def kind(expr) -> str:
    """'bool', 'int' or 'float': the torch dtype class an expression evaluates to."""
    if is_boolean(expr):
        return "bool"
    if expr.is_integer:
        return "int"
    return "float"


def captured_names(expr) -> set[str]:
    """Names of the captured tensors an expression reads."""
    return {str(base.label) for base in expr.atoms(sympy.IndexedBase)}


def free_symbol_names(expr) -> set[str]:
    """Names of the free scalar symbols (index symbols, score, lengths), captured tensors excluded."""
    names = set()
    for sym in expr.free_symbols:
        if isinstance(sym, (sympy.Indexed, sympy.IndexedBase)):
            continue
        names.add(str(sym))
    return names - captured_names(expr)


def bare_index_uses(expr) -> set[tuple[str, int, str]]:
    """(tensor, dim, symbol) for each captured-tensor index that is a bare index symbol.

    ``doc[q_idx]`` gives ("doc", 0, "q_idx"): doc must then have at least N entries.
    """
    uses = set()
    for indexed in expr.atoms(sympy.Indexed):
        for dim, index in enumerate(indexed.indices):
            if index in INDEX_SYMBOLS:
                uses.add((str(indexed.base.label), dim, str(index)))
    return uses
