"""Builds IR expressions with FlexAttention's per-element semantics, checking types.

Both frontends (torch.fx traces of mods and the TOML expression parser) reduce a
program to calls of ``binary``, ``unary``, ``call`` and ``index``; an unsupported use
raises ``ExpressionError`` with a message the frontend completes with where it happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
from sympy.codegen.cfunctions import expm1, log1p

from attncc.ir.expr import (
    BitAnd,
    BitNot,
    BitOr,
    BitXor,
    FloorDiv,
    FMod,
    LeftShift,
    RightShift,
    RoundHalfEven,
    Trunc,
    is_boolean,
    kind,
    number,
)


class ExpressionError(Exception):
    """An expression cannot be built; the frontend wraps it in a ModError or SpecError."""


@dataclass(frozen=True)
class CapturedTensor:
    """A captured tensor, or a captured tensor indexed in fewer dimensions than it has."""

    name: str
    symbol: sympy.IndexedBase
    ndim: int
    dtype: str
    indices: tuple = ()

    def __getitem__(self, key):
        return index(self, key if isinstance(key, tuple) else (key,))


def constant(value):
    """A Python number or bool as an expression."""
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, float):
        if value == float("inf"):
            return sympy.oo
        if value == -float("inf"):
            return -sympy.oo
        if value != value:
            raise ExpressionError("NaN is not a supported constant")
        return number(value)
    raise ExpressionError(f"constant {value!r} of type {type(value).__name__} is not a number or bool")


def as_expr(value):
    if isinstance(value, CapturedTensor):
        raise ExpressionError(
            f"captured tensor {value.name!r} is used with {len(value.indices)} of its {value.ndim} "
            "indices; index it down to one element, e.g. doc[q_idx]"
        )
    if isinstance(value, (sympy.Basic,)):
        return value
    return constant(value)


def as_number(value, what: str):
    """A numeric expression; booleans become 1 / 0, as in torch arithmetic."""
    expr = as_expr(value)
    if is_boolean(expr):
        return sympy.Piecewise((sympy.Integer(1), expr), (sympy.Integer(0), True))
    return expr


def as_bool(value, what: str):
    expr = as_expr(value)
    if not is_boolean(expr):
        raise ExpressionError(
            f"{what} needs a boolean, got the {kind(expr)} expression {expr}; compare it, e.g. x != 0"
        )
    return expr


ARITHMETIC = ("+", "-", "*", "/", "//", "%", "**")
BITWISE = {"&": BitAnd, "|": BitOr, "^": BitXor, "<<": LeftShift, ">>": RightShift}
COMPARISONS = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge, "==": sympy.Eq, "!=": sympy.Ne}
LOGICAL = {"&": sympy.And, "|": sympy.Or, "^": sympy.Xor}


def _integer(value, what: str):
    expr = as_number(value, what)
    if kind(expr) != "int":
        raise ExpressionError(
            f"{what} needs integers or booleans, got the {kind(expr)} expression {expr}; bit operations work on "
            "integer index expressions (cast with .long() or use // first)"
        )
    return expr


def binary(op: str, left, right):
    if op in LOGICAL and is_boolean(as_expr(left)) and is_boolean(as_expr(right)):
        return LOGICAL[op](as_expr(left), as_expr(right))
    if op in BITWISE:
        return BITWISE[op](_integer(left, f"'{op}'"), _integer(right, f"'{op}'"))
    a = as_number(left, f"'{op}'")
    c = as_number(right, f"'{op}'")
    if op in COMPARISONS:
        return COMPARISONS[op](a, c)
    if op in ("/", "//", "%", "fmod") and c.is_zero:
        raise ExpressionError(f"'{op}' by the constant zero")
    if op == "+":
        return a + c
    if op == "-":
        return a - c
    if op == "*":
        return a * c
    if op == "/":
        return a / c
    if op == "//":
        return FloorDiv(a, c)
    if op == "%":
        return sympy.Mod(a, c)
    if op == "**":
        return sympy.Pow(a, c)
    if op == "fmod":
        return FMod(a, c)
    raise ExpressionError(f"operator {op!r} is not supported; use one of {', '.join(supported_operators())}")


def unary(op: str, operand):
    if op == "~":
        expr = as_expr(operand)
        return sympy.Not(expr) if is_boolean(expr) else BitNot(_integer(expr, "'~'"))
    if op == "-":
        return -as_number(operand, "'-'")
    if op == "+":
        return as_number(operand, "'+'")
    if op == "abs":
        return sympy.Abs(as_number(operand, "abs"))
    raise ExpressionError(f"unary operator {op!r} is not supported")


def _where(condition, when_true, when_false):
    cond = as_bool(condition, "where's condition")
    a, c = as_expr(when_true), as_expr(when_false)
    if is_boolean(a) and is_boolean(c):
        return sympy.Or(sympy.And(cond, a), sympy.And(sympy.Not(cond), c))
    a, c = as_number(a, "where"), as_number(c, "where")
    if a == c:
        return a
    return sympy.Piecewise((a, cond), (c, True))


def _clamp(x, min=None, max=None):
    value = as_number(x, "clamp")
    if min is None and max is None:
        raise ExpressionError("clamp needs min or max")
    if min is not None:
        value = sympy.Max(value, as_number(min, "clamp min"))
    if max is not None:
        value = sympy.Min(value, as_number(max, "clamp max"))
    return value


def _unary_function(fn):
    def apply(x):
        return fn(as_number(x, "argument"))

    return apply


def _gelu(x, approximate="none"):
    x = as_number(x, "gelu")
    if approximate == "none":
        return x / 2 * (1 + sympy.erf(x / sympy.sqrt(2)))
    if approximate == "tanh":
        return x / 2 * (1 + sympy.tanh(number(math.sqrt(2 / math.pi)) * (x + number(0.044715) * x**3)))
    raise ExpressionError(f"gelu's approximate={approximate!r} is not one of 'none', 'tanh'")


def _softplus(x, beta=1, threshold=20):
    """torch's softplus: log(1 + exp(beta x)) / beta, and x itself where beta x > threshold.

    The exp's argument is capped at the threshold, where it is not used, so neither it nor its
    derivative overflows there (0 * inf would make the gradient NaN).
    """
    x, beta, threshold = as_number(x, "softplus"), as_number(beta, "softplus beta"), as_number(threshold, "threshold")
    capped = sympy.Min(beta * x, threshold)
    return sympy.Piecewise((x, beta * x > threshold), (log1p(sympy.exp(capped)) / beta, True))


def _round(x, decimals=0):
    x = as_number(x, "round")
    if isinstance(decimals, bool) or not isinstance(decimals, int):
        raise ExpressionError(f"round's decimals={decimals!r} is invalid: a Python integer is allowed")
    if decimals == 0:
        return RoundHalfEven(x)
    return RoundHalfEven(x * sympy.Integer(10) ** decimals) / sympy.Integer(10) ** decimals


FUNCTIONS = {
    "where": _where,
    "clamp": _clamp,
    "minimum": lambda a, c: sympy.Min(as_number(a, "minimum"), as_number(c, "minimum")),
    "maximum": lambda a, c: sympy.Max(as_number(a, "maximum"), as_number(c, "maximum")),
    "abs": _unary_function(sympy.Abs),
    "exp": _unary_function(sympy.exp),
    "exp2": _unary_function(lambda x: sympy.Pow(2, x)),
    "log": _unary_function(sympy.log),
    "log2": _unary_function(lambda x: sympy.log(x, 2)),
    "tanh": _unary_function(sympy.tanh),
    "sigmoid": _unary_function(lambda x: 1 / (1 + sympy.exp(-x))),
    "sqrt": _unary_function(sympy.sqrt),
    "rsqrt": _unary_function(lambda x: 1 / sympy.sqrt(x)),
    "floor": _unary_function(sympy.floor),
    "ceil": _unary_function(sympy.ceiling),
    "relu": _unary_function(lambda x: sympy.Max(x, 0)),
    "gelu": _gelu,
    "silu": _unary_function(lambda x: x / (1 + sympy.exp(-x))),
    "softplus": _softplus,
    "sin": _unary_function(sympy.sin),
    "cos": _unary_function(sympy.cos),
    "tan": _unary_function(sympy.tan),
    "asin": _unary_function(sympy.asin),
    "acos": _unary_function(sympy.acos),
    "atan": _unary_function(sympy.atan),
    "sinh": _unary_function(sympy.sinh),
    "cosh": _unary_function(sympy.cosh),
    "sign": _unary_function(sympy.sign),
    "erf": _unary_function(sympy.erf),
    "expm1": _unary_function(expm1),
    "log1p": _unary_function(log1p),
    "round": _round,
    "trunc": _unary_function(Trunc),
    "fmod": lambda a, c: binary("fmod", a, c),
}


def supported_operators() -> list[str]:
    return [*ARITHMETIC, *COMPARISONS, *LOGICAL, "~", "unary -"]


def call(name: str, *args, **kwargs):
    fn = FUNCTIONS.get(name)
    if fn is None:
        raise ExpressionError(f"function {name!r} is not supported; supported: {', '.join(sorted(FUNCTIONS))}")
    try:
        return fn(*args, **kwargs)
    except TypeError as exc:
        raise ExpressionError(f"bad arguments to {name}: {exc}") from None


def index(tensor: CapturedTensor, key: tuple):
    """``tensor[i, j]``: an element once every dimension is indexed, else a narrower view."""
    if not isinstance(tensor, CapturedTensor):
        raise ExpressionError(f"only captured tensors can be indexed, not {tensor}")
    indices = list(tensor.indices)
    for item in key:
        if isinstance(item, (slice, type(Ellipsis))) or item is None:
            raise ExpressionError(
                f"slicing captured tensor {tensor.name!r} is not supported; index one element per dimension"
            )
        expr = as_expr(item)
        if kind(expr) != "int":
            raise ExpressionError(
                f"index {expr} into captured tensor {tensor.name!r} is a {kind(expr)} expression; "
                "indices must be integers (use // or floor)"
            )
        indices.append(expr)
    if len(indices) > tensor.ndim:
        raise ExpressionError(
            f"captured tensor {tensor.name!r} has {tensor.ndim} dimensions, indexed with {len(indices)}"
        )
    if len(indices) < tensor.ndim:
        return CapturedTensor(tensor.name, tensor.symbol, tensor.ndim, tensor.dtype, tuple(indices))
    element = tensor.symbol[tuple(indices)] if tensor.ndim > 1 else tensor.symbol[indices[0]]
    if tensor.dtype == "bool":
        return sympy.Ne(element, 0)
    return element
