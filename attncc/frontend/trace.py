"""FlexAttention-style ``score_mod`` / ``mask_mod`` callables to IR expressions, with torch.fx.

A mod is traced once with ``torch.fx`` (its arguments are proxies, never real
per-element values) and the graph is interpreted node by node through
``attncc.frontend.builder``, which owns every typing rule. The result is a
``TracedMod``: a sympy expression over ``score, b, h, q_idx, kv_idx`` plus the
tensors it reads.

Captured tensors (closures, globals, default arguments, attributes of captured
objects, ``self`` of bound methods, ``functools.partial`` arguments) become
``sympy.IndexedBase`` symbols named after their Python variable, and are listed
in ``TracedMod.captured`` with their value so the compiled program can take them
as runtime inputs: new values of the same tensor do not change the expression.

Rules a user may trip over, each reported as a ``ModError``:

- Python control flow on traced values (``if``, ``and``/``or``/``not``,
  ``bool()``, ``int()``, ``len()``, iteration, builtin ``max``/``min``) cannot be
  traced; use ``torch.where``, ``& | ~``, ``torch.maximum``/``torch.minimum``.
- Only per-element torch functions are supported (see ``supported_functions``);
  reductions, matmuls, random numbers, in-place ops and tensor factories are not.
- A 0-d captured tensor is read once, at trace time, and baked in as a constant
  (``.item()``), like a captured Python number; a mod that reads one is traced
  again on every call (the trace memo, ``trace_fingerprint``, cannot see its value).
- Indexing a captured tensor with constants only (``lengths[0]``) happens eagerly
  during tracing; leading-dimension selects of a captured tensor are recognised
  and become ``lengths[0]`` in the expression. Any other tensor that is not
  reachable from the mod (made with ``torch.tensor``/``torch.arange``/..., sliced
  like ``doc[:3]``, or computed like ``doc.float()``) is rejected: create it outside
  the mod and capture it.
- Casts to a float dtype are identities on numbers (``.float()`` of a boolean is
  1 / 0); casts to an integer dtype are allowed only on integer expressions,
  because torch truncates floats toward zero: use ``torch.floor`` or ``//``.
"""

from __future__ import annotations

import functools
import inspect
import keyword
import linecache
import operator
import os
import re
import sys
import types
from dataclasses import replace

import numpy as np
import sympy
import torch
import torch.fx

from attncc.errors import ModError
from attncc.frontend import builder, unroll
from attncc.frontend.builder import CapturedTensor, ExpressionError
from attncc.frontend.mod import TORCH_DTYPE_NAMES, Captured, TracedMod, ir_dtype
from attncc.ir.expr import b, captured_symbol, feature, h, is_boolean, kind, kv_idx, q_idx, score

__all__ = [
    "trace_score_mod",
    "trace_mask_mod",
    "trace_feature_map",
    "expression_key",
    "supported_functions",
    "RESERVED_NAMES",
]

SCORE_MOD_PARAMS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_MOD_PARAMS = ("b", "h", "q_idx", "kv_idx")
FEATURE_MAP_PARAMS = ("x",)
SYMBOLS = {"score": score, "b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx, "x": feature}

# Names a captured tensor may not take: the program's inputs/outputs, the index symbols, the dimensions,
# and the other parameters of a compiled program's call, which passes captured tensors by keyword.
RESERVED_NAMES = frozenset(
    {"q", "k", "v", "o", "lse", "score", "b", "h", "q_idx", "kv_idx", "N", "M", "B", "H", "Hkv", "D", "Dv",
     "self", "return_lse", "q_positions", "kv_positions"}
)  # fmt: skip

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
# attncc's own files (flex.py, api.py, ...) are never the user's: a mod that is no Python
# function (a builtin, a C function) has no frame of its own, and its error names the user's call.
_ATTNCC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_WRAPPER_FILE = "<attncc trace wrapper>"


# --------------------------------------------------------------------------- public API


def trace_score_mod(fn) -> TracedMod:
    """Trace ``score_mod(score, b, h, q_idx, kv_idx)`` to a number expression."""
    if isinstance(fn, TracedMod):
        return fn
    traced = _memoized_trace(fn, "score_mod", SCORE_MOD_PARAMS)
    if is_boolean(traced.expr):
        raise ModError(
            f"score_mod must return a number (the modified score), but {_qualname(fn)} returned the boolean "
            f"expression {traced.expr}; to hide elements use a mask_mod, or torch.where(cond, score, -float('inf'))"
        )
    return traced


def trace_mask_mod(fn) -> TracedMod:
    """Trace ``mask_mod(b, h, q_idx, kv_idx)`` to a boolean expression (True: the element is kept)."""
    if isinstance(fn, TracedMod):
        return fn
    traced = _memoized_trace(fn, "mask_mod", MASK_MOD_PARAMS)
    if not is_boolean(traced.expr):
        raise ModError(
            f"mask_mod must return a boolean (True keeps the element), but {_qualname(fn)} returned the "
            f"{kind(traced.expr)} expression {traced.expr}; compare it, e.g. q_idx >= kv_idx"
        )
    return traced


def trace_feature_map(fn) -> TracedMod:
    """Trace a linear-attention feature map ``phi(x)``, element-wise, to a number expression of ``x``."""
    if isinstance(fn, TracedMod):
        return fn
    traced = _memoized_trace(fn, "feature_map", FEATURE_MAP_PARAMS)
    if is_boolean(traced.expr):
        raise ModError(
            f"feature_map must return a number, but {_qualname(fn)} returned the boolean expression {traced.expr}"
        )
    if traced.captured:
        names = ", ".join(c.name for c in traced.captured)
        raise ModError(
            f"feature_map {_qualname(fn)} reads the captured tensor(s) {names}: a feature map is element-wise, "
            "a function of its one argument and constants only"
        )
    return traced


def expression_key(traced: TracedMod) -> str:
    """A deterministic string identifying the traced expression and the captured tensors' names and types.

    Equal for equal expressions whatever function produced them (two lambdas with the
    same body); captured tensors' values are not part of the key (they are inputs).
    """
    known = _EXPRESSION_KEYS.get(id(traced))
    if known is not None and known[0] is traced:
        return known[1]
    captured = ",".join(f"{c.name}:{c.dtype}:{c.ndim}" for c in traced.captured)
    key = f"{kind(traced.expr)}|{sympy.srepr(traced.expr)}|captured=[{captured}]"
    if len(_EXPRESSION_KEYS) >= _MAX_TRACES:
        _EXPRESSION_KEYS.pop(next(iter(_EXPRESSION_KEYS)))
    _EXPRESSION_KEYS[id(traced)] = (traced, key)  # holds traced, so its id is not reused while listed
    return key


# --------------------------------------------------------------------------- trace memo

_TRACES: dict[tuple, TracedMod] = {}
_EXPRESSION_KEYS: dict[int, tuple[TracedMod, str]] = {}
_MAX_TRACES = 256
_PLAIN = (type(None), bool, int, float, complex, str)


def _memoized_trace(fn, what: str, params: tuple) -> TracedMod:
    """The trace of ``fn``, reused while everything it can read is unchanged (see ``trace_fingerprint``)."""
    key = trace_fingerprint(fn)
    if key is None:
        return _Trace(fn, what, params).run()
    key = (what, key)
    traced = _TRACES.get(key)
    if traced is None:
        traced = _Trace(fn, what, params).run()
        if len(_TRACES) >= _MAX_TRACES:
            _TRACES.pop(next(iter(_TRACES)))
        _TRACES[key] = traced
    return traced


def trace_fingerprint(fn, depth: int = 0) -> tuple | None:
    """A key for everything the trace of a plain Python function depends on, or None when that is unsure.

    The key holds the code object, the defaults, and the values of its closure cells and
    of the globals its code names: Python numbers and strings by value, tensors by
    identity, dtype and shape (their values are read at call time, so in-place updates
    keep the trace valid), modules and builtins by identity, other plain functions by
    their own fingerprint. Anything else (lists, dicts, objects, classes, 0-d tensors,
    which are read at trace time, bound methods, partials) makes the function untraceable
    from memory: it is traced again on every call.
    """
    if not isinstance(fn, types.FunctionType) or depth > 4:
        return None
    keyword_defaults = tuple(sorted((fn.__kwdefaults__ or {}).items()))
    parts = [fn.__code__, _value_key(fn.__defaults__, depth), _value_key(keyword_defaults, depth)]
    for cell in fn.__closure__ or ():
        try:
            parts.append(_value_key(cell.cell_contents, depth))
        except ValueError:  # an empty cell
            return None
    for name in sorted(_global_names(fn.__code__)):
        if name in fn.__globals__:
            parts.append((name, _value_key(fn.__globals__[name], depth)))
    return None if any(part is None for part in parts) else tuple(parts)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # lambdas and comprehensions inside the mod
            names |= _global_names(const)
    return names


def _value_key(value, depth: int):
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return None  # read at trace time: its value is in the expression
        return ("tensor", id(value), value.dtype, tuple(value.shape))
    if isinstance(value, (torch.dtype, torch.device)):
        return (type(value), str(value))
    if isinstance(value, types.FunctionType) and not (value.__module__ or "").startswith("torch"):
        return trace_fingerprint(value, depth + 1)
    if isinstance(value, (types.ModuleType, types.BuiltinFunctionType, types.FunctionType)):
        return ("object", id(value))  # modules, builtins and torch's own functions
    if isinstance(value, tuple):
        keys = tuple(_value_key(item, depth) for item in value)
        return None if any(k is None for k in keys) else ("tuple", keys)
    return None


# --------------------------------------------------------------------------- supported functions


def _number(x, what):
    return builder.as_number(x, what)


def _binary(op):
    def apply(a, c):
        return builder.binary(op, a, c)

    return apply


def _add(a, c, *, alpha=1):
    return builder.binary("+", a, c if alpha == 1 else builder.binary("*", alpha, c))


def _sub(a, c, *, alpha=1):
    return builder.binary("-", a, c if alpha == 1 else builder.binary("*", alpha, c))


def _div(a, c, *, rounding_mode=None):
    if rounding_mode is None:
        return builder.binary("/", a, c)
    if rounding_mode == "floor":
        return builder.binary("//", a, c)
    if rounding_mode == "trunc":
        raise ExpressionError(
            "div with rounding_mode='trunc' is not supported (it rounds toward zero); "
            "use // or torch.div(a, b, rounding_mode='floor'), which round toward -inf"
        )
    raise ExpressionError(f"div's rounding_mode {rounding_mode!r} is not one of None, 'floor'")


def _unary(op):
    def apply(x):
        return builder.unary(op, x)

    return apply


def _call(name):
    def apply(*args, **kwargs):
        return builder.call(name, *args, **kwargs)

    return apply


def _activation(name):
    """torch.nn.functional's activations; ``inplace`` changes nothing for the scalar a mod computes."""

    def apply(*args, inplace=False, **kwargs):
        return builder.call(name, *args, **kwargs)

    return apply


def _clamp(x, min=None, max=None):
    return builder.call("clamp", x, min, max)


def _clamp_min(x, min):
    return builder.call("clamp", x, min=min)


def _clamp_max(x, max):
    return builder.call("clamp", x, max=max)


def _minmax(name):
    # torch.max(a, b) with two tensors is elementwise; torch.max(a) and torch.max(a, dim) are reductions.
    elementwise = "maximum" if name == "max" else "minimum"

    def apply(*args, **kwargs):
        if len(args) == 2 and not kwargs and all(_is_value(a) for a in args):
            return builder.call(elementwise, *args)
        raise _Unsupported(
            f"torch.{name}",
            f"torch.{name}(x) and torch.{name}(x, dim) are reductions, not per-element; "
            f"for two values use torch.{elementwise}(a, b)",
        )

    return apply


def _where(*args, **kwargs):
    if len(args) + len(kwargs) == 1:
        raise _Unsupported("torch.where(cond)", "torch.where with one argument lists indices (nonzero)")
    cond = kwargs.pop("condition", args[0] if args else None)
    rest = list(args[1:])
    a = kwargs.pop("input", rest.pop(0) if rest else None)
    c = kwargs.pop("other", rest.pop(0) if rest else None)
    if kwargs or rest or a is None or c is None:
        raise ExpressionError("where takes (condition, input, other)")
    return builder.call("where", cond, a, c)


def _float_cast(x):
    return _number(x, "a cast to float")


def _int_cast(x):
    expr = builder.as_expr(x)
    if is_boolean(expr):
        return _number(expr, "a cast to int")
    if kind(expr) != "int":
        raise ExpressionError(
            f"casting the float expression {expr} to an integer dtype is not supported (float->int casts "
            "truncate toward zero); use torch.floor(x) or x // 1 first, whose result is an integer"
        )
    return expr


def _bool_cast(x):
    expr = builder.as_expr(x)
    if is_boolean(expr):
        return expr
    return builder.binary("!=", expr, 0)


def _cast_to(dtype):
    if dtype == torch.bool:
        return _bool_cast
    if dtype.is_complex:
        raise ExpressionError(f"cast to {dtype} is not supported")
    if dtype.is_floating_point:
        return _float_cast
    return _int_cast


def _cast_like(other):
    if isinstance(other, CapturedTensor):
        return {"bool": _bool_cast}.get(other.dtype, _float_cast if other.dtype in _FLOAT_IR else _int_cast)
    return {"bool": _bool_cast, "int": _int_cast, "float": _float_cast}[kind(builder.as_expr(other))]


_FLOAT_IR = ("f16", "bf16", "f32", "f64")


def _to(x, *args, **kwargs):
    dtype = kwargs.get("dtype")
    other = kwargs.get("other")
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif _is_value(arg):
            other = arg
    if dtype is not None:
        return _cast_to(dtype)(x)
    if other is not None:
        return _cast_like(other)(x)
    return builder.as_expr(x)  # .to(device) and friends


def _type(x, dtype=None):
    if dtype is None:
        raise ExpressionError(".type() without a dtype returns a string")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.rsplit(".", 1)[-1], None)
        if not isinstance(dtype, torch.dtype):
            raise ExpressionError(f".type() needs a torch dtype, got {dtype!r}")
    return _cast_to(dtype)(x)


_TORCH_DTYPES = {"bool": torch.bool, "int": torch.int32, "float": torch.float32}  # of the mod's scalars
_IR_TO_TORCH = {name: getattr(torch, str(t).removeprefix("torch.")) for t, name in TORCH_DTYPE_NAMES.items()}


def _dtype_of(x) -> torch.dtype:
    """The dtype a value has in torch's FlexAttention: int32 indices, a float32 score, bool predicates."""
    if isinstance(x, CapturedTensor):
        return _IR_TO_TORCH[x.dtype]
    return _TORCH_DTYPES[kind(builder.as_expr(x))]


def _filled(value, dtype: torch.dtype, what: str):
    """The scalar ``torch.full((), value, dtype=dtype)``: a constant, truncated toward zero for integer dtypes."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, (bool, int, float)):
        raise ExpressionError(f"{what} needs a Python number as its value, got {value!r}")
    if dtype == torch.bool:
        return builder.constant(bool(value))
    if dtype.is_complex:
        raise ExpressionError(f"{what} with dtype {dtype} is not supported")
    if dtype.is_floating_point:
        return builder.constant(float(value))
    return builder.constant(int(value))


def _scalar_size(size, what: str) -> None:
    if isinstance(size, int) or not isinstance(size, (tuple, list)) or len(size) != 0:
        raise ExpressionError(
            f"{what} with size {size!r} builds a tensor of that shape; a mod computes one element: size () is allowed"
        )


def _like(fill):
    """zeros_like / ones_like / full_like of a scalar: a constant of its dtype (or ``dtype=``)."""

    def apply(x, *args, dtype=None, **kwargs):
        value = args[0] if fill is None and args else kwargs.pop("fill_value", fill)
        if value is None:
            raise ExpressionError("full_like needs a fill value")
        return _filled(value, dtype or _dtype_of(x), "full_like" if fill is None else "zeros_like / ones_like")

    return apply


def _new_filled(fill, what: str):
    """Tensor.new_ones / new_zeros / new_full with size (): a constant of the tensor's dtype (or ``dtype=``)."""

    def apply(x, *args, dtype=None, **kwargs):
        args = list(args)
        size = kwargs.pop("size", args.pop(0) if args else None)
        value = kwargs.pop("fill_value", args.pop(0) if args else None) if fill is None else fill
        if size is None or value is None:
            raise ExpressionError(f"Tensor.{what} needs a size{' and a fill value' if fill is None else ''}")
        _scalar_size(size, f"Tensor.{what}")
        return _filled(value, dtype or _dtype_of(x), f"Tensor.{what}")

    return apply


def _new_tensor(x, data, dtype=None, **kwargs):
    return _filled(data, dtype or _dtype_of(x), "Tensor.new_tensor")


def _elu(x, alpha=1.0, inplace=False):
    return builder.call("where", builder.binary(">", x, 0), x, builder.binary("*", alpha, builder.call("exp", x) - 1))


def _identity(x, *args, **kwargs):
    return builder.as_expr(x)


# Torch functions and Tensor methods that share a name and a calling convention (self first).
_ELEMENTWISE = {
    "add": _add,
    "sub": _sub,
    "subtract": _sub,
    "mul": _binary("*"),
    "multiply": _binary("*"),
    "div": _div,
    "divide": _div,
    "true_divide": _binary("/"),
    "floor_divide": _binary("//"),
    "remainder": _binary("%"),
    "pow": _binary("**"),
    "square": lambda x: builder.binary("**", x, 2),
    "neg": _unary("-"),
    "negative": _unary("-"),
    "positive": _unary("+"),
    "abs": _unary("abs"),
    "absolute": _unary("abs"),
    "eq": _binary("=="),
    "ne": _binary("!="),
    "not_equal": _binary("!="),
    "lt": _binary("<"),
    "less": _binary("<"),
    "le": _binary("<="),
    "less_equal": _binary("<="),
    "gt": _binary(">"),
    "greater": _binary(">"),
    "ge": _binary(">="),
    "greater_equal": _binary(">="),
    "logical_and": _binary("&"),
    "logical_or": _binary("|"),
    "logical_xor": _binary("^"),
    "logical_not": _unary("~"),
    "bitwise_and": _binary("&"),
    "bitwise_or": _binary("|"),
    "bitwise_xor": _binary("^"),
    "bitwise_not": _unary("~"),
    "where": _where,
    "clamp": _clamp,
    "clip": _clamp,
    "clamp_min": _clamp_min,
    "clamp_max": _clamp_max,
    "minimum": _call("minimum"),
    "maximum": _call("maximum"),
    "max": _minmax("max"),
    "min": _minmax("min"),
    "exp": _call("exp"),
    "exp2": _call("exp2"),
    "log": _call("log"),
    "log2": _call("log2"),
    "tanh": _call("tanh"),
    "sigmoid": _call("sigmoid"),
    "sqrt": _call("sqrt"),
    "rsqrt": _call("rsqrt"),
    "floor": _call("floor"),
    "ceil": _call("ceil"),
    "relu": _call("relu"),
    "sin": _call("sin"),
    "cos": _call("cos"),
    "tan": _call("tan"),
    "asin": _call("asin"),
    "arcsin": _call("asin"),
    "acos": _call("acos"),
    "arccos": _call("acos"),
    "atan": _call("atan"),
    "arctan": _call("atan"),
    "sinh": _call("sinh"),
    "cosh": _call("cosh"),
    "sign": _call("sign"),
    "erf": _call("erf"),
    "expm1": _call("expm1"),
    "log1p": _call("log1p"),
    "round": _call("round"),
    "trunc": _call("trunc"),
    "fix": _call("trunc"),
    "fmod": _call("fmod"),
    "bitwise_left_shift": _binary("<<"),
    "bitwise_right_shift": _binary(">>"),
    "zeros_like": _like(0),
    "ones_like": _like(1),
    "full_like": _like(None),
}

# Tensor methods only.
_METHODS = {
    **_ELEMENTWISE,
    "where": lambda x, condition, other: builder.call("where", condition, x, other),
    "float": _float_cast,
    "double": _float_cast,
    "half": _float_cast,
    "bfloat16": _float_cast,
    "long": _int_cast,
    "int": _int_cast,
    "short": _int_cast,
    "char": _int_cast,
    "byte": _int_cast,
    "bool": _bool_cast,
    "to": _to,
    "type": _type,
    "type_as": lambda x, other: _cast_like(other)(x),
    "new_ones": _new_filled(1, "new_ones"),
    "new_zeros": _new_filled(0, "new_zeros"),
    "new_full": _new_filled(None, "new_full"),
    "new_tensor": _new_tensor,
    "contiguous": _identity,
    "clone": _identity,
    "detach": _identity,
    "__getitem__": lambda x, key: _index(x, key),
}

# Functions outside the torch namespace that fx records by object.
_EXTRA_FUNCTIONS = {
    torch.nn.functional.elu: ("torch.nn.functional.elu", _elu),
    torch.special.expit: ("torch.special.expit", _call("sigmoid")),
    torch.special.exp2: ("torch.special.exp2", _call("exp2")),
    torch.nn.functional.sigmoid: ("torch.nn.functional.sigmoid", _call("sigmoid")),
    torch.nn.functional.tanh: ("torch.nn.functional.tanh", _call("tanh")),
    torch.nn.functional.relu: ("torch.nn.functional.relu", _activation("relu")),
    torch.nn.functional.gelu: ("torch.nn.functional.gelu", _call("gelu")),
    torch.nn.functional.silu: ("torch.nn.functional.silu", _activation("silu")),
    torch.nn.functional.softplus: ("torch.nn.functional.softplus", _call("softplus")),
    torch.special.erf: ("torch.special.erf", _call("erf")),
    torch.special.expm1: ("torch.special.expm1", _call("expm1")),
    torch.special.log1p: ("torch.special.log1p", _call("log1p")),
}

_OPERATORS = {
    operator.add: _binary("+"),
    operator.sub: _binary("-"),
    operator.mul: _binary("*"),
    operator.truediv: _binary("/"),
    operator.floordiv: _binary("//"),
    operator.mod: _binary("%"),
    operator.pow: _binary("**"),
    operator.lt: _binary("<"),
    operator.le: _binary("<="),
    operator.gt: _binary(">"),
    operator.ge: _binary(">="),
    operator.eq: _binary("=="),
    operator.ne: _binary("!="),
    operator.and_: _binary("&"),
    operator.or_: _binary("|"),
    operator.xor: _binary("^"),
    operator.invert: _unary("~"),
    operator.lshift: _binary("<<"),
    operator.rshift: _binary(">>"),
    operator.neg: _unary("-"),
    operator.pos: _unary("+"),
    operator.abs: _unary("abs"),
    operator.getitem: lambda x, key: _index(x, key),
}

_TORCH_FUNCTIONS = {}
for _name, _impl in _ELEMENTWISE.items():
    _target = getattr(torch, _name, None)
    if _target is not None:
        _TORCH_FUNCTIONS[_target] = (f"torch.{_name}", _impl)
_TORCH_FUNCTIONS.update(_EXTRA_FUNCTIONS)

_REDUCTIONS = {
    "sum", "mean", "prod", "amax", "amin", "argmax", "argmin", "any", "all", "std", "var", "median", "mode",
    "logsumexp", "softmax", "log_softmax", "cumsum", "cumprod", "norm", "count_nonzero", "nansum", "nanmean",
    "aminmax", "max", "min", "topk", "sort", "argsort", "unique",
}  # fmt: skip
_MATMULS = {"matmul", "mm", "bmm", "einsum", "dot", "mv", "outer", "tensordot", "inner", "addmm", "baddbmm"}
_RANDOM = {
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial", "normal",
    "poisson", "dropout", "randperm", "uniform_", "normal_", "random_", "exponential_", "bernoulli_",
}  # fmt: skip
_FACTORIES = {
    "tensor", "as_tensor", "arange", "full", "zeros", "ones", "empty", "linspace", "logspace", "eye",
    "empty_like", "from_numpy", "scalar_tensor", "range",
}  # fmt: skip


def supported_functions() -> list[str]:
    """The torch functions, Tensor methods and Python operators a mod may use."""
    names = {label for label, _ in _TORCH_FUNCTIONS.values()}
    names.update(f"Tensor.{m}" for m in _METHODS if not m.startswith("__"))
    names.update(
        ["+", "-", "*", "/", "//", "%", "**", "<", "<=", ">", ">=", "==", "!=", "&", "|", "^", "~", "abs()", "x[i]"]
    )
    return sorted(names)


SUPPORTED_SUMMARY = (
    "supported: Python operators + - * / // % ** < <= > >= == != & | ^ ~ << >> abs(), indexing captured "
    "tensors, and the torch functions / Tensor methods where, clamp (clip, clamp_min, clamp_max), minimum, "
    "maximum, abs, sign, exp, exp2, expm1, log, log2, log1p, sqrt, rsqrt, sin, cos, tan, asin, acos, atan, "
    "sinh, cosh, tanh, sigmoid, erf, relu, gelu, silu, softplus, floor, ceil, round, trunc, fmod, remainder, "
    "logical_and/or/xor/not, bitwise_and/or/xor/not/left_shift/right_shift, floor_divide, div (rounding_mode "
    "None or 'floor'), add, sub, mul, pow, eq/ne/lt/le/gt/ge, zeros_like, ones_like, full_like, new_ones, "
    "new_zeros, new_full, new_tensor, torch.nn.functional.elu, and the casts .float(), .long(), .bool(), .to(dtype)"
)


def _why_unsupported(name: str) -> str:
    if name.endswith("_") and not name.startswith("_"):
        return f"in-place operations are not supported; use the out-of-place {name[:-1]}"
    if name in _RANDOM:
        return "random numbers are not supported in a mod"
    if name in _REDUCTIONS:
        return "reductions are not per-element: a mod sees one element at a time"
    if name in _MATMULS:
        return "matrix products are not per-element: a mod sees one element at a time"
    if name in _FACTORIES:
        return "it creates a tensor; create the tensor outside the mod and capture it"
    if name == "item":
        return ".item() converts a traced value to a Python number; use the value directly"
    return "it is not a supported per-element operation"


class _CaptureError(ExpressionError):
    """A tensor the mod reads cannot be captured; the message is complete but for the location."""


class _Unsupported(ExpressionError):
    """A construct the trace cannot convert; ``construct`` names it for the message."""

    def __init__(self, construct: str, why: str):
        super().__init__(f"{construct} is not supported: {why}")
        self.construct = construct
        self.why = why


def _has_slice(args, kwargs) -> bool:
    return any(unroll.is_slice(a) for a in (*args, *kwargs.values()))


def _is_value(x) -> bool:
    return isinstance(x, (sympy.Basic, CapturedTensor))


def _index(x, key):
    if isinstance(x, tuple):  # torch.Size and other Python sequences read at trace time
        return x[key]
    if not isinstance(x, CapturedTensor):
        raise ExpressionError(
            f"only captured tensors can be indexed, not the expression {builder.as_expr(x)}; "
            "the mod's arguments are scalars"
        )
    key = key if isinstance(key, tuple) else (key,)
    for item in key:
        if isinstance(item, int) and not isinstance(item, bool) and item < 0:
            raise ExpressionError(
                f"negative index {item} into captured tensor {x.name!r} is not supported; index from the start"
            )
    return builder.index(x, key)


# --------------------------------------------------------------------------- tracing


class _Tracer(torch.fx.Tracer):
    """Records the user's source line on each node, and accepts captured ``nn.Parameter`` s."""

    def create_proxy(self, *args, **kwargs):
        proxy = super().create_proxy(*args, **kwargs)
        frame = _user_frame(sys._getframe(1))
        if frame is not None:
            proxy.node.meta["attncc_user_frame"] = frame
        return proxy

    def call_module(self, m, forward, args, kwargs):
        # a mod may be an nn.Module, or call one: trace through it (it is no submodule of fx's root)
        return forward(*args, **kwargs)

    def create_arg(self, a):
        if isinstance(a, torch.nn.Parameter):  # fx looks parameters up in the root module, which has none
            names = self.__dict__.setdefault("_attncc_parameters", {})
            if id(a) not in names:
                names[id(a)] = f"_attncc_parameter{len(names)}"
                self.root.register_parameter(names[id(a)], a)
            return self.create_node("get_attr", names[id(a)], (), {})
        return super().create_arg(a)


def _is_user_file(filename: str) -> bool:
    if filename == _WRAPPER_FILE or filename.startswith("<frozen"):
        return False
    path = os.path.abspath(filename)
    return not path.startswith(_TORCH_DIR) and not path.startswith(_ATTNCC_DIR)


def _user_frame(frame):
    """(filename, lineno, source line) of the innermost user frame."""
    while frame is not None:
        if _is_user_file(frame.f_code.co_filename):
            return _frame_info(frame.f_code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return None


def _frame_info(filename, lineno):
    return filename, lineno, linecache.getline(filename, lineno).strip()


def _where_text(info) -> str:
    if info is None:
        return ""
    filename, lineno, line = info
    text = f" at {os.path.basename(filename)}:{lineno}"
    return f"{text}: `{line}`" if line else text


def _qualname(fn) -> str:
    if isinstance(fn, functools.partial):
        return f"functools.partial({_qualname(fn.func)})"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if isinstance(name, str):
        return name
    return type(fn).__qualname__


_CONTROL_FLOW_HINT = (
    "mods are traced once with torch.fx, not run per element, so Python control flow cannot depend on "
    "their arguments: use torch.where(cond, a, b) instead of if/else or `a if cond else b`; use & | ~ "
    "instead of and/or/not (with parentheses: (q_idx >= kv_idx) & (kv_idx < 5)); use torch.maximum / "
    "torch.minimum instead of max() / min()"
)


def _control_flow_construct(line: str) -> str:
    found = []
    code = re.sub(r"(['\"]).*?\1", "", line)
    if re.search(r"\bif\b", code):
        found.append("`if` / conditional expression" if re.search(r"\belse\b", code) else "`if`")
    if re.search(r"\bfor\b", code):
        found.append("`for` loop")
    if re.search(r"\bwhile\b", code):
        found.append("`while`")
    if re.search(r"\bassert\b", code):
        found.append("`assert`")
    for word in ("and", "or", "not"):
        if re.search(rf"\b{word}\b", code):
            found.append(f"`{word}`")
    for builtin in ("max", "min", "bool", "any", "all", "sorted"):
        if re.search(rf"(?<![.\w]){builtin}\(", code):
            found.append(f"builtin {builtin}()")
    return ", ".join(found) or "Python control flow"


class _Trace:
    def __init__(self, fn, what: str, params: tuple[str, ...]):
        self.fn = fn
        self.what = what
        self.params = params
        self.name = _qualname(fn) if callable(fn) else repr(fn)
        self.captured: dict[int, CapturedTensor | sympy.Basic] = {}  # id(tensor) -> its value in the expression
        self.values: dict[int, torch.Tensor] = {}  # id(tensor) -> tensor, kept alive
        self.used: list[str] = []
        self.names = None

    def error(self, message: str) -> ModError:
        return ModError(f"{self.what} {self.name}: {message}")

    # ---- checks and tracing

    def check_callable(self):
        if not callable(self.fn):
            raise ModError(
                f"{self.what} must be a callable {self.what}({', '.join(self.params)}), got {self.name} "
                f"of type {type(self.fn).__name__}"
            )
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):
            return  # builtins without a signature: tracing will tell
        try:
            signature.bind(*range(len(self.params)))
        except TypeError:
            positional = [
                p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            hint = ""
            if self.what == "score_mod" and len(positional) == len(MASK_MOD_PARAMS):
                hint = "; it looks like a mask_mod: pass it as mask_mod="
            elif self.what == "mask_mod" and len(positional) == len(SCORE_MOD_PARAMS):
                hint = "; it looks like a score_mod: pass it as score_mod="
            raise ModError(
                f"{self.what} {self.name}{signature} cannot be called as {self.what}({', '.join(self.params)}): "
                f"a {self.what} takes {len(self.params)} positional arguments, {self.name} takes "
                f"{len(positional)} ({', '.join(positional) or 'none'}){hint}"
            ) from None

    def trace(self) -> tuple[torch.fx.Graph, torch.nn.Module]:
        fn = self.fn
        params = ", ".join(self.params)
        namespace = {"_fn": fn}
        exec(compile(f"def {self.what}({params}):\n    return _fn({params})\n", _WRAPPER_FILE, "exec"), namespace)
        wrapper = namespace[self.what]
        tracer = _Tracer()
        try:
            graph = tracer.trace(wrapper)
        except ModError:
            raise
        except Exception as exc:  # any failure while tracing user code comes from its constructs
            raise self.tracing_error(exc) from exc
        return graph, tracer.root

    def tracing_error(self, exc: BaseException) -> ModError:
        frames = [f for f in _traceback_frames(exc) if _is_user_file(f[0])]
        info = _frame_info(frames[-1][0], frames[-1][1]) if frames else None
        where = _where_text(info)
        message = str(exc)
        if "control flow" in message:
            construct = _control_flow_construct(info[2] if info else "")
            return self.error(f"{construct} on a traced value{where} cannot be traced; {_CONTROL_FLOW_HINT}")
        if "cannot be iterated" in message:
            return self.error(
                f"iterating over or unpacking a traced value{where} cannot be traced: the mod's arguments are "
                "scalars; index captured tensors with them instead"
            )
        if "slice indices" in message:
            return self.error(
                f"slicing a captured tensor{where} is not supported: index one element per dimension with the "
                "mod's arguments, e.g. doc[q_idx]"
            )
        if "'len' is not supported" in message:
            return self.error(f"len() of a traced value{where} is not supported: the mod's arguments are scalars")
        if "Proxy" in message and isinstance(exc, TypeError):
            return self.error(
                f"a traced value is converted to a Python number{where} (int(), float(), math.*, range(), "
                "format(), ...), which cannot be traced; use .long() / .float() and the torch functions "
                "(torch.exp, torch.floor, torch.sqrt, ...) instead"
            )
        return self.error(f"tracing failed{where}: {type(exc).__name__}: {message}")

    # ---- interpretation

    def run(self) -> TracedMod:
        self.check_callable()
        graph, root = self.trace()
        env: dict[torch.fx.Node, object] = {}
        position = 0
        result = None
        for node in graph.nodes:
            try:
                if node.op == "placeholder":
                    env[node] = SYMBOLS[self.params[position]]
                    position += 1
                elif node.op == "get_attr":
                    env[node] = self.captured_value(_get_attr(root, node.target))
                elif node.op == "call_function":
                    env[node] = self.call_function(node, env)
                elif node.op == "call_method":
                    env[node] = self.call_method(node, env)
                elif node.op == "output":
                    value = self.arg(node.args[0], env)
                    if isinstance(value, (tuple, list, dict)):
                        raise ExpressionError(f"a {self.what} returns one value, not a {type(value).__name__}")
                    if unroll.is_slice(value):
                        raise ExpressionError(self.slice_returned(value))
                    result = builder.as_expr(value)
                else:
                    raise ExpressionError(f"fx node kind {node.op!r} is not supported")
            except ModError:
                raise
            except _Unsupported as exc:
                where = _where_text(node.meta.get("attncc_user_frame"))
                raise self.error(
                    f"{exc.construct} is not supported in a {self.what}{where}: {exc.why}; {SUPPORTED_SUMMARY}"
                ) from None
            except _CaptureError as exc:
                # get_attr nodes are made without a proxy: report where their first user is
                frames = [n.meta.get("attncc_user_frame") for n in (node, *node.users)]
                raise self.error(f"{exc}{_where_text(next((f for f in frames if f), None))}") from None
            except ExpressionError as exc:
                where = _where_text(node.meta.get("attncc_user_frame"))
                raise self.error(f"{exc}{where} (fx node: {node.format_node()})") from None
            except (TypeError, ValueError) as exc:
                where = _where_text(node.meta.get("attncc_user_frame"))
                raise self.error(
                    f"bad arguments{where}: {type(exc).__name__}: {exc} (fx node: {node.format_node()})"
                ) from None
        if isinstance(result, sympy.Basic) and not (is_boolean(result) or isinstance(result, sympy.Expr)):
            raise self.error(f"returned {result!r}, which is neither a number nor a boolean")
        in_result = {str(base.label) for base in result.atoms(sympy.IndexedBase)}
        # a view captured as an index into its base (bias[0] in bias[0][b, h]) is not the value of bias
        by_name = {
            t.name: (t, self.values[key])
            for key, t in self.captured.items()
            if isinstance(t, CapturedTensor) and not t.indices
        }
        captured = tuple(
            Captured(
                name,
                by_name[name][0].dtype,
                by_name[name][0].ndim,
                value=by_name[name][1],
                shape=tuple(by_name[name][1].shape),
            )
            for name in self.used
            if name in in_result
        )
        return TracedMod(expr=result, captured=captured, source=self.name)

    def arg(self, a, env):
        if isinstance(a, torch.fx.Node):
            return env[a]
        if isinstance(a, tuple):
            return tuple(self.arg(x, env) for x in a)
        if isinstance(a, list):
            return [self.arg(x, env) for x in a]
        if isinstance(a, slice):
            return slice(self.arg(a.start, env), self.arg(a.stop, env), self.arg(a.step, env))
        if isinstance(a, dict):
            return {k: self.arg(v, env) for k, v in a.items()}
        if isinstance(a, torch.Tensor):  # fx stores tensors as get_attr nodes; be safe anyway
            return self.captured_value(a)
        return a

    def call_function(self, node, env):
        args = self.arg(node.args, env)
        kwargs = self.arg(node.kwargs, env)
        target = node.target
        if target is getattr:
            return self.attribute(*args)
        if target in _OPERATORS and not any(_is_value(a) for a in args):
            return target(*args)  # on what was read at trace time: dtypes, shapes, devices
        impl = _OPERATORS.get(target)
        if impl is None:
            _, impl = _TORCH_FUNCTIONS.get(target, (None, None))
        name = "matmul" if target is operator.matmul else getattr(target, "__name__", "")
        if _has_slice(args, kwargs) and not (target is operator.getitem and isinstance(args[0], CapturedTensor)):
            return self.unrolled(name, _function_label(target), impl, args, kwargs)
        if impl is None:
            raise _Unsupported(_function_label(target), _why_unsupported(name))
        return impl(*args, **kwargs)

    def unrolled(self, name: str, label: str, impl, args: tuple, kwargs: dict):
        """An operation on a captured tensor's remaining dims, unrolled (``attncc.frontend.unroll``)."""
        kwargs = dict(kwargs)
        elementwise_pair = name in ("max", "min") and len(args) == 2 and _is_value(args[1])
        if name in unroll.REDUCTIONS and not elementwise_pair:
            rest = list(args[1:])
            dim = kwargs.pop("dim", rest.pop(0) if rest else None)
            keepdim = kwargs.pop("keepdim", rest.pop(0) if rest else False)
            if rest or kwargs:
                raise ExpressionError(f"{label} takes (x, dim=None, keepdim=False) here, got {args[1:]}, {kwargs}")
            return unroll.reduce(name, args[0], self.slice_shape, dim, keepdim)
        if name in unroll.PRODUCTS:
            return unroll.product(name, *args, self.slice_shape, **kwargs)
        if name in ("getitem", "__getitem__") and isinstance(args[0], np.ndarray):
            key = args[1] if isinstance(args[1], tuple) else (args[1],)
            if not all(isinstance(i, int) for i in key):
                raise ExpressionError(
                    "an unrolled slice is indexed with a traced value: index the captured tensor itself, "
                    "e.g. feats[q_idx, kv_idx % 4], not (feats[q_idx] * 2)[kv_idx % 4]"
                )
            return args[0][key]
        if impl is None:
            raise _Unsupported(label, _why_unsupported(name))
        return unroll.elementwise(impl, args, kwargs, self.slice_shape)

    def slice_returned(self, value) -> str:
        array = unroll.as_array(value, self.slice_shape)
        read = min((e for x in array.flat for e in builder.as_expr(x).atoms(sympy.Indexed)), key=str, default=None)
        origin = ""
        if read is not None:
            used = len(read.indices) - array.ndim
            origin = (
                f"captured tensor {str(read.base.label)!r} is used with {used} of its {len(read.indices)} indices: "
            )
        return (
            f"{origin}a {self.what} returns one element, but this returns a slice of shape {array.shape}; index "
            "every dim (doc[q_idx]) or reduce the slice (sum, dot, amax, ...)"
        )

    def slice_shape(self, view: CapturedTensor) -> tuple[int, ...]:
        return tuple(self.attribute(view, "shape"))

    def attribute(self, x, name: str):
        """``.shape``, ``.ndim``, ``.dtype``, ``.device`` of the mod's scalars and of captured tensors."""
        if not _is_value(x):
            return getattr(x, name)
        if name not in ("shape", "ndim", "dtype", "device"):
            raise _Unsupported(f"Tensor.{name}", "of a tensor's attributes, a mod may read shape, ndim, dtype, device")
        if name == "dtype":
            return _dtype_of(x)
        tensor = self.captured_tensor_value(x) if isinstance(x, CapturedTensor) else None
        if name == "device":  # the mod's scalars have no device at trace time: factories ignore it here
            return torch.device("cpu") if tensor is None else tensor.device
        shape = torch.Size([]) if tensor is None else tensor.shape[len(x.indices) :]
        return shape if name == "shape" else len(shape)

    def captured_tensor_value(self, x: CapturedTensor) -> torch.Tensor:
        return next(self.values[key] for key, t in self.captured.items() if t is x or t == replace(x, indices=()))

    def call_method(self, node, env):
        args = self.arg(node.args, env)
        kwargs = self.arg(node.kwargs, env)
        if node.target in ("size", "dim") and _is_value(args[0]):
            shape = self.attribute(args[0], "shape")
            return len(shape) if node.target == "dim" else shape if len(args) == 1 else shape[args[1]]
        impl = _METHODS.get(node.target)
        if _has_slice(args, kwargs) and not (node.target == "__getitem__" and isinstance(args[0], CapturedTensor)):
            # e.g. (w[h] * feats[q_idx]).sum(), or doc.long()[q_idx] on a small doc
            return self.unrolled(node.target, f"Tensor.{node.target}", impl, args, kwargs)
        if impl is None:
            raise _Unsupported(f"Tensor.{node.target}", _why_unsupported(node.target))
        return impl(*args, **kwargs)

    # ---- captured tensors

    def captured_value(self, tensor):
        if not isinstance(tensor, torch.Tensor):
            return builder.constant(tensor)
        key = id(tensor)
        if key in self.captured:
            value = self.captured[key]
        else:
            value = self.make_captured(tensor)
            self.captured[key] = value
            self.values[key] = tensor
        if isinstance(value, CapturedTensor) and value.name not in self.used:
            self.used.append(value.name)
        return value

    def make_captured(self, tensor: torch.Tensor):
        names = self.tensor_names()
        name = names.get(id(tensor))
        if name is None:
            return self.unreachable(tensor, names)
        if tensor.ndim == 0:
            return builder.constant(tensor.item())
        return self.captured_tensor(name, tensor)

    def captured_tensor(self, name: str, tensor: torch.Tensor) -> CapturedTensor:
        dtype = ir_dtype(tensor.dtype)
        if dtype is None:
            raise _CaptureError(
                f"captured tensor {name!r} has dtype {tensor.dtype}, which is not supported; supported: "
                "bool, uint8, int8, int16, int32, int64, float16, bfloat16, float32, float64"
            )
        return CapturedTensor(name, captured_symbol(name, dtype), tensor.ndim, dtype)

    def unreachable(self, tensor: torch.Tensor, names: dict[int, str]):
        base = tensor._base
        if base is not None and id(base) in names:
            name = names[id(base)]
            indices = _select_indices(base, tensor)
            if indices is not None:
                whole = self.captured_value(base)
                if isinstance(whole, CapturedTensor):
                    return builder.index(whole, tuple(indices))
            raise _CaptureError(
                f"captured tensor {name!r} is sliced or viewed as a tensor of shape "
                f"{tuple(tensor.shape)} while tracing (e.g. {name}[:3], {name}.T); slicing captured tensors is "
                f"not supported: index one element per dimension with the mod's arguments, e.g. {name}[q_idx]"
            )
        raise _CaptureError(
            f"uses a tensor of shape {tuple(tensor.shape)} and dtype {tensor.dtype} "
            "that is not captured from outside the mod: tensors created inside a mod (torch.tensor, torch.arange, "
            "torch.full, ...) or computed from captured tensors while tracing (doc.float(), doc + 1, doc.sum()) "
            "are not supported; create the tensor outside the mod and capture it (closure, global or default "
            "argument)"
        )

    def tensor_names(self) -> dict[int, str]:
        if self.names is None:
            self.names = _name_tensors(self.fn)
        return self.names


def _traceback_frames(exc):
    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return frames


def _get_attr(root, target: str):
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _function_label(target) -> str:
    name = getattr(target, "__name__", None) or repr(target)
    namespaces = (("torch", torch), ("torch.special", torch.special), ("torch.nn.functional", torch.nn.functional))
    for module_name, module in namespaces:
        if getattr(module, name, None) is target:
            return f"{module_name}.{name}"
    if isinstance(target, types.BuiltinFunctionType) and getattr(target, "__self__", None) is not None:
        owner = target.__self__
        owner_name = owner.__name__ if isinstance(owner, types.ModuleType) else type(owner).__name__
        return f"{owner_name}.{name}"
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else name


def _select_indices(base: torch.Tensor, view: torch.Tensor):
    """Indices ``i0, i1, ...`` with ``base[i0, i1, ...]`` being ``view`` (leading-dimension selects), or None."""
    k = base.ndim - view.ndim
    if k <= 0 or tuple(view.shape) != tuple(base.shape[k:]) or view.stride() != base.stride()[k:]:
        return None
    offset = view.storage_offset() - base.storage_offset()
    indices = []
    for dim in range(k):
        stride = base.stride(dim)
        if stride <= 0:
            return None
        i = offset // stride
        if not 0 <= i < base.shape[dim]:
            return None
        indices.append(int(i))
        offset -= i * stride
    if offset != 0:
        return None
    check = base[tuple(indices)]
    if check.data_ptr() != view.data_ptr() or check.shape != view.shape or check.stride() != view.stride():
        return None
    return indices


# --------------------------------------------------------------------------- naming captured tensors


def _sanitize(name: str) -> str:
    name = re.sub(r"\W", "_", str(name))
    if not name or name[0].isdigit():
        name = f"t_{name}"
    if keyword.iskeyword(name):
        name += "_"
    return name


def code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= code_names(const)
    return names


def _name_tensors(fn, max_depth: int = 4, max_objects: int = 5000) -> dict[int, str]:
    """Maps id(tensor) -> a unique, valid, non-reserved name, for every tensor reachable from ``fn``.

    Breadth first, so a tensor gets the name of its shortest path: a closure variable,
    a global the code names, a default argument, an attribute of a captured object
    (``self.doc`` is named ``doc``), a dict key, or ``seq_0`` for list items.
    """
    found: dict[int, str] = {}
    taken: set[str] = set(RESERVED_NAMES)
    seen: set[int] = set()
    attribute_names: set[str] = set()
    frontier: list[tuple[str, object]] = [("fn", fn)]
    count = 0

    def name_for(path_name: str) -> str:
        name = _sanitize(path_name)
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    for _depth in range(max_depth + 1):
        next_frontier = []
        for path_name, obj in frontier:
            if id(obj) in seen or count > max_objects:
                continue
            seen.add(id(obj))
            count += 1
            if isinstance(obj, torch.Tensor):
                if id(obj) not in found:
                    found[id(obj)] = name_for(path_name)
                continue
            next_frontier.extend(_children(path_name, obj, attribute_names))
        frontier = next_frontier
        if not frontier:
            break
    return found


_SKIP_TYPES = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, sympy.Basic)


def _children(path_name: str, obj, attribute_names: set[str]):
    if isinstance(obj, _SKIP_TYPES) or isinstance(obj, type):
        return []
    if isinstance(obj, functools.partial):
        try:
            params = list(inspect.signature(obj.func).parameters)
        except (TypeError, ValueError):
            params = []
        names = [params[i] if i < len(params) else f"arg{i}" for i in range(len(obj.args))]
        return [("fn", obj.func), *zip(names, obj.args), *obj.keywords.items()]
    if isinstance(obj, types.MethodType):
        return [("fn", obj.__func__), ("self", obj.__self__)]
    if isinstance(obj, types.FunctionType):
        return _function_children(obj, attribute_names)
    if isinstance(obj, types.ModuleType):
        children = []
        for name in sorted(attribute_names):
            try:
                children.append((name, getattr(obj, name)))
            except Exception:  # missing or lazily failing module attributes
                continue
        return children
    if isinstance(obj, dict):
        return [(k if isinstance(k, str) else f"{path_name}_{k}", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(f"{path_name}_{i}", v) for i, v in enumerate(obj)]
    children = []
    call = next((vars(cls)["__call__"] for cls in type(obj).__mro__ if "__call__" in vars(cls)), None)
    if isinstance(call, types.FunctionType):
        children.append(("fn", call))
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict):
        for key, value in attributes.items():
            if isinstance(obj, torch.nn.Module) and key in ("_buffers", "_parameters", "_modules"):
                children.extend(value.items())
            else:
                children.append((key.lstrip("_") or key, value))
    return children


def _function_children(fn: types.FunctionType, attribute_names: set[str]):
    code = fn.__code__
    names = code_names(code)
    attribute_names.update(names)
    children = []
    if fn.__closure__:
        for var, cell in zip(code.co_freevars, fn.__closure__):
            try:
                children.append((var, cell.cell_contents))
            except ValueError:  # empty cell
                pass
    globals_ = fn.__globals__
    for name in sorted(names):
        if name in globals_:
            children.append((name, globals_[name]))
    signature_params = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    if fn.__defaults__:
        positional = code.co_varnames[: code.co_argcount]
        children.extend(zip(positional[len(positional) - len(fn.__defaults__) :], fn.__defaults__))
    if fn.__kwdefaults__:
        children.extend((k, v) for k, v in fn.__kwdefaults__.items() if k in signature_params)
    return children
