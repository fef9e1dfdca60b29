"""Collects generated source lines and remembers which IR line each block came from."""

from __future__ import annotations

import io
import re
import tokenize
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import sympy
from sympy.codegen.cfunctions import expm1, log1p
from sympy.printing.precedence import precedence
from sympy.printing.pycode import PythonCodePrinter

from attncc.errors import BackendError
from attncc.ir.expr import BITWISE, BitNot, FloorDiv, FMod, RoundHalfEven, Trunc, score
from attncc.ir.types import M


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


class CapturedNames:
    """The identifiers of captured tensors in generated code: the one rule every backend follows.

    A captured tensor's label is the user's choice (a closure variable, a spec file key), so it
    may equal anything generated code defines (``k_f``, ``out``, ``tl``, ``torch``), a keyword or
    a builtin, or reach one through Python's NFKC normalisation of identifiers (``ｋ_f`` is read
    as ``k_f``). Generated code therefore never uses a label as an identifier. The rule:

    - the tensor at position ``i`` of the program's captured inputs is ``cap{i}_{hint}``, where
      ``hint`` is the label in NFKC form with each character outside ``[A-Za-z0-9_]`` replaced
      by ``_`` (for readers: the position alone makes the name unique, and it stays ASCII for C);
    - a name derived from it (a pointer, a stride, a loaded value) is ``cap{i}_{hint}_{suffix}``
      (``derived``), never a prefix before it;
    - a backend names nothing else ``cap<digits>_...``; ``check`` verifies that on its output
      (the collision check), so no label can ever meet a generator's name.
    """

    PATTERN = re.compile(r"cap(\d+)_\w*")

    def __init__(self, labels: Iterable[str]):
        self.labels = tuple(labels)
        unreadable = [label for label in self.labels if not label.isidentifier()]
        if unreadable:  # the headers print labels in docstrings: they must not be able to end one
            raise BackendError(f"captured tensor label {unreadable[0]!r} is not a Python identifier")
        if len(set(self.labels)) != len(self.labels):
            raise BackendError(f"captured tensor labels must be distinct, got {list(self.labels)}")
        self.identifiers = {label: f"cap{i}_{_ascii_hint(label)}" for i, label in enumerate(self.labels)}

    def __getitem__(self, label: str) -> str:
        return self.identifiers[label]

    def derived(self, label: str, suffix: str) -> str:
        """The name of something belonging to a captured tensor: ``cap0_doc`` and ``ptr`` give ``cap0_doc_ptr``."""
        return f"{self.identifiers[label]}_{suffix}"

    def described(self) -> str:
        """``cap0_doc (doc), ...``: each identifier with the label it stands for, for headers."""
        return ", ".join(f"{identifier} ({label})" for label, identifier in self.identifiers.items())

    def check(self, names: Iterable[str]) -> None:
        """BackendError unless every name of the ``cap<digits>_`` form is a captured tensor's or derived from one."""
        owners = list(self.identifiers.values())
        for name in names:
            match = self.PATTERN.fullmatch(name)
            if match is None:
                continue
            position = int(match.group(1))
            owner = owners[position] if position < len(owners) else None
            if owner is None or not (name == owner or name.startswith(owner + "_")):
                raise BackendError(
                    f"generated code names {name!r}, which has the form reserved for captured tensors "
                    f"(cap<position>_...) but belongs to none of {owners}"
                )


def _ascii_hint(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", unicodedata.normalize("NFKC", label))


def python_names(source: str) -> set[str]:
    """The names (identifiers and keywords) Python source uses, outside strings and comments."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {token.string for token in tokens if token.type == tokenize.NAME}


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The IR's element-wise functions that every printer spells through its ``_elementwise(name, args)`` hook,
# by their name in torch, Python's math module and C's libm (``sin``, ``expm1``, ``fmod``, ...).
ELEMENTWISE_FUNCTIONS = {
    sympy.sin: "sin",
    sympy.cos: "cos",
    sympy.tan: "tan",
    sympy.asin: "asin",
    sympy.acos: "acos",
    sympy.atan: "atan",
    sympy.sinh: "sinh",
    sympy.cosh: "cosh",
    sympy.erf: "erf",
    expm1: "expm1",
    log1p: "log1p",
    sympy.sign: "sign",
    Trunc: "trunc",
    RoundHalfEven: "round",
    FMod: "fmod",
}


class ExpressionDispatch:
    """What the backends' expression printers share, whatever sympy printer they extend: comparisons,
    integer bit operations (the same operators in Python, Triton and C), and the dispatch of IR
    functions to hooks each backend writes in its own language: ``_rounding(expr, fn)`` for floor /
    ceil, ``_min_max(expr, fn)`` for minimum / maximum, ``_logical(expr, operator)`` for ``&``, ``|``,
    ``^``, and ``_elementwise(name, args)`` for ``ELEMENTWISE_FUNCTIONS``."""

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

    def _print_elementwise(self, expr):
        return self._elementwise(ELEMENTWISE_FUNCTIONS[type(expr)], expr.args)

    def _print_bitwise(self, expr):
        if isinstance(expr, BitNot):
            return f"(~{self.parenthesize(expr.args[0], precedence(expr))})"
        a, c = (self.parenthesize(arg, precedence(expr)) for arg in expr.args)
        return f"({a} {expr.symbol} {c})"


for _function in ELEMENTWISE_FUNCTIONS:
    setattr(ExpressionDispatch, f"_print_{_function.__name__}", ExpressionDispatch._print_elementwise)
for _function in BITWISE:
    setattr(ExpressionDispatch, f"_print_{_function.__name__}", ExpressionDispatch._print_bitwise)


class ExpressionPrinter(ExpressionDispatch, PythonCodePrinter):
    """The Python-syntax printers' base (torch and triton): ExpressionDispatch, Python's booleans,
    and integers beyond int64."""

    def __init__(self, captured: CapturedNames | None = None):
        super().__init__({"fully_qualified_modules": False, "standard": "python3"})
        self.captured = captured or CapturedNames(())

    def _print_Integer(self, expr):
        # Beyond int64 no tensor holds the integer: written as the nearest float (1e25 compares as it should).
        if not INT64_MIN <= int(expr) <= INT64_MAX:
            return repr(float(expr))
        return super()._print_Integer(expr)

    def _print_NumberSymbol(self, expr):
        """pi, E, EulerGamma...: their float value; the generated source imports no module that names them
        (sympy folds asin(-1) to -pi/2 and exp(1) to E)."""
        return repr(float(expr))

    _print_Pi = _print_Exp1 = _print_EulerGamma = _print_GoldenRatio = _print_Catalan = _print_NumberSymbol
    _print_TribonacciConstant = _print_NumberSymbol

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"


def fold_numbers(expr):
    """Each product's numeric factors as one float (``sqrt(6)*score/240`` -> ``0.0102*score``); integers stay.
    Named constants (``pi``, ``E``) become floats too, even alone: C has no portable name for them."""
    if isinstance(expr, sympy.NumberSymbol):
        return sympy.Float(expr.evalf(17), 17)
    if not isinstance(expr, sympy.Basic) or not expr.args or isinstance(expr, (sympy.Symbol, sympy.Indexed)):
        return expr
    if isinstance(expr, sympy.Expr) and expr.is_number:
        return expr if expr.is_Integer or not expr.is_finite else sympy.Float(expr.evalf(17), 17)
    if isinstance(expr, sympy.Pow) and expr.exp.is_number:  # the printer reads exact exponents: 1/2, -1, 3
        return sympy.Pow(fold_numbers(expr.base), expr.exp)
    args = [fold_numbers(arg) for arg in expr.args]
    if isinstance(expr, sympy.Mul):
        numbers = [a for a in args if a.is_number]
        coefficient = sympy.Mul(*numbers)
        if len(numbers) > 1 or (numbers and not coefficient.is_Integer):
            coefficient = coefficient if coefficient.is_Integer else sympy.Float(coefficient.evalf(17), 17)
            others = [a for a in args if not a.is_number]
            return sympy.Mul(*others) if coefficient == 1 else sympy.Mul(coefficient, *others)
    return expr.func(*args)


def decode_key_bounds(op) -> tuple:
    """A decoding region's key bounds (lo, hi, full_lo, full_hi) as sympy expressions of q_first, q_last, b, h, N, M:
    the keys queries q_first..q_last may see and those all of them see. Without a schedule every key may be seen
    (all of them by every query if there is no mask); with a residual mask the bounds do not say the whole mask,
    so no range is full."""
    if op.schedule is None:
        return (sympy.Integer(0), M, sympy.Integer(0), M if op.mask is sympy.true else sympy.Integer(0))
    bounds = tuple(sympy.sympify(e) for e in op.schedule.expressions()[:4])
    if op.schedule.residual is not sympy.true:
        return (*bounds[:2], sympy.Integer(0), sympy.Integer(0))
    return bounds


def score_derivative(expr, variable=score):
    """d expr / d variable (score, or another symbol). Integer-valued parts (//, %, floor, ceil) are piecewise
    constant: their derivative is 0, so they are held as constants while sympy differentiates (and ``sign``'s
    DiracDelta is 0 but at 0)."""
    flooring = {
        FloorDiv: lambda a, c: sympy.floor(a / c),
        sympy.Mod: lambda a, c: a - c * sympy.floor(a / c),
    }
    for function, rewrite in flooring.items():
        expr = expr.replace(lambda e, f=function: isinstance(e, f) and e.has(variable), lambda e, r=rewrite: r(*e.args))
    held: dict[sympy.Dummy, sympy.Expr] = {}

    def hold(step):
        constant = sympy.Dummy(f"step{len(held)}", integer=True)
        held[constant] = step
        return constant

    steps = expr.replace(lambda e: isinstance(e, (sympy.floor, sympy.ceiling)) and e.has(variable), hold)
    derivative = sympy.diff(steps, variable)
    while derivative.has(*held):
        derivative = derivative.xreplace(held)
    return derivative.replace(sympy.DiracDelta, lambda *args: sympy.Integer(0))


def single_region(graph, backend: str):
    """The graph's one flash_attention region and its lse_of (the outputs o, lse); BackendError otherwise.

    The kernel backends (triton, cuda) compile exactly this graph, which their pipelines' online-softmax
    pass produces.
    """
    from attncc.ir import ops

    regions = graph.nodes_of(ops.FlashAttention)
    others = [
        n.op.name for n in graph.nodes if not isinstance(n.op, (ops.Input, ops.FlashAttention, ops.LseOf, ops.Output))
    ]
    if len(regions) != 1 or others:
        found = ", ".join(sorted(set(others))) or f"{len(regions)} flash_attention regions"
        raise BackendError(
            f"the {backend} backend compiles one fused flash_attention region, but the graph has "
            f"{found}; compile with the {backend} pipeline (its online-softmax pass fuses attention)"
        )
    (region,) = regions
    output = graph.nodes[-1]
    by_name = dict(zip(output.op.names, output.inputs))
    lse = by_name.get("lse")
    if set(by_name) != {"o", "lse"} or by_name["o"] is not region or not isinstance(lse.op, ops.LseOf):
        raise BackendError(f"the {backend} backend needs outputs (o, lse) of one region, got {output.op.names}")
    return region, lse
