"""TOML spec files: an ``AttentionSpec`` with its score/mask expressions, read safely.

A spec file is a UTF-8 TOML document of at most 128 KiB (large tensors are declared
by shape and passed at call time)::

    # Llama-3-8B self-attention            (comments are free)
    name = "llama3-8b"                     # optional, ignored: a label for people
    description = "self-attention layer"   # optional, ignored

    [attention]
    num_heads = 32
    num_kv_heads = 8
    head_dim = 128
    causal = true                          # false, true, "bottom_right" or "top_left"
    window = [4096, 0]                     # optional [left, right]; "unbounded" for an open side
    softcap = 50.0
    alibi = false
    scale = 0.125
    mask = "(doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)"
    score = "score + bias[h, clamp(kv_idx - q_idx, -8, 8) + 8]"

    [attention.tensors]                    # captured tensors the expressions index
    doc = { dtype = "int64", values = [0, 0, 1, 1, 1] }
    bias = { dtype = "float32", shape = [8, 17] }   # no values: supplied at call time
    lengths = [3, 5]                                # shorthand: a nested list, dtype inferred

Top level: only ``name`` and ``description`` (strings, ignored) and the ``[attention]``
table are allowed; anything else is an error, so a typo never passes silently.

``[attention]``: the fields of :class:`attncc.spec.AttentionSpec` (validated by it),
except that ``score_mod`` / ``mask_mod`` are spelled ``score`` / ``mask`` and hold
expressions, plus the ``tensors`` sub-table. TOML has no null, so an unbounded side of
``window`` is written as the string ``"unbounded"`` (e.g. ``window = ["unbounded", 0]``);
leave ``window`` out for no window. ``num_heads`` and ``head_dim`` are required.

Expressions are Python expression syntax with FlexAttention's per-element meaning
(DESIGN.md). ``mask`` may use ``b, h, q_idx, kv_idx, N, M``; ``score`` also ``score``;
both may use the constants ``inf, pi, e, True, False`` and the declared tensors. They
are parsed with :func:`ast.parse` and translated by a whitelist walker into sympy
through :mod:`attncc.frontend.builder`; nothing is ever evaluated, executed or compiled
as Python. Allowed: numbers and booleans; ``+ - * / // % **``; ``& | ^ ~`` and
``and or not`` (same meaning: element-wise logic); comparisons, chained ones included;
``a if c else b`` (= ``where(c, a, b)``); calls by name of the builder's functions
(``where, clamp, minimum, maximum, abs, exp, exp2, log, log2, tanh, sigmoid, sqrt,
rsqrt, floor, ceil``; ``clamp(x, min=.., max=..)`` takes keywords) and ``min(a, b)`` /
``max(a, b)``; indexing of captured tensors, ``t[i, j]`` or ``t[i][j]``, with integer
indices. An expression is ASCII, at most 10 000 characters, nested at most 100 levels,
at most 10 000 sympy terms once translated, and translated within 5 seconds; every
constant it computes must be a finite real float64 (or +-inf).

Linear attention (``kind = "linear"``): ``feature_map`` is ``"elu+1"``, ``"relu"``,
``"identity"`` or an expression of one element ``x`` (e.g. ``"where(x > 0, x + 1, exp(x))"``),
parsed like the other expressions; ``normalize`` and ``eps`` as in ``AttentionSpec``.

``[attention.tensors]``: each entry is a nested list of numbers (dtype inferred: all
booleans -> bool, any float -> float32, else int64) or an inline table with ``dtype``
(bool, uint8, int8, int16, int32, int64, float16, bfloat16, float32, float64) and
``values`` and/or ``shape`` (both given: they must agree). Without values the tensor is
a call-time input (``Captured.value`` is None; ``Captured.shape`` keeps the declared shape
so validate can fill it at random) and ``dtype`` is required. A tensor has at most
2**24 elements. Names are ASCII identifiers and
not one of the input, symbol, constant or function names (``RESERVED_TENSOR_NAMES``).
Every declared tensor must be used by ``mask`` or ``score``.

``[attention.rope]``: rotary position embedding of q and k, the fields of
:class:`attncc.RoPE`: ``theta``, ``rotary_dim``, ``interleaved`` and ``scaling``, an
inline table such as ``scaling = { rope_type = "llama3", factor = 8.0, low_freq_factor
= 1.0, high_freq_factor = 4.0, original_max_position_embeddings = 8192 }``.

``[attention.pattern]``: a named sparse pattern of :mod:`attncc.masks` and its
parameters, e.g. ``pattern = { name = "longformer", window = 256, global_tokens = [0],
seq_len = 4096 }``; with a ``mask`` too, both must hold.

Every error is a :class:`attncc.errors.SpecError` whose message starts with the file
name (and the key, e.g. ``attention.mask``) and names what is wrong and what is allowed.
"""

from __future__ import annotations

import ast
import inspect
import keyword
import math
import os
import re
import time

import sympy
import torch

from attncc.errors import SpecError
from attncc.frontend import builder
from attncc.frontend.feature_map import FEATURE_MAPS
from attncc.frontend.mod import Captured, TracedMod, ir_dtype
from attncc.ir.bounded import OutOfTime, deadline
from attncc.ir.expr import SYMBOLS_BY_NAME, captured_names, captured_symbol, is_boolean, kind
from attncc.ir.rope import RoPE
from attncc.spec import AttentionSpec

try:
    import tomllib as _toml
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as _toml
    except ModuleNotFoundError:
        _toml = None

__all__ = [
    "load_spec",
    "parse_spec_text",
    "parse_expression",
    "MASK_NAMES",
    "SCORE_NAMES",
    "TENSOR_DTYPES",
    "RESERVED_TENSOR_NAMES",
]

# The slowest TOML to read (arrays of small integers, nested arrays, many tables) costs about
# 1.2 CPU seconds per MiB: at this size any accepted file parses and validates in about 0.2 s,
# and under 2 s of wall time even on a shared, loaded machine (docs/robustness.md).
MAX_FILE_BYTES = 128 * 1024
MAX_TENSOR_ELEMENTS = 1 << 24
MAX_EXPRESSION_CHARS = 10_000
MAX_EXPRESSION_DEPTH = 100
MAX_EXPRESSION_TERMS = 10_000  # sympy tree nodes, counted as a tree (shared subterms counted each time)
MAX_TRANSLATE_SECONDS = 5.0  # sympy's own simplification (Piecewise folding) can be slow on crafted input
MAX_TENSOR_DIMS = 8
_FLOAT_MAX = 1.7976931348623157e308

TOP_LEVEL_KEYS = ("name", "description", "attention")
_FILE_FIELD_NAMES = {"score_mod": "score", "mask_mod": "mask"}
ATTENTION_KEYS = tuple(_FILE_FIELD_NAMES.get(f, f) for f in AttentionSpec.field_names()) + ("tensors", "pattern")

MASK_NAMES = ("b", "h", "q_idx", "kv_idx", "N", "M")
SCORE_NAMES = ("score", *MASK_NAMES)
FEATURE_MAP_NAMES = ("x",)
CONSTANTS = {"inf": sympy.oo, "pi": sympy.pi, "e": sympy.E}
_MIN_MAX = {"min": "minimum", "max": "maximum"}
FUNCTION_NAMES = tuple(sorted({*builder.FUNCTIONS, *_MIN_MAX}))

TENSOR_DTYPES = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
RESERVED_TENSOR_NAMES = frozenset(
    {"q", "k", "v", "o", "lse", "score", "b", "h", "q_idx", "kv_idx", "N", "M", "B", "H", "Hkv", "D", "Dv"}
    | set(CONSTANTS)
    | set(FUNCTION_NAMES)
    | {"True", "False", "None"}
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_BINARY_OPS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
}
_REJECTED_BINARY_OPS = {ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>"}
_UNARY_OPS = {ast.USub: "-", ast.UAdd: "+", ast.Invert: "~", ast.Not: "~"}
_COMPARE_OPS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
_REJECTED_COMPARE_OPS = {ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
_BOOL_OPS = {ast.And: "&", ast.Or: "|"}

_NODE_NAMES = {
    ast.Attribute: "attribute access",
    ast.Lambda: "lambda",
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.Starred: "starred expression",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string field",
    ast.NamedExpr: "assignment expression (:=)",
    ast.Dict: "dict display",
    ast.List: "list display",
    ast.Set: "set display",
    ast.Tuple: "tuple",
    ast.Slice: "slice",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield from",
}
_ALLOWED_SUMMARY = (
    "allowed are numbers, the names {names}, the operators + - * / // % ** & | ^ ~ and/or/not, "
    "comparisons, 'a if c else b', calls of {functions}, and indexing of captured tensors like t[i, j]"
)


# --------------------------------------------------------------------------- files


def load_spec(path) -> AttentionSpec:
    """Read a TOML spec file (UTF-8, at most 128 KiB) into a validated AttentionSpec."""
    source = os.fsdecode(os.fspath(path))
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{source}: cannot read the spec file: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(f"{source}: {_TOO_LARGE}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{source}: the file is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
            "spec files are UTF-8 TOML"
        ) from None
    return parse_spec_text(text, source=source)


def parse_spec_text(text: str, source: str = "<string>") -> AttentionSpec:
    """Parse the text of a TOML spec file; ``source`` names it in error messages."""
    if not isinstance(text, str):
        raise SpecError(f"{source}: spec text must be a str, got {type(text).__name__}")
    if len(text) > MAX_FILE_BYTES:
        raise SpecError(f"{source}: {_TOO_LARGE}")
    if _toml is None:
        raise SpecError(
            f"{source}: reading TOML spec files needs Python >= 3.11 (tomllib) or the 'tomli' package "
            "(pip install tomli)"
        )
    text = text.removeprefix("\ufeff")
    try:
        document = _toml.loads(text)
    except _toml.TOMLDecodeError as exc:
        raise SpecError(f"{source}: invalid TOML: {exc}") from None
    except ValueError as exc:  # a value TOML allows but Python cannot convert, e.g. an integer of 5000 digits
        reason = str(exc).split(";")[0]
        raise SpecError(f"{source}: invalid TOML: a value cannot be read ({reason})") from None
    except (RecursionError, MemoryError):
        raise SpecError(f"{source}: invalid TOML: values are nested too deeply") from None
    return _spec_from_document(document, source)


_TOO_LARGE = (
    f"the spec is larger than {MAX_FILE_BYTES // 1024} KiB, the most a spec file may hold; declare large tensors "
    "by shape ({ dtype = ..., shape = [...] }) and pass their values at call time"
)


def _spec_from_document(document: dict, source: str) -> AttentionSpec:
    for key, value in document.items():
        if key not in TOP_LEVEL_KEYS:
            raise SpecError(
                f"{source}: unknown top-level key {key!r}; allowed top-level keys: {', '.join(TOP_LEVEL_KEYS)}"
            )
        if key in ("name", "description") and not isinstance(value, str):
            raise SpecError(f"{source}: {key}={value!r} is invalid: a string is allowed")
    table = document.get("attention")
    if table is None:
        raise SpecError(
            f"{source}: the [attention] table is missing; a spec file needs at least\n"
            "[attention]\nnum_heads = 8\nhead_dim = 64"
        )
    if not isinstance(table, dict):
        raise SpecError(f"{source}: 'attention' must be a table ([attention]), got {type(table).__name__}")

    for key in table:
        if key not in ATTENTION_KEYS:
            hint = ""
            if key in _FILE_FIELD_NAMES:
                hint = f" (in spec files {key!r} is spelled {_FILE_FIELD_NAMES[key]!r})"
            raise SpecError(
                f"{source}: unknown key {key!r} in [attention]{hint}; allowed keys: {', '.join(ATTENTION_KEYS)}"
            )
    for required in ("num_heads", "head_dim"):
        if required not in table:
            raise SpecError(f"{source}: [attention] needs the key {required!r}")

    fields = {k: v for k, v in table.items() if k not in ("score", "mask", "tensors", "pattern")}
    if "window" in fields:
        fields["window"] = _window(fields["window"], source)
    if "rope" in fields:
        fields["rope"] = RoPE.from_dict(fields["rope"], where=f"{source}: attention.rope")
    if isinstance(fields.get("feature_map"), str) and fields["feature_map"] not in FEATURE_MAPS:
        where = f"{source}: attention.feature_map"
        expr, _ = _parse(fields["feature_map"], {}, FEATURE_MAP_NAMES, where, "number")
        fields["feature_map"] = TracedMod(expr, (), source=f"{source}:attention.feature_map")
    try:
        spec = AttentionSpec(**fields)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None

    declared = _declare_tensors(table.get("tensors", {}), source)
    tensors = {name: d.tensor for name, d in declared.items()}
    mods = {}
    used_anywhere: set[str] = set()
    for key, names, expect in (("score", SCORE_NAMES, "number"), ("mask", MASK_NAMES, "bool")):
        if key not in table:
            mods[key] = None
            continue
        text = table[key]
        where = f"{source}: attention.{key}"
        if not isinstance(text, str):
            raise SpecError(f"{where}={text!r} is invalid: a string holding an expression is allowed")
        expr, used = _parse(text, tensors, names, where, expect)
        used_anywhere.update(used)
        in_expr = captured_names(expr)
        captured = tuple(declared[name].captured() for name in used if name in in_expr)
        mods[key] = TracedMod(expr, captured, source=f"{source}:attention.{key}")

    unused = [name for name in declared if name not in used_anywhere]
    if unused:
        raise SpecError(
            f"{source}: attention.tensors: {', '.join(repr(n) for n in unused)} "
            f"{'is' if len(unused) == 1 else 'are'} declared but not used by attention.score or attention.mask; "
            "remove the declaration or use it"
        )
    if "pattern" in table:
        mods["mask"] = _with_pattern(table["pattern"], mods["mask"], f"{source}: attention.pattern")
    try:
        return spec.replace(score_mod=mods["score"], mask_mod=mods["mask"])
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None


def _with_pattern(entry, mask: TracedMod | None, where: str) -> TracedMod:
    """A named pattern of :mod:`attncc.masks`, conjoined with ``mask`` if the file has one too."""
    from attncc import masks
    from attncc.frontend.trace import trace_mask_mod

    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise SpecError(f"{where}={entry!r} is invalid: a table with a 'name' (one of {', '.join(masks.__all__)})")
    params = {k: v for k, v in entry.items() if k != "name"}
    name = entry["name"]
    if name not in masks.__all__:
        raise SpecError(f"{where}: name={name!r} is unknown; named patterns: {', '.join(masks.__all__)}")
    factory = getattr(masks, name)
    allowed = list(inspect.signature(factory).parameters)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: {name} has no parameter {unknown[0]!r}; its parameters: {', '.join(allowed)}")
    try:
        pattern = trace_mask_mod(factory(**params))
    except (SpecError, TypeError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from None
    if mask is None:
        return TracedMod(pattern.expr, pattern.captured, source=f"{where}: {name}")
    clash = {c.name for c in pattern.captured} & {c.name for c in mask.captured}
    if clash:
        raise SpecError(f"{where}: the pattern's tensor {sorted(clash)[0]!r} clashes with attention.tensors; rename it")
    return TracedMod(sympy.And(mask.expr, pattern.expr), mask.captured + pattern.captured, source=f"{where}: {name}")


def _window(value, source: str):
    if not isinstance(value, list) or len(value) != 2:
        raise SpecError(
            f"{source}: window={value!r} is invalid: an array [left, right] of non-negative integers "
            'or "unbounded" is allowed'
        )
    sides = []
    for side, item in zip(("left", "right"), value):
        if isinstance(item, str):
            if item != "unbounded":
                raise SpecError(
                    f'{source}: window {side}={item!r} is invalid: a non-negative integer or "unbounded" is allowed'
                )
            sides.append(None)
        else:
            sides.append(item)
    return tuple(sides)


# --------------------------------------------------------------------------- tensors


class _Declared:
    """A declared tensor: IR dtype, shape, value (None: supplied at call time) and its expression handle."""

    __slots__ = ("name", "dtype", "shape", "value", "tensor")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], value):
        self.name, self.dtype, self.shape, self.value = name, dtype, shape, value
        self.tensor = builder.CapturedTensor(name, captured_symbol(name, dtype), len(shape), dtype)

    def captured(self) -> Captured:
        return Captured(self.name, self.dtype, len(self.shape), self.value, shape=self.shape)


def _declare_tensors(table, source: str) -> dict[str, _Declared]:
    if not isinstance(table, dict):
        raise SpecError(
            f"{source}: attention.tensors must be a table ([attention.tensors]), got {type(table).__name__}"
        )
    return {name: _declare_tensor(name, entry, f"{source}: attention.tensors.{name}") for name, entry in table.items()}


def _declare_tensor(name: str, entry, where: str) -> _Declared:
    if not _IDENTIFIER.fullmatch(name) or keyword.iskeyword(name) or name.startswith("__"):
        raise SpecError(
            f"{where}: {name!r} is not a valid tensor name; an ASCII identifier (not a Python keyword, "
            "not starting with '__') like doc or rel_bias is allowed"
        )
    if name in RESERVED_TENSOR_NAMES:
        raise SpecError(
            f"{where}: the name {name!r} is reserved; tensor names must differ from "
            f"{', '.join(sorted(RESERVED_TENSOR_NAMES))}"
        )
    if isinstance(entry, list):
        values, dtype_name, shape = entry, None, None
    elif isinstance(entry, dict):
        unknown = [k for k in entry if k not in ("dtype", "values", "shape")]
        if unknown:
            raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed keys: dtype, values, shape")
        values, dtype_name, shape = entry.get("values"), entry.get("dtype"), entry.get("shape")
        if values is None and shape is None:
            raise SpecError(f"{where}: give 'values' (a nested list) or 'shape' (for a tensor supplied at call time)")
    else:
        raise SpecError(
            f"{where}={entry!r} is invalid: a nested list of values, or an inline table "
            "{ dtype = ..., values = [...] } / { dtype = ..., shape = [...] } is allowed"
        )

    if dtype_name is not None and (not isinstance(dtype_name, str) or dtype_name not in TENSOR_DTYPES):
        raise SpecError(f"{where}: dtype={dtype_name!r} is invalid; allowed dtypes: {', '.join(TENSOR_DTYPES)}")
    if shape is not None:
        shape = _shape(shape, where)

    if values is None:
        if dtype_name is None:
            raise SpecError(
                f"{where}: a tensor without values needs a dtype; allowed dtypes: {', '.join(TENSOR_DTYPES)}"
            )
        torch_dtype = TENSOR_DTYPES[dtype_name]
        return _Declared(name, ir_dtype(torch_dtype), shape, None)

    value_shape, scalars = _rectangular(values, where)
    if shape is not None and shape != value_shape:
        raise SpecError(f"{where}: shape={list(shape)} disagrees with the shape {list(value_shape)} of its values")
    if dtype_name is None:
        dtype_name = _infer_dtype(scalars, where)
    torch_dtype = TENSOR_DTYPES[dtype_name]
    _check_scalars(scalars, dtype_name, torch_dtype, where)
    try:
        tensor = torch.tensor(values, dtype=torch_dtype)
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise SpecError(f"{where}: cannot build a {dtype_name} tensor from the values: {exc}") from None
    return _Declared(name, ir_dtype(torch_dtype), tuple(tensor.shape), tensor)


def _shape(shape, where: str) -> tuple[int, ...]:
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_TENSOR_DIMS
        or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape)
    ):
        raise SpecError(
            f"{where}: shape={shape!r} is invalid: a list of 1 to {MAX_TENSOR_DIMS} positive integers is allowed"
        )
    elements = math.prod(shape)
    if elements > MAX_TENSOR_ELEMENTS:
        raise SpecError(
            f"{where}: shape={shape} has {elements} elements; at most {MAX_TENSOR_ELEMENTS} (2**24) are allowed"
        )
    return tuple(shape)


def _rectangular(values, where: str) -> tuple[tuple[int, ...], list]:
    """The shape of a rectangular nested list and its scalars; iterative, so depth cannot overflow."""
    if not isinstance(values, list):
        raise SpecError(f"{where}: values={values!r} is invalid: a (nested) list of numbers or booleans is allowed")
    shape: list[int] = []
    level = [values]
    while all(isinstance(item, list) for item in level):
        lengths = sorted({len(item) for item in level})
        if len(lengths) > 1:
            raise SpecError(
                f"{where}: values are ragged: lists at depth {len(shape) + 1} have lengths "
                f"{', '.join(map(str, lengths[:5]))}; a rectangular nested list is allowed"
            )
        if lengths[0] == 0:
            raise SpecError(f"{where}: values contain an empty list; every dimension needs at least one element")
        shape.append(lengths[0])
        if len(shape) > MAX_TENSOR_DIMS:
            raise SpecError(f"{where}: values have more than {MAX_TENSOR_DIMS} dimensions")
        level = [item for sub in level for item in sub]
    if any(isinstance(item, list) for item in level):
        raise SpecError(
            f"{where}: values are ragged: depth {len(shape) + 1} mixes lists and scalars; "
            "a rectangular nested list is allowed"
        )
    return tuple(shape), level


def _infer_dtype(scalars: list, where: str) -> str:
    types = {type(x) for x in scalars}
    bad = [x for x in scalars if type(x) not in (bool, int, float)]
    if bad:
        raise SpecError(f"{where}: value {bad[0]!r} is invalid: numbers or booleans are allowed")
    if types == {bool}:
        return "bool"
    if bool in types:
        raise SpecError(f"{where}: values mix booleans and numbers; give a dtype or use one kind")
    return "float32" if float in types else "int64"


def _check_scalars(scalars: list, dtype_name: str, torch_dtype, where: str) -> None:
    if dtype_name == "bool":
        allowed, what = (bool,), "true / false"
    elif torch_dtype.is_floating_point:
        allowed, what = (int, float), "numbers"
    else:
        allowed, what = (int,), "integers"
    for x in scalars:
        if type(x) not in allowed:
            raise SpecError(f"{where}: value {x!r} is invalid for dtype {dtype_name}: {what} are allowed")
    if torch_dtype.is_floating_point:
        largest = torch.finfo(torch_dtype).max
        for x in scalars:
            if x != x:
                raise SpecError(f"{where}: NaN values are not allowed")
            if abs(x) != math.inf and abs(x) > largest:
                raise SpecError(f"{where}: value {x} is out of range for {dtype_name} (largest {largest:g}); inf is allowed")
    elif dtype_name != "bool":
        info = torch.iinfo(torch_dtype)
        for x in scalars:
            if not info.min <= x <= info.max:
                raise SpecError(f"{where}: value {x} is out of range for {dtype_name} ({info.min} to {info.max})")


# --------------------------------------------------------------------------- expressions


def parse_expression(text: str, captured: dict, allowed_names, where: str = "<expression>", expect: str | None = None):
    """Translate one expression into a sympy expression, with a whitelist over Python's ``ast``.

    ``captured`` maps names to :class:`builder.CapturedTensor`; ``allowed_names`` are the
    names of :data:`attncc.ir.expr.SYMBOLS_BY_NAME` the expression may use; ``where``
    prefixes error messages (e.g. ``"spec.toml: attention.mask"``). ``expect`` may be
    ``"bool"`` (a predicate is required) or ``"number"`` (a predicate is refused).
    Raises :class:`SpecError`; never evaluates the text as Python.
    """
    return _parse(text, captured, allowed_names, where, expect)[0]


def _parse(text, captured: dict, allowed_names, where: str, expect: str | None):
    allowed = tuple(allowed_names)
    unknown = [n for n in allowed if n not in SYMBOLS_BY_NAME]
    if unknown:
        raise ValueError(f"allowed_names {unknown} are not IR symbols; known: {', '.join(SYMBOLS_BY_NAME)}")
    if expect not in (None, "bool", "number"):
        raise ValueError(f"expect={expect!r}: None, 'bool' or 'number'")
    for name, tensor in captured.items():
        if not isinstance(tensor, builder.CapturedTensor) or tensor.name != name:
            raise ValueError(f"captured[{name!r}] must be a builder.CapturedTensor named {name!r}")

    if not isinstance(text, str):
        raise SpecError(f"{where}={text!r} is invalid: a string holding an expression is allowed")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise SpecError(
            f"{where}: the expression is {len(text)} characters long; at most {MAX_EXPRESSION_CHARS} are allowed"
        )
    for i, ch in enumerate(text):
        if ord(ch) > 127 or (ord(ch) < 32 and ch not in "\t\n\r"):
            line = text.count("\n", 0, i) + 1
            column = i - (text.rfind("\n", 0, i) + 1) + 1
            raise SpecError(
                f"{where}: character {ch!r} at {_position(text, line, column)} is not allowed; "
                "expressions are printable ASCII"
            )
    stripped = text.strip()
    if not stripped:
        raise SpecError(f"{where}: the expression is empty")
    lead = text[: len(text) - len(text.lstrip())]
    line_shift = lead.count("\n")
    column_shift = len(lead) - (lead.rfind("\n") + 1)

    try:
        tree = ast.parse(stripped, mode="eval")
    except SyntaxError as exc:
        line = (exc.lineno or 1) + line_shift
        column = (exc.offset or 1) + (column_shift if (exc.lineno or 1) == 1 else 0)
        raise SpecError(
            f"{where}: syntax error at {_position(text, line, column)}: {exc.msg} in {_excerpt(stripped)}"
        ) from None
    except ValueError as exc:  # e.g. a literal too long to convert, on some Python versions
        raise SpecError(f"{where}: syntax error: {exc} in {_excerpt(stripped)}") from None
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise SpecError(
            f"{where}: cannot parse the expression: it is nested too deeply or malformed ({type(exc).__name__})"
        ) from None

    parser = _ExpressionParser(text, stripped, captured, allowed, where, line_shift, column_shift)
    too_deep = _deeper_than(tree, MAX_EXPRESSION_DEPTH)
    if too_deep is not None:
        parser.fail(too_deep, f"the expression is nested more than {MAX_EXPRESSION_DEPTH} levels deep")
    try:
        with deadline(MAX_TRANSLATE_SECONDS):  # a backstop for one sympy call that never returns
            result = parser.visit(tree)
            expr = parser.build(tree.body, builder.as_expr, result)
    except (RecursionError, MemoryError):
        raise SpecError(f"{where}: the expression is nested too deeply to translate") from None
    except OutOfTime:
        raise SpecError(
            f"{where}: the expression is too complex: translating it took more than {MAX_TRANSLATE_SECONDS} s"
        ) from None

    if expect == "bool" and not is_boolean(expr):
        raise SpecError(
            f"{where}: {_excerpt(stripped)} is a {kind(expr)} expression, but a mask must be boolean "
            "(a comparison, or predicates combined with & | ~), e.g. q_idx >= kv_idx"
        )
    if expect == "number" and is_boolean(expr):
        raise SpecError(
            f"{where}: {_excerpt(stripped)} is a boolean expression, but a score modification must be a number, "
            "e.g. score + bias[h] (to hide keys, use attention.mask)"
        )
    return expr, parser.used


def _position(text: str, line: int, column: int) -> str:
    return f"line {line}, column {column}" if "\n" in text.strip() else f"column {column}"


def _excerpt(segment: str | None, limit: int = 80) -> str:
    if segment is None:
        return "the expression"
    return repr(segment if len(segment) <= limit else segment[: limit - 3] + "...")


def _deeper_than(tree: ast.AST, limit: int):
    """The first node nested deeper than ``limit``, or None; iterative."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return node
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return None


class _ExpressionParser:
    """Walks a whitelisted subset of Python's ``ast`` and builds sympy through ``builder``."""

    def __init__(self, text, stripped, captured, allowed, where, line_shift, column_shift):
        self.text = text
        self.stripped = stripped
        self.captured = captured
        self.allowed = allowed
        self.where = where
        self.line_shift = line_shift
        self.column_shift = column_shift
        self.used: list[str] = []
        self._terms: dict = {}
        self._start = time.monotonic()
        self.handlers = {
            ast.Expression: self.visit_Expression,
            ast.BinOp: self.visit_BinOp,
            ast.UnaryOp: self.visit_UnaryOp,
            ast.BoolOp: self.visit_BoolOp,
            ast.Compare: self.visit_Compare,
            ast.IfExp: self.visit_IfExp,
            ast.Call: self.visit_Call,
            ast.Name: self.visit_Name,
            ast.Constant: self.visit_Constant,
            ast.Subscript: self.visit_Subscript,
        }

    # -- messages

    def names(self) -> list[str]:
        return [*self.allowed, *self.captured, *CONSTANTS, "True", "False"]

    def position(self, node) -> str:
        line = getattr(node, "lineno", 1) or 1
        column = (getattr(node, "col_offset", 0) or 0) + 1
        if line == 1:
            column += self.column_shift
        return _position(self.text, line + self.line_shift, column)

    def segment(self, node) -> str:
        try:
            seg = ast.get_source_segment(self.stripped, node)
        except (AttributeError, IndexError, TypeError):
            seg = None
        return _excerpt(seg if seg is not None else self.stripped)

    def fail(self, node, message: str):
        raise SpecError(f"{self.where}: {message} (at {self.segment(node)}, {self.position(node)})")

    def reject(self, node, what: str | None = None):
        what = what or _NODE_NAMES.get(type(node), type(node).__name__)
        raise SpecError(
            f"{self.where}: {what} {self.segment(node)} at {self.position(node)} is not allowed; "
            + _ALLOWED_SUMMARY.format(names=", ".join(self.names()), functions=", ".join(FUNCTION_NAMES))
        )

    # -- building

    def build(self, node, fn, *args, **kwargs):
        if time.monotonic() - self._start > MAX_TRANSLATE_SECONDS:
            self.fail(node, f"the expression is too complex: translating it took more than {MAX_TRANSLATE_SECONDS} s")
        try:
            result = fn(*args, **kwargs)
        except builder.ExpressionError as exc:
            self.fail(node, str(exc))
        except (TypeError, ValueError, ArithmeticError) as exc:
            self.fail(node, f"cannot build this expression: {exc}")
        if isinstance(result, sympy.Basic):
            self.check(node, result)
        return result

    def check(self, node, expr: sympy.Basic) -> None:
        if self.terms(expr) > MAX_EXPRESSION_TERMS:
            self.fail(node, f"the expression grows to more than {MAX_EXPRESSION_TERMS} terms")
        if expr.has(sympy.nan, sympy.zoo):
            self.fail(node, f"the expression evaluates to {_short(expr)} (NaN or complex infinity)")
        if expr.has(sympy.I):
            self.fail(node, f"the expression {_short(expr)} is complex; only real expressions are allowed")
        if isinstance(expr, sympy.Expr) and expr.is_number and expr not in (sympy.oo, -sympy.oo):
            value = expr.evalf(15)
            if value.is_real is False or not value.is_Number:
                self.fail(node, f"the constant {_short(expr)} is not a real number")
            if abs(value) > _FLOAT_MAX:
                self.fail(node, f"the constant {_short(expr)} is out of the float64 range")

    def terms(self, expr) -> int:
        """Tree size of ``expr`` (shared subterms counted each time), memoised so each op costs O(args)."""
        memo = self._terms
        stack = [expr]
        while stack:
            node = stack[-1]
            if node in memo:
                stack.pop()
                continue
            pending = [a for a in node.args if a not in memo]
            if pending:
                stack.extend(pending)
                continue
            memo[node] = 1 + sum(memo[a] for a in node.args)
            stack.pop()
        return memo[expr]

    # -- nodes

    def visit(self, node):
        handler = self.handlers.get(type(node))
        if handler is None:
            self.reject(node)
        return handler(node)

    def visit_Expression(self, node: ast.Expression):
        return self.visit(node.body)

    def visit_BinOp(self, node: ast.BinOp):
        op = _BINARY_OPS.get(type(node.op))
        if op is None:
            symbol = _REJECTED_BINARY_OPS.get(type(node.op), type(node.op).__name__)
            self.reject(node, f"operator {symbol!r} in")
        left, right = self.visit(node.left), self.visit(node.right)
        if op == "**":
            self.check_power(node, left, right)
        return self.build(node, builder.binary, op, left, right)

    def check_power(self, node, base, exponent) -> None:
        """Refuse constant powers beyond float64 before sympy computes them exactly."""
        if not all(isinstance(x, sympy.Expr) and x.is_number for x in (base, exponent)):
            return
        try:
            b, x = abs(float(base)), float(exponent)
        except (TypeError, ValueError, OverflowError):
            return
        if math.isinf(b) or math.isinf(x) or b in (0.0, 1.0):
            return
        if abs(x * math.log2(b)) > 1100:
            self.fail(node, "the constant power is out of the float64 range")

    def visit_UnaryOp(self, node: ast.UnaryOp):
        op = _UNARY_OPS.get(type(node.op))
        if op is None:  # pragma: no cover - every Python unary operator is listed
            self.reject(node)
        return self.build(node, builder.unary, op, self.visit(node.operand))

    def visit_BoolOp(self, node: ast.BoolOp):
        op = _BOOL_OPS[type(node.op)]
        result = self.visit(node.values[0])
        for value in node.values[1:]:
            result = self.build(node, builder.binary, op, result, self.visit(value))
        return result

    def visit_Compare(self, node: ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARE_OPS:
                self.reject(node, f"comparison {_REJECTED_COMPARE_OPS.get(type(op), type(op).__name__)!r} in")
        left = self.visit(node.left)
        result = None
        for op, comparator in zip(node.ops, node.comparators):
            right = self.visit(comparator)
            term = self.build(node, builder.binary, _COMPARE_OPS[type(op)], left, right)
            result = term if result is None else self.build(node, builder.binary, "&", result, term)
            left = right
        return result

    def visit_IfExp(self, node: ast.IfExp):
        condition = self.visit(node.test)
        when_true, when_false = self.visit(node.body), self.visit(node.orelse)
        return self.build(node, builder.call, "where", condition, when_true, when_false)

    def visit_Call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name):
            self.reject(node.func, "call of")
        name = node.func.id
        if name.startswith("__"):
            self.reject(node, f"dunder name {name!r} in")
        if name in _MIN_MAX:
            if node.keywords or len(node.args) != 2:
                self.fail(node, f"{name}() takes exactly two positional arguments, e.g. {name}(a, b)")
            function = _MIN_MAX[name]
        elif name in builder.FUNCTIONS:
            function = name
        elif name in self.names():
            self.fail(node, f"{name!r} is not a function; allowed functions: {', '.join(FUNCTION_NAMES)}")
        else:
            self.fail(node, f"unknown function {name!r}; allowed functions: {', '.join(FUNCTION_NAMES)}")
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                self.reject(arg)
        args = [self.visit(arg) for arg in node.args]
        kwargs = {}
        for kw in node.keywords:
            if function != "clamp" or kw.arg not in ("min", "max"):
                shown = "**" if kw.arg is None else kw.arg
                self.fail(kw, f"keyword argument {shown!r} to {name}() is not allowed; only clamp(x, min=.., max=..)")
            kwargs[kw.arg] = self.visit(kw.value)
        return self.build(node, builder.call, function, *args, **kwargs)

    def visit_Name(self, node: ast.Name):
        name = node.id
        if name.startswith("__"):
            self.reject(node, "dunder name")
        if name in self.allowed:
            return SYMBOLS_BY_NAME[name]
        if name in self.captured:
            if name not in self.used:
                self.used.append(name)
            return self.captured[name]
        if name in CONSTANTS:
            return CONSTANTS[name]
        if name in FUNCTION_NAMES:
            self.fail(node, f"function {name!r} must be called, e.g. {name}(x)")
        if name in SYMBOLS_BY_NAME:
            self.fail(node, f"name {name!r} is not available here; allowed names: {', '.join(self.names())}")
        self.fail(
            node,
            f"unknown name {name!r}; allowed names: {', '.join(self.names())} "
            "(declare captured tensors in [attention.tensors])",
        )

    def visit_Constant(self, node: ast.Constant):
        value = node.value
        if type(value) not in (bool, int, float):
            what = {str: "string constant", bytes: "bytes constant", complex: "complex number"}.get(
                type(value), f"constant {value!r}"
            )
            self.reject(node, what)
        return self.build(node, builder.constant, value)

    def visit_Subscript(self, node: ast.Subscript):
        tensor = self.visit(node.value)
        if not isinstance(tensor, builder.CapturedTensor):
            self.fail(node, "only captured tensors (declared in [attention.tensors]) can be indexed")
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if not items:
            self.fail(node, "an empty index is not allowed; index one element per dimension")
        indices = []
        for item in items:
            if isinstance(item, ast.Slice):
                self.reject(item, "slice")
            indices.append(self.visit(item))
        return self.build(node, builder.index, tensor, tuple(indices))


def _short(expr, limit: int = 60) -> str:
    text = str(expr)
    return text if len(text) <= limit else text[: limit - 3] + "..."
