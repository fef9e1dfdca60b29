"""The Triton backend: fused forward and backward attention kernels generated from the optimized IR.

The graph must be one ``flash_attention`` region (the ``triton`` pipeline fuses it). The
generated module holds, in the style of Triton's fused-attention tutorial:

- ``_scores``: the region's score expression and mask on one [BLOCK_M, BLOCK_N] tile,
  printed from sympy by ``TritonPrinter`` (loads of captured tensors masked to the
  sequence bounds), and ``_score_grad``, its derivative by ``sympy.diff`` when the
  score is not linear in ``q . k``; ``_captured_grads``, the gradients of the captured float
  tensors the score reads (each element's ``dS * d s / d element``, added with atomics);
- ``_attn_fwd``: one query tile of one head, an online softmax over KV tiles in exp2;
- ``_attn_bwd_preprocess``, ``_attn_bwd_dkdv``, ``_attn_bwd_dq``: FlashAttention-2's
  backward (delta = rowsum(o * do), dK/dV and the captured tensors' gradients per KV
  tile, dQ per query tile);
- ``FlashAttention``, a ``torch.autograd.Function`` that launches them, and
  ``attention(q, k, v, *captured) -> (o, lse)``.

Query head ``h`` reads KV head ``h // GROUPS`` (K and V are never repeated). Each
kernel visits the KV (or query) tiles ``[lo, hi)`` in three loops: partial tiles,
full tiles (no mask to evaluate), partial tiles. The forward and dQ kernels print the
region's sparsity schedule for their query tile and round it to whole KV tiles
(``_kv_tiles``); the dK/dV kernel scans the query tiles' bounds for those whose KV tiles
include its own (the schedule's transpose). CPU tensors run the same kernels in Triton's
interpreter (see ``docs/triton.md``).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
from typing import NamedTuple

import sympy
import torch
from sympy.printing.precedence import precedence

import attncc
from attncc.backends.source import (
    INT64_MAX,
    INT64_MIN,
    CapturedNames,
    ExpressionPrinter,
    GeneratedSource,
    SourceWriter,
    fold_numbers,
    python_names,
    score_derivative,
    single_region,
)
from attncc.backends.triton_decode import DECODE_HOST, DECODE_KERNEL, decode_bounds
from attncc.errors import BackendError
from attncc.ir.expr import b, h, is_boolean, kv_idx, q_idx, score, split_linear
from attncc.ir.graph import Graph
from attncc.ir.printer import format_node, print_graph, value_names
from attncc.ir.schedule import q_first, q_last
from attncc.ir.types import M, N


class TritonMissing(BackendError, ImportError):
    """The triton package is not installed; an ImportError too, for code that probes optional backends."""


def import_triton():
    """Import triton; without a GPU, in interpreter mode, so CPU tensors can run the kernels.

    Triton reads TRITON_INTERPRET when it creates jit functions, its own (``tl.zeros``,
    ``tl.max``) on import included: the variable must be set before triton is first
    imported. A value the user set is kept.
    """
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        return importlib.import_module("triton")
    except ImportError:
        raise TritonMissing(
            "backend='triton' needs the triton package, which is not installed: pip install attncc[triton]"
        ) from None


import_triton()


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the generated kernels here, or None (also when triton is not interpreting).

    Triton 3.6's interpreter turns a loop bound into an int with ``int(array)`` on a
    one-element array, which numpy 2.4 and later refuse (fixed in later Triton releases);
    every kernel here loops over a tile range, so one tiny kernel tells.
    """
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X):
        start = tl.program_id(0)
        for i in range(start, start + 1):
            tl.store(X + i, i + 1)

    if isinstance(probe, triton.runtime.JITFunction):
        return None  # compiled for a GPU, not interpreted
    try:
        out = torch.zeros(1, dtype=torch.int32)
        probe[(1,)](out)
    except Exception as error:  # the interpreter's own failure, whatever its type
        first_line = (str(error).strip().splitlines() or [""])[0]
        return (
            f"Triton's interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run a loop over "
            f"a tile range here ({type(error).__name__}: {first_line[:100]}); on CPU use backend='pytorch', "
            "or a Triton release whose interpreter supports this numpy (or numpy < 2.4)"
        )
    return None if int(out[0]) == 1 else "Triton's interpreter ran a probe kernel but wrote the wrong value"

name = "triton"
devices = ("cuda", "cpu")

LN2 = math.log(2)
LOG2_E = 1 / math.log(2)
# Tiles must be powers of two (tl.arange) and at least 16 (tl.dot).
MIN_TILE = 16
TILE_SYMBOLS = (q_idx, kv_idx)
# What every tile function takes before the captured tensors' pointers and strides.
TILE_PARAMS = ["score", "b", "h", "offs_m", "offs_n", "N", "M"]
# The scalars a query tile's KV bounds may read (besides captured tensors indexed by them).
BOUND_SYMBOLS = {q_first, q_last, N, M, b, h}
# The dtypes of captured tensors loaded as float32 (and, read by the score, differentiated).
FLOAT_TENSORS = ("f16", "bf16", "f32", "f64")
# Indices the caller checks against the captured tensor's size before the call (CompiledAttention):
# loads at them need no check in the kernel; every other index is wrapped and checked as torch does.
HOST_CHECKED_INDICES = {b, h, q_idx, kv_idx, q_first, q_last}


def _float_literal(value) -> str:
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(value)


def padded(size: int) -> int:
    """The tile width for a head dimension: the next power of two, at least MIN_TILE."""
    return max(MIN_TILE, 1 << (size - 1).bit_length())


class TritonPrinter(ExpressionPrinter):
    """Prints IR expressions as Triton code on one [BLOCK_M, BLOCK_N] tile.

    ``q_idx`` is a column [BLOCK_M, 1], ``kv_idx`` a row [1, BLOCK_N], ``b`` and ``h``
    scalars. Integer ``//`` and ``%`` keep Python's flooring semantics (Triton's, like
    C's, truncate toward zero). Loads of captured tensors reach the printer already
    hoisted into symbols (``TileExpressions``). ``helpers`` collects the names of the
    @triton.jit helpers the printed code calls.
    """

    def __init__(self, captured: CapturedNames):
        super().__init__(captured)
        self.helpers: set[str] = set()

    def _print(self, expr, **kwargs):
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.is_Integer:
            return _float_literal(expr)
        return super()._print(expr, **kwargs)

    def _float(self, expr) -> str:
        """An operand of a float-only function: integers are converted first."""
        if expr.is_Integer:
            return _float_literal(expr)
        if expr.is_integer:
            return f"({self._print(expr)}).to(tl.float32)"
        return self._print(expr)

    def _print_Indexed(self, expr):
        raise AssertionError(f"captured-tensor loads are hoisted before printing, found {expr}")

    def _print_Integer(self, expr):
        # Triton's interpreter converts a Python int to the other operand's type (int32 for the indices)
        # and refuses one beyond it: such constants are int64 tensors, which promote the indices.
        if -(2**31) <= int(expr) < 2**31 or not INT64_MIN <= int(expr) <= INT64_MAX:
            return super()._print_Integer(expr)
        return f"tl.full([], {int(expr)}, tl.int64)"

    def _print_FloorDiv(self, expr):
        a, c = expr.args
        if not (a.is_integer and c.is_integer):
            return f"tl.floor({self._float(a)} / {self._float(c)})"
        if a.is_nonnegative and c.is_positive:  # truncation is flooring here
            return f"({self.parenthesize(a, 50)} // {self.parenthesize(c, 50)})"
        self.helpers.add("_floordiv")
        return f"_floordiv({self._print(a)}, {self._print(c)})"

    def _print_Mod(self, expr):
        a, c = expr.args
        if not (a.is_integer and c.is_integer):
            x, y = self._float(a), self._float(c)
            return f"(({x}) - ({y}) * tl.floor(({x}) / ({y})))"
        if a.is_nonnegative and c.is_positive:
            return f"({self.parenthesize(a, 50)} % {self.parenthesize(c, 50)})"
        self.helpers.add("_mod")
        return f"_mod({self._print(a)}, {self._print(c)})"

    def _print_Pow(self, expr, rational=False):
        base, exponent = expr.args
        if exponent == sympy.Rational(1, 2):
            return f"tl.sqrt({self._float(base)})"
        if exponent == -sympy.Rational(1, 2):
            return f"tl.rsqrt({self._float(base)})"
        if exponent == -1:
            return f"(1.0 / {self.parenthesize(base, precedence(expr))})"
        if exponent.is_Integer:
            self.helpers.add("_powi")
            power = f"_powi({self._print(base)}, {abs(int(exponent))})"
            return power if exponent > 0 else f"(1.0 / {power})"
        if base == 2:
            return f"tl.exp2({self._float(exponent)})"
        if base.is_number and base.is_positive:
            return f"tl.exp2({_float_literal(sympy.log(base, 2))} * {self.parenthesize(exponent, 50)})"
        return f"tl.exp2({self.parenthesize(exponent, 50)} * tl.log2({self._float(base)}))"

    def _print_exp(self, expr):
        return f"tl.exp({self._float(expr.args[0])})"

    def _print_log(self, expr):
        return f"tl.log({self._float(expr.args[0])})"

    def _print_tanh(self, expr):
        self.helpers.add("_tanh")
        return f"_tanh({self._float(expr.args[0])})"

    def _print_Abs(self, expr):
        return f"tl.abs({self._print(expr.args[0])})"

    def _rounding(self, expr, fn: str):
        (arg,) = expr.args
        if arg.is_integer:
            return self._print(arg)
        return f"tl.{fn}({self._float(arg)}).to(tl.int32)"

    def _elementwise(self, name: str, args):
        if name == "fmod" and all(arg.is_integer for arg in args):
            a, c = (self.parenthesize(arg, 50) for arg in args)
            return f"({a} % {c})"  # Triton's integer % truncates toward zero, as fmod does
        if name == "sign":
            x = self._print(args[0])
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
        if name in ("sin", "cos", "erf"):
            return f"tl.{name}({self._float(args[0])})"
        helper = TRITON_FUNCTION_HELPERS[name]
        self.helpers.update(HELPER_NEEDS.get(helper, ()) + (helper,))
        return f"{helper}({', '.join(self._float(arg) for arg in args)})"

    def _print_Heaviside(self, expr):
        x = self._print(expr.args[0])
        at_zero = _float_literal(expr.args[1]) if len(expr.args) > 1 else "0.5"
        return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, 0.0, {at_zero}))"

    def _min_max(self, expr, fn: str):
        args = [self._print(a) for a in expr.args]
        result = args[-1]
        for arg in reversed(args[:-1]):
            result = f"tl.{fn}({arg}, {result})"
        return result

    def _print_Piecewise(self, expr):
        *pieces, (otherwise, last_condition) = expr.args
        if last_condition is not sympy.true:
            raise BackendError(f"a Piecewise without a default branch cannot be printed: {expr}")
        result = self._print(otherwise)
        for value, condition in reversed(pieces):
            result = f"tl.where({self._print(condition)}, {self._print(value)}, {result})"
        return result

    def _print_ITE(self, expr):
        condition, a, c = (self._print(arg) for arg in expr.args)
        return f"tl.where({condition}, {a}, {c})"

    def _logical(self, expr, symbol: str):
        return "(" + f" {symbol} ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(~{self._print(expr.args[0])})"

    def _print_Derivative(self, expr):
        raise BackendError(f"the triton backend cannot differentiate {expr.expr}; use backend='pytorch'")


def _like(symbol_name: str, expr) -> sympy.Symbol:
    """A symbol standing for ``expr``, with the assumptions the printer reads that hold for it."""
    if is_boolean(expr):
        return sympy.Symbol(symbol_name)
    facts = {fact: True for fact in ("integer", "nonnegative", "positive", "real") if getattr(expr, f"is_{fact}")}
    return sympy.Symbol(symbol_name, **facts)


class Address(NamedTuple):
    """Where a captured-tensor element lies on a tile: its name (a prefix for its lines), each printed index,
    the mask of its loads ("" for none) and the tile symbols its index reads (q_idx, kv_idx)."""

    name: str
    positions: list
    mask: str
    used: set


class TileExpressions:
    """Writes IR expressions as lines of one @triton.jit tile function.

    Captured-tensor loads come first, innermost first (``offsets[doc[kv_idx]]`` loads
    ``doc`` then ``offsets``), each masked to the sequence bounds its index reads
    (``row_ok``, ``col_ok``) so padded rows and columns never read out of bounds;
    then common subexpressions (``tmp0``, ...); then the value. A later expression
    reuses the loads of an earlier one (the mask those of the score).
    """

    def __init__(self, printer: TritonPrinter, captured: dict):
        self.printer = printer
        self.captured = captured  # label -> (ndim, dtype)
        self.names = printer.captured
        self.temporaries = sympy.numbered_symbols("tmp")
        self.loads: dict = {}  # (label, indices) -> symbol
        self.tile_uses: dict = {}  # load symbol -> the tile symbols (q_idx, kv_idx) its index reads
        self.addresses: dict = {}  # (label, indices) -> Address
        self.checks_indices = False  # whether a load checks a computed index (and may flag index_error_ptr)

    def lines(self, expr, target: str) -> list[str]:
        """Lines computing ``target = expr``."""
        lines: list[str] = []
        expr = self._hoist_loads(fold_numbers(expr), lines)
        replacements, (reduced,) = sympy.cse([expr], symbols=self.temporaries)
        renamed = {}
        for symbol, value in replacements:
            value = value.xreplace(renamed)
            renamed[symbol] = _like(symbol.name, value)
            lines.append(f"{renamed[symbol]} = {self.printer.doprint(value)}")
        lines.append(f"{target} = {self.printer.doprint(reduced.xreplace(renamed))}")
        return lines

    def _hoist_loads(self, expr, lines: list):
        if isinstance(expr, sympy.Indexed):
            key = self._element_key(expr, lines)
            if key not in self.loads:
                self.loads[key] = self._load(key, expr, lines)
            return self.loads[key]
        if not expr.args or isinstance(expr, sympy.Symbol):
            return expr
        return expr.func(*(self._hoist_loads(a, lines) for a in expr.args))

    def _element_key(self, element, lines: list) -> tuple:
        """(label, indices) of a captured-tensor element, with the loads its indices read hoisted."""
        return str(element.base.label), tuple(self._hoist_loads(i, lines) for i in element.indices)

    def _address(self, key: tuple, lines: list) -> Address:
        """The element's position in its tensor: lines wrapping and checking each computed index (once per element)."""
        if key in self.addresses:
            return self.addresses[key]
        label, indices = key
        ndim = self.captured[label][0]
        if len(indices) != ndim:
            raise BackendError(f"captured tensor {label!r} has {ndim} dims but is indexed with {len(indices)}")
        used = set()
        for index in indices:
            used |= {s for s in index.free_symbols if s in TILE_SYMBOLS}
            used |= set().union(*(self.tile_uses.get(s, set()) for s in index.free_symbols))
        masks = [mask for symbol, mask in ((q_idx, "row_ok"), (kv_idx, "col_ok")) if symbol in used]
        name = self.names.derived(label, str(len(self.addresses)))
        positions, in_range, shaped = [], [], []
        for dim, index in enumerate(indices):
            if index in HOST_CHECKED_INDICES:  # the caller checks the tensor's size against N, M, B, H
                position = self.printer.parenthesize(index, 50)
                shaped.append(f"({position} >= 0)")  # always true; gives a computed index's mask this one's shape
            else:  # as torch indexes: a negative index counts once from the end; out of range is an error
                position, size = f"{name}_index{dim}", self.names.derived(label, f"size{dim}")
                # a tensor even where the index is a Python number (a constant, or sizes Triton specialised to 1)
                lines.append(f"{position} = {self.printer.doprint(index)} + tl.zeros([], tl.int32)")
                lines.append(f"{position} = tl.where({position} < 0, {position} + {size}, {position})")
                in_range.append(f"({position} >= 0) & ({position} < {size})")
            positions.append(position)
        mask = " & ".join(masks)
        if in_range:
            # a 0-d mask beside a block index (a decoding tile's per-row head) would not broadcast in the interpreter
            in_range += shaped
            # tl.where, not &, joins conditions of different shapes: the interpreter's & of a 0-d and a
            # block boolean is no boolean
            self.checks_indices = True
            lines.append(f"{name}_in_range = {_all(in_range)}")
            outside = f"tl.where({name}_in_range, False, {mask})" if masks else f"{name}_in_range == 0"
            lines.append(f"{name}_out_of_range = {outside}")
            lines.append(  # the pointer takes the mask's shape
                f"tl.store(index_error_ptr + {name}_out_of_range.to(tl.int32) * 0, 1, mask={name}_out_of_range)"
            )
            mask = _all([f"{name}_in_range", mask] if masks else [f"{name}_in_range"])
        self.addresses[key] = Address(name, positions, mask, used)
        return self.addresses[key]

    def _offset(self, label: str, address: Address, stride: str) -> str:
        """``position0 * <tensor>_<stride>0 + ...``: the element's offset in a tensor of the given strides."""
        terms = (f"{p} * {self.names.derived(label, f'{stride}{d}')}" for d, p in enumerate(address.positions))
        return " + ".join(terms)

    def _load(self, key: tuple, element, lines: list) -> sympy.Symbol:
        label = key[0]
        address = self._address(key, lines)
        cast = ".to(tl.float32)" if self.captured[label][1] in FLOAT_TENSORS else ""
        symbol = _like(address.name, element)
        self.tile_uses[symbol] = address.used
        mask = f", mask={address.mask}, other=0" if address.mask else ""
        pointer = f"{self.names.derived(label, 'ptr')} + {self._offset(label, address, 'stride')}"
        lines.append(f"{symbol} = tl.load({pointer}{mask}){cast}")
        return symbol

    def accumulate(self, element, value: str, lines: list) -> None:
        """Lines adding the tile ``value`` at each position into the float32 gradient of the captured ``element``.

        The gradient is ``<tensor>_grad_ptr`` with strides ``<tensor>_grad_stride<d>``. An index that
        reads neither q_idx nor kv_idx is one element for the whole tile: one atomic adds the tile's
        sum; one that reads only kv_idx (q_idx) adds column (row) sums. Masked like the element's load.
        """
        key = self._element_key(element, lines)
        label, address = key[0], self._address(key, lines)
        if not address.used:
            value = f"tl.sum(tl.sum({value}, 1), 0)"
        elif address.used == {kv_idx}:
            value = f"tl.sum({value}, 0)[None, :]"
        elif address.used == {q_idx}:
            value = f"tl.sum({value}, 1)[:, None]"
        pointer = f"{self.names.derived(label, 'grad_ptr')} + {self._offset(label, address, 'grad_stride')}"
        mask = f", mask={address.mask}" if address.mask else ""
        lines.append(f"tl.atomic_add({pointer}, {value}{mask})")


def _all(conditions: list[str]) -> str:
    """The conjunction of Triton conditions of any shapes, as nested tl.where."""
    result = conditions[-1]
    for condition in reversed(conditions[:-1]):
        result = f"tl.where({condition}, {result}, False)"
    return result


def element_derivatives(expr) -> dict:
    """Each float captured-tensor element ``expr`` reads (``bias[h, kv_idx]``) -> d expr / d element.

    Each element is differentiated as a symbol of its own, so two reads of one tensor at
    different indices stay two terms (sympy would relate them by KroneckerDelta). An element
    read only inside another's index has no derivative (an index is an integer).
    """
    elements = sorted(
        (e for e in expr.atoms(sympy.Indexed) if e.base.label.is_real and not e.base.label.is_integer), key=str
    )
    stand_ins = {element: sympy.Dummy(f"element{i}", real=True) for i, element in enumerate(elements)}
    restore = {symbol: element for element, symbol in stand_ins.items()}
    value = expr.xreplace(stand_ins)
    return {
        element: score_derivative(value, symbol).xreplace(restore)
        for element, symbol in stand_ins.items()
        if symbol in value.free_symbols
    }


def _scalar_bound(expr) -> bool:
    """Whether a schedule bound reads only what a kernel has for its query tile (and captured tensors at those)."""
    if isinstance(expr, sympy.Indexed):
        return all(_scalar_bound(index) for index in expr.indices)
    if isinstance(expr, sympy.Symbol):
        return expr in BOUND_SYMBOLS
    return all(_scalar_bound(arg) for arg in expr.args)


def _depends_on_tile(expr) -> bool:
    return bool(expr.has(score, q_idx, kv_idx) or expr.atoms(sympy.Indexed))


ROPE_TABLE_LOADS = (
    "    freq = tl.load(ROPE_FREQ + offs_d)  # RoPE: each column's signed frequency (0: passes through)\n"
    "    pair = tl.load(ROPE_PAIR + offs_d)  # and the other column of its pair\n"
)


def rope_turn(indent: str, x: str, row_address: str, column_stride: str, ok: str, positions: str, d_mask: str) -> str:
    """Kernel lines that turn the tile ``x`` by RoPE: its partner columns loaded from the same rows, then ``_rope``."""
    return (
        f"{indent}# RoPE: column d becomes x[d] cos(pos * freq[d]) + x[pair[d]] sin(pos * freq[d])\n"
        f"{indent}{x}_pair = tl.load({row_address} + pair[None, :] * {column_stride}, "
        f"mask={ok}[:, None]{d_mask}, other=0.0)\n"
        f"{indent}{x} = _round(_rope({x}, {x}_pair, {positions}, freq), {x}.dtype, INTERPRET_BF16)\n"
    )


class RegionWriter:
    """Generates the kernels and the autograd function of one flash_attention region."""

    def __init__(self, node, ir_line: str, names: CapturedNames):
        op = node.op
        self.op = op
        self.ir_line = ir_line
        if op.block_m == 0 or op.block_n == 0:
            raise BackendError(
                f"the triton backend needs tile sizes on the region; run tile{{target=triton}} first: {ir_line}"
            )
        tiles = (("block_m", op.block_m), ("block_n", op.block_n), ("bwd_block_m", op.bwd_block_m or op.block_m),
                 ("bwd_block_n", op.bwd_block_n or op.block_n))  # fmt: skip
        for label, size in tiles:
            if size < MIN_TILE or size & (size - 1):
                raise BackendError(
                    f"tile {label}={size} is invalid for triton: a power of two >= {MIN_TILE} is allowed"
                )
        q, _, v = (operand.type for operand in node.inputs[:3])
        self.head_dim, self.head_dim_v = int(q.shape[3]), int(v.shape[3])
        self.names = names
        self.captured = [operand.op.label for operand in node.inputs[3:]]
        self.captured_types = {operand.op.label: (operand.type.rank, operand.type.dtype) for operand in node.inputs[3:]}
        self.printer = TritonPrinter(names)
        self.helpers: set[str] = set()  # helpers the kernels call besides the printer's
        self.expression_writers: list[TileExpressions] = []
        self.exp, self.log = ("tl.exp2", "tl.log2") if op.exp2 else ("tl.exp", "tl.log")
        self.coefficient, self.rest = split_linear(op.score)
        self.element_derivatives = element_derivatives(op.score)
        read = {str(element.base.label) for element in self.element_derivatives}
        self.trainable = [label for label in self.captured if label in read]  # their gradients are computed

    def tile_expressions(self) -> TileExpressions:
        writer = TileExpressions(self.printer, self.captured_types)
        self.expression_writers.append(writer)
        return writer

    @property
    def checks_indices(self) -> bool:
        """Whether a kernel checks a computed index into a captured tensor (and may flag index_error_ptr)."""
        return any(writer.checks_indices for writer in self.expression_writers)

    # -- pieces of parameter lists
    def tile_params(self) -> list[str]:
        """Each captured tensor's pointer, strides and sizes, and index_error_ptr, as the tile functions take them."""
        params = []
        for label in self.captured:
            params.append(self.names.derived(label, "ptr"))
            dims = range(self.captured_types[label][0])
            params += [self.names.derived(label, f"stride{d}") for d in dims]
            params += [self.names.derived(label, f"size{d}") for d in dims]
        return params + ["index_error_ptr"] if self.captured else params

    def kernel_pointers(self) -> str:
        """The captured tensors' pointers and index_error_ptr, after the kernel's own tensors."""
        return "".join(f" {p}," for p in self.tile_params() if p.endswith("_ptr"))

    def kernel_strides(self) -> str:
        """The captured tensors' strides and sizes, after the kernel's own strides."""
        return "".join(f" {p}," for p in self.tile_params() if not p.endswith("_ptr"))

    def grad_params(self, annotated: bool = False) -> list[str]:
        """Per trainable captured tensor: its gradient's pointer and strides, and the constexpr saying whether it is wanted."""
        params = []
        for label in self.trainable:
            params.append(self.names.derived(label, "grad_ptr"))
            params += [self.names.derived(label, f"grad_stride{d}") for d in range(self.captured_types[label][0])]
            params.append(self.names.derived(label, "needs_grad") + (": tl.constexpr" if annotated else ""))
        return params

    # -- the tile functions
    def scores_function(self) -> list[str]:
        op = self.op
        writer = self.tile_expressions()
        lines = [
            "@triton.jit",
            f"def _scores({', '.join(TILE_PARAMS)},",
            f"            {''.join(p + ', ' for p in self.tile_params())}MASKED: tl.constexpr):",
            f'    """One [BLOCK_M, BLOCK_N] tile of {self.units} scores from score = q . k; -inf where hidden.',
            "",
            "    MASKED tiles evaluate the mask and the sequence bounds; full tiles need neither.",
            '    """',
            "    q_idx = offs_m[:, None]",
            "    kv_idx = offs_n[None, :]",
            "    row_ok = q_idx < N",
            "    col_ok = kv_idx < M",
            f"    # score = {sympy.sstr(op.score)}",
        ]
        if self.coefficient is not None:
            if self.rest != 0:
                lines += ["    " + line for line in writer.lines(self.rest, "bias")]
            lines.append(f"    s = score * {self.coefficient!r}" + (" + bias" if self.rest != 0 else ""))
        else:
            lines += ["    " + line for line in writer.lines(op.score, "s")]
            if not _depends_on_tile(op.score) or op.score.is_integer:
                lines.append("    s = tl.zeros_like(score) + s")
        lines.append("    if MASKED:")
        if op.mask is sympy.true:
            lines.append("        keep = row_ok & col_ok")
        else:
            lines.append(f"        # mask = {sympy.sstr(op.mask)}")
            lines += ["        " + line for line in writer.lines(op.mask, "visible")]
            lines.append("        keep = row_ok & col_ok & visible")
        lines += ['        s = tl.where(keep, s, float("-inf"))', "    return s"]
        return lines

    def score_grad_function(self) -> list[str]:
        """d s / d score times ln 2 (the softmax's base), when s is not linear in score."""
        derivative = score_derivative(self.op.score) * (LN2 if self.op.exp2 else 1)
        writer = self.tile_expressions()
        units = " times ln(2): s is in base-2 units" if self.op.exp2 else ""
        lines = [
            "@triton.jit",
            f"def _score_grad({', '.join(TILE_PARAMS + self.tile_params())}):",
            f'    """d s / d score{units}, by sympy.diff of the score expression."""',
            "    q_idx = offs_m[:, None]",
            "    kv_idx = offs_n[None, :]",
            "    row_ok = q_idx < N",
            "    col_ok = kv_idx < M",
            f"    # d/d score: {sympy.sstr(derivative)}",
        ]
        lines += ["    " + line for line in writer.lines(derivative, "grad")]
        if not _depends_on_tile(derivative) or derivative.is_integer:
            lines.append("    grad = tl.zeros_like(score) + grad")
        lines.append("    return grad")
        return lines

    def captured_grads_function(self) -> list[str]:
        """Adds each trainable captured tensor's gradient on one tile: ds times d s / d element, per element read."""
        units = " times ln(2) (s is in base-2 units)" if self.op.exp2 else ""
        lines = [
            "@triton.jit",
            f"def _captured_grads(ds, {', '.join(TILE_PARAMS)},",
            f"                    {', '.join(self.tile_params())},",
            f"                    {', '.join(self.grad_params(annotated=True))}):",
            f'    """dL/d element += ds * d s / d element{units}, for each element of a captured tensor the score reads',
            "    (sympy.diff of the score expression), into float32 gradients. Hidden elements (ds = 0) and the padding",
            "    past N and M add nothing: full tiles evaluate no bounds, so the padded keys of the last KV tile have a",
            "    score there (dK and dV never store them).",
            '    """',
            "    q_idx = offs_m[:, None]",
            "    kv_idx = offs_n[None, :]",
            "    row_ok = q_idx < N",
            "    col_ok = kv_idx < M",
        ]
        to_natural = sympy.log(2) if self.op.exp2 else 1
        for label in self.trainable:
            writer = self.tile_expressions()  # each tensor's block loads what it reads: the blocks are optional
            lines.append(f"    if {self.names.derived(label, 'needs_grad')}:")
            for element, derivative in self.element_derivatives.items():
                if str(element.base.label) != label:
                    continue
                derivative = derivative * to_natural
                body = [f"# d s / d {sympy.sstr(element)}: {sympy.sstr(fold_numbers(derivative))}"]
                if derivative == 1:
                    body.append("contribution = tl.where(row_ok & col_ok, ds, 0.0)")
                else:
                    body += writer.lines(derivative, "grad")
                    body.append("contribution = tl.where(row_ok & col_ok & (ds != 0.0), ds * grad, 0.0)")
                writer.accumulate(element, "contribution", body)
                lines += ["        " + line for line in body]
        return lines

    def captured_grads_call(self) -> str:
        """The dK/dV tile loop's line adding the captured tensors' gradients, after ds (none without trainable tensors)."""
        if not self.trainable:
            return ""
        args = ", ".join(["ds", "qk", *TILE_PARAMS[1:], *self.tile_params(), *self.grad_params()])
        return f"\n        _captured_grads({args})"

    @property
    def units(self) -> str:
        return "base-2" if self.op.exp2 else "natural-log"

    def ds_to_dscore(self) -> str:
        """The line turning dL/ds (ds) into dL/d(q . k) (dx)."""
        if self.coefficient is not None:
            factor = self.coefficient * (LN2 if self.op.exp2 else 1)
            return f"dx = ds * {factor!r}  # d s / d score{' * ln(2)' if self.op.exp2 else ''}"
        args = ", ".join(["qk", *TILE_PARAMS[1:], *self.tile_params()])
        return f"dx = tl.where(p == 0.0, 0.0, ds * _score_grad({args}))  # hidden elements add nothing"

    # -- the KV tiles of one query tile, and the query tiles of one KV tile
    def usable_schedule(self):
        """The region's sparsity schedule, or None when its bounds read symbols the kernels lack."""
        schedule = self.op.schedule
        if schedule is not None and not all(
            _scalar_bound(e) for e in schedule.expressions()[: 2 if schedule.table else 4]
        ):
            return None  # bounds over symbols the kernel lacks: fall back to masking every tile
        return schedule

    def bound_lines(self, schedule, targets: str = "lo, hi, full_lo, full_hi") -> list[str]:
        """Lines setting the targets (lo, hi, full_lo, full_hi) from the schedule's bounds of the rows q_first .. q_last."""
        self.helpers.add("_kv_tiles")
        writer = self.tile_expressions()
        names = ("kv_lo", "kv_hi", "kv_full_lo", "kv_full_hi")
        expressions = schedule.expressions()[:4]
        if schedule.table:  # the residual is evaluated on every visited tile: none is full
            names, expressions = names[:2], expressions[:2]
        lines = []
        for name, expr in zip(names, expressions):
            lines += writer.lines(expr, name)
        if schedule.table:
            lines.append("kv_full_lo, kv_full_hi = 0, 0  # the residual mask needs evaluating on every tile")
        lines.append(f"{targets} = _kv_tiles(kv_lo, kv_hi, kv_full_lo, kv_full_hi, M, BLOCK_N)")
        return lines

    def kv_schedule_lines(self) -> list[str]:
        """Lines of the forward and dQ kernels setting lo, hi, full_lo, full_hi for the query tile start_m.

        With a sparsity schedule its bounds are printed for the tile's rows q_first .. q_last
        (captured tensors loaded as scalars) and rounded to whole KV tiles by ``_kv_tiles``;
        with a residual mask no tile is full. Without one, a region without a mask has every
        tile full but the one the sequence end cuts; a masked region visits and masks every tile.
        """
        schedule = self.usable_schedule()
        if schedule is None:
            if self.op.mask is sympy.true:
                return [
                    "#    No mask: every tile is full but the last, which the sequence end cuts.",
                    "lo, hi = 0, M",
                    "full_lo, full_hi = 0, M // BLOCK_N * BLOCK_N",
                ]
            return [
                "#    No sparsity schedule: every tile is visited and masked.",
                "lo, hi = 0, M",
                "full_lo, full_hi = lo, lo",
            ]
        return [
            "#    The sparsity schedule of the rows q_first .. q_last, rounded to whole KV tiles by _kv_tiles:",
            f"#    {schedule}",
            "q_first = start_m * BLOCK_M",
            "q_last = tl.minimum(q_first + BLOCK_M, N) - 1",
            *self.bound_lines(schedule),
        ]

    def q_schedule_lines(self) -> list[str]:
        """Lines of the dK/dV kernel setting lo, hi, full_lo, full_hi (rows) for the KV tile start_n and head h.

        The transpose of the KV schedule: the bounds of every query tile are evaluated,
        SCAN_TILES query tiles at a time, and the tiles that visit this KV tile give
        ``[lo, hi)`` (first to last; tiles between that do not visit it are masked, so
        a bound that is not monotone in q stays correct). The tiles for which it is full
        give ``[full_lo, full_hi)`` only when they are contiguous; the last query tile,
        cut by the sequence end, is always masked.
        """
        schedule = self.usable_schedule()
        if schedule is None:
            if self.op.mask is sympy.true:
                return [
                    "# No mask: every query tile is full but the last, which the sequence end cuts.",
                    "lo, hi = 0, N",
                    "full_lo, full_hi = 0, N // BLOCK_M * BLOCK_M",
                ]
            return [
                "# No sparsity schedule: every query tile is visited and masked.",
                "lo, hi = 0, N",
                "full_lo, full_hi = lo, lo",
            ]
        scan = [
            "tile = chunk + tl.arange(0, SCAN_TILES)",
            "scanned = tile < q_tiles",
            "q_first = tl.minimum(tile, q_tiles - 1) * BLOCK_M",
            "q_last = tl.minimum(q_first + BLOCK_M, N) - 1",
            *self.bound_lines(schedule, "tile_lo, tile_hi, tile_full_lo, tile_full_hi"),
            "visits = scanned & (tile_lo <= n_first) & (n_first < tile_hi)",
            "full = visits & (tile_full_lo <= n_first) & (n_first < tile_full_hi) & (tile < whole_tiles)",
            "first = tl.minimum(first, tl.min(tl.where(visits, tile, q_tiles)))",
            "last = tl.maximum(last, tl.max(tl.where(visits, tile, -1)))",
            "full_first = tl.minimum(full_first, tl.min(tl.where(full, tile, q_tiles)))",
            "full_last = tl.maximum(full_last, tl.max(tl.where(full, tile, -1)))",
            "full_count += tl.sum(full.to(tl.int32))",
        ]
        return [
            "# The query tiles whose KV schedule (the forward's, per query tile) includes this KV tile:",
            f"# {schedule}",
            "n_first = start_n * BLOCK_N",
            "q_tiles = tl.cdiv(N, BLOCK_M)",
            "whole_tiles = N // BLOCK_M  # the last query tile, cut by the sequence end, stays masked",
            "first, full_first = q_tiles, q_tiles",
            "last, full_last, full_count = q_tiles * 0 - 1, q_tiles * 0 - 1, q_tiles * 0",
            "for chunk in range(0, q_tiles, SCAN_TILES):",
            *("    " + line for line in scan),
            "lo, hi = first * BLOCK_M, tl.minimum((last + 1) * BLOCK_M, N)",
            "contiguous = (full_count > 0) & (full_count == full_last - full_first + 1)",
            "full_lo = tl.where(contiguous, full_first * BLOCK_M, lo)",
            "full_hi = tl.where(contiguous, (full_last + 1) * BLOCK_M, lo)",
        ]

    # -- RoPE: the kernels turn the q and k tiles they load, and turn dq and dk back
    def position_function(self, role: str) -> list[str]:
        """``_q_positions`` / ``_kv_positions``: the RoPE position of each row of a q or k tile, a [rows, 1] column."""
        writer = TileExpressions(self.printer, self.captured_types)
        index, offsets, ok, length = ("q_idx", "offs_m", "row_ok", "N") if role == "query" else ("kv_idx", "offs_n", "col_ok", "M")
        position = self.op.q_position if role == "query" else self.op.kv_position
        name = "_q_positions" if role == "query" else "_kv_positions"
        lines = [
            "@triton.jit",
            f"def {name}({''.join(p + ', ' for p in self.tile_params())}b, {offsets}, N, M):",
            f'    """The RoPE position of each {role} row of a tile, a [rows, 1] column: {sympy.sstr(position)}."""',
            f"    {index} = {offsets}[:, None]",
            f"    {ok} = {index} < {length}",
        ]
        lines += ["    " + line for line in writer.lines(position, "position")]
        lines.append("    return position")
        return lines

    def rope_fields(self, d_mask: str) -> dict:
        """The template fields that rotate tiles: empty without rope."""
        names = ("rope_pointers", "rope_args", "rotate_q", "rotate_k", "rotate_q_tile", "rotate_k_tile",
                 "turn_back_dq", "turn_back_dk")  # fmt: skip
        if self.op.rope is None:
            return dict.fromkeys(names, "")
        args = "".join(f"{p}, " for p in self.tile_params())
        q_positions, kv_positions = f"_q_positions({args}b, offs_m, N, M)", f"_kv_positions({args}b, offs_n, N, M)"

        def turn(indent: str, x: str, row_address: str, column_stride: str, ok: str, positions: str) -> str:
            return rope_turn(indent, x, row_address, column_stride, ok, positions, d_mask)

        def turn_back(x: str, positions: str) -> str:
            return (
                f"    # RoPE's transpose: the gradient of the turned {x} turned back (angle -pos * freq)\n"
                f"    {x} = _rope({x}, _partners({x}, pair), {positions}, -freq)\n"
            )

        tables = ROPE_TABLE_LOADS
        q_row = "Q + b.to(tl.int64) * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm"
        k_row = "K + b.to(tl.int64) * stride_kz + kv_h * stride_kh + offs_n[:, None] * stride_kn"
        self.helpers |= {"_rope", "_partners"}
        return dict(
            rope_pointers=" ROPE_FREQ, ROPE_PAIR,",
            rope_args="freq, pair, ",
            rotate_q=tables + turn("    ", "q", q_row, "stride_qk", "q_ok", q_positions),
            rotate_k=tables + turn("    ", "k", k_row, "stride_kk", "kv_ok", kv_positions),
            rotate_q_tile=turn("        ", "q", "q_base + offs_m[:, None] * stride_qm", "stride_qk", "q_ok", q_positions),
            rotate_k_tile=turn("        ", "k", "k_base + offs_n[:, None] * stride_kn", "stride_kk", "kv_ok", kv_positions),
            turn_back_dq=turn_back("dq", q_positions),
            turn_back_dk=turn_back("dk", kv_positions),
        )

    def rope_tables(self) -> str:
        """Host code: RoPE's per-column tables (``RoPE.column_tables``) padded to BLOCK_D, on the inputs' device."""
        freq, pair = self.op.rope.column_tables(self.head_dim)
        width = padded(self.head_dim)
        freq += [0.0] * (width - self.head_dim)
        pair += list(range(self.head_dim, width))
        return ROPE_TABLES.format(rope=self.op.rope, freq=tuple(freq), pair=tuple(pair))

    # -- everything
    def source(self) -> str:
        d_mask = "" if padded(self.head_dim) == self.head_dim else " & (offs_d[None, :] < HEAD_DIM)"
        dv_mask = "" if padded(self.head_dim_v) == self.head_dim_v else " & (offs_dv[None, :] < HEAD_DIM_V)"
        functions = [self.scores_function()]
        if self.coefficient is None:
            functions.append(self.score_grad_function())
        if self.op.rope is not None:
            functions += [self.position_function("query"), self.position_function("key")]
        if self.trainable:
            functions.append(self.captured_grads_function())
        fields = dict(
            tile_args="".join(f"{p}, " for p in self.tile_params()),
            grad_args="".join(f"{p}, " for p in self.grad_params()),
            grad_params="".join(f"{p}, " for p in self.grad_params(annotated=True)),
            grad_pointers="".join(f" {p}," for p in self.grad_params() if p.endswith("_ptr")),
            grad_strides="".join(f" {p}," for p in self.grad_params(annotated=True) if not p.endswith("_ptr")),
            captured_grads=self.captured_grads_call(),
            pointers=self.kernel_pointers(),
            strides=self.kernel_strides(),
            d_mask=d_mask,
            dv_mask=dv_mask,
            exp=self.exp,
            log=self.log,
            to_natural=f" * {LN2!r}" if self.op.exp2 else "",
            to_units=f" * {LOG2_E!r}  # log2(e): lse in base-2 units" if self.op.exp2 else "",
            dx_line=self.ds_to_dscore(),
            kv_schedule="\n".join("    " + line for line in self.kv_schedule_lines()),
            q_schedule="\n".join("        " + line for line in self.q_schedule_lines()),
            **self.rope_fields(d_mask),
        )
        for name, call in LOOP_CALLS.items():
            fields[name] = "\n".join(
                call.format(tiles=tiles, **{arg: fields[arg] for arg in ("tile_args", "rope_args", "grad_args")})
                for tiles in TILE_RANGES
            )
        parts = ["\n".join(f) for f in functions]
        parts += [text.format(**fields) for text in (FORWARD, BACKWARD)]
        return "\n\n\n".join(parts)

    def decode_rope_fields(self, d_mask: str) -> dict:
        """The decoding kernel's fields that turn its q tile and each K tile it loads: empty without rope."""
        if self.op.rope is None:
            return {"rope_pointers": "", "rotate_q": "", "rotate_k": "", "rope_tables": ""}
        args = "".join(f"{p}, " for p in self.tile_params())
        q_row = "Q + b.to(tl.int64) * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm"
        self.helpers |= {"_rope"}
        return {
            "rope_pointers": " ROPE_FREQ, ROPE_PAIR,",
            "rotate_q": ROPE_TABLE_LOADS
            + rope_turn("    ", "q", q_row, "stride_qk", "r_ok", f"_q_positions({args}b, offs_m, N, M)", d_mask),
            "rotate_k": rope_turn("        ", "k", "K + k_rows[:, None]", "stride_kk", "kv_ok",
                                  f"_kv_positions({args}b, offs_n, N, M)", d_mask),  # fmt: skip
            "rope_tables": " *_rope_tables(q.device),",
        }

    def decode_source(self) -> tuple[str, str]:
        """The decoding kernel and its host class (``backends/triton_decode.py``) for the region's decode schedule."""
        d_mask = "" if padded(self.head_dim) == self.head_dim else " & (offs_d[None, :] < HEAD_DIM)"
        rope = self.decode_rope_fields(d_mask)
        kernel = DECODE_KERNEL.format(
            rope_pointers=rope["rope_pointers"],
            rotate_q=rope["rotate_q"],
            rotate_k=rope["rotate_k"],
            pointers=self.kernel_pointers(),
            strides=self.kernel_strides(),
            tile_args="".join(f"{p}, " for p in self.tile_params()),
            d_mask=d_mask,
            dv_mask="" if padded(self.head_dim_v) == self.head_dim_v else " & (offs_dv[None, :] < HEAD_DIM_V)",
            dv_store_mask="" if padded(self.head_dim_v) == self.head_dim_v else ", mask=offs_dv < HEAD_DIM_V",
            bounds="\n".join("    " + line for line in decode_bounds(self)),
            exp=self.exp,
            log=self.log,
            to_natural=f" * {LN2!r}" if self.op.exp2 else "",
        )
        decode = self.op.decode
        host = DECODE_HOST.format(max_rows=decode.max_rows, min_keys=decode.min_keys, waves=decode.waves,
                                  rope_tables=rope["rope_tables"])  # fmt: skip
        return kernel, host

    def constants(self) -> str:
        op = self.op
        return CONSTANTS.format(
            groups=op.groups,
            head_dim=self.head_dim,
            block_d=padded(self.head_dim),
            head_dim_v=self.head_dim_v,
            block_dv=padded(self.head_dim_v),
            block_m=op.block_m,
            block_n=op.block_n,
            num_warps=op.num_warps or 4,
            num_stages=op.num_stages or 2,
            bwd_block_m=op.bwd_block_m or op.block_m,
            bwd_block_n=op.bwd_block_n or op.block_n,
            bwd_num_warps=op.bwd_num_warps or op.num_warps or 4,
            bwd_num_stages=op.bwd_num_stages or op.num_stages or 2,
            checks_indices=self.checks_indices,
            trainable=tuple(self.captured.index(label) for label in self.trainable),
        )

    def autograd_function(self) -> str:
        rope_tables = " *_rope_tables(q.device)," if self.op.rope is not None else ""
        return AUTOGRAD.format(doc=self.ir_line.replace('"', "'"), rope_tables=rope_tables)


IMPORTS = """\
import os
import sys

import torch
from torch.autograd.function import once_differentiable

if "triton" not in sys.modules and not torch.cuda.is_available():
    # No GPU: run the kernels in Triton's interpreter. Triton reads TRITON_INTERPRET when it
    # creates jit functions, its own included, so it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402"""

CONSTANTS = """\
GROUPS = {groups}  # query heads per KV head: head h reads KV head h // GROUPS
HEAD_DIM, BLOCK_D = {head_dim}, {block_d}  # q and k head dim; the tile width, a power of two
HEAD_DIM_V, BLOCK_DV = {head_dim_v}, {block_dv}  # v head dim; its tile width
BLOCK_M, BLOCK_N = {block_m}, {block_n}  # query rows and keys per tile
NUM_WARPS, NUM_STAGES = {num_warps}, {num_stages}
BWD_BLOCK_M, BWD_BLOCK_N = {bwd_block_m}, {bwd_block_n}  # the backward kernels' tiles
BWD_NUM_WARPS, BWD_NUM_STAGES = {bwd_num_warps}, {bwd_num_stages}
SCAN_TILES = tl.constexpr(64)  # query tiles whose bounds the dK/dV kernel evaluates at once
CHECKS_INDICES = {checks_indices}  # a computed index into a captured tensor is checked: the forward reads the flag
TRAINABLE = {trainable}  # the captured tensors (by position) the score reads as floats: dK/dV adds their gradients"""

# ELEMENTWISE_FUNCTIONS without a core tl function (Triton's interpreter runs no libdevice), and what they call.
TRITON_FUNCTION_HELPERS = {name: f"_{name}" for name in ("tan", "asin", "acos", "atan", "sinh", "cosh", "expm1",
                                                         "log1p", "trunc", "fmod")} | {"round": "_rint"}  # fmt: skip
HELPER_NEEDS = {"_asin": ("_atan",), "_acos": ("_atan",), "_sinh": ("_expm1",), "_fmod": ("_trunc",)}

HELPERS = {
    "_dot": '''\
@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """acc + a @ b in float32 (acc None: a new tile). Triton's interpreter would multiply bf16 bit
    patterns as integers: there (INTERPRET_BF16) the operands become float32 first, exactly."""
    if INTERPRET_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)''',
    "_round": '''\
@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """x in dtype, rounded to nearest as GPUs round. Triton's interpreter truncates float32 to bf16:
    there (INTERPRET_BF16) the bits are rounded first (round half to even, as torch does)."""
    if INTERPRET_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)''',
    "_kv_tiles": '''\
@triton.jit
def _kv_tiles(kv_lo, kv_hi, kv_full_lo, kv_full_hi, M, BLOCK_N: tl.constexpr):
    """A query tile's KV tiles from its key bounds: the keys outside [kv_lo, kv_hi) are hidden from all
    its rows, those in [kv_full_lo, kv_full_hi) visible to all. Returns (lo, hi, full_lo, full_hi),
    int32 with 0 <= lo <= full_lo <= full_hi <= hi <= M: lo rounded down to a tile edge, the full
    tiles [full_lo, full_hi) whole tiles inside the full keys (none when the range is empty)."""
    lo = tl.minimum(tl.maximum(kv_lo, 0), M).to(tl.int32) // BLOCK_N * BLOCK_N
    hi = tl.maximum(tl.minimum(kv_hi, M).to(tl.int32), lo)
    full_lo = tl.minimum(tl.maximum(kv_full_lo, lo), hi).to(tl.int32)  # clamped before the cast: bounds beyond int32
    full_lo = tl.minimum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi // BLOCK_N * BLOCK_N)
    full_hi = tl.maximum(tl.minimum(kv_full_hi, hi).to(tl.int32), full_lo) // BLOCK_N * BLOCK_N
    return lo, hi, full_lo, full_hi''',
    "_rope": '''\
@triton.jit
def _rope(x, x_pair, positions, freq):
    """x [rows, BLOCK_D] turned by RoPE, in float32: x cos(angle) + x_pair sin(angle), angle = position * freq.

    ``positions`` is a [rows, 1] column, ``freq`` each column's signed frequency (0 where the column passes
    through), ``x_pair`` each column's partner column."""
    angle = positions.to(tl.float32) * freq[None, :]
    return x.to(tl.float32) * tl.cos(angle) + x_pair.to(tl.float32) * tl.sin(angle)''',
    "_partners": '''\
@triton.jit
def _partners(x, pair):
    """Each column d of x [rows, BLOCK_D], a value held in registers, replaced by column pair[d]."""
    return tl.gather(x, tl.broadcast_to(pair[None, :], x.shape), axis=1)''',
    "_floordiv": '''\
@triton.jit
def _floordiv(a, b):
    """a // b rounded toward -inf, as in Python and torch (Triton's integer // truncates toward zero)."""
    quotient = a // b
    remainder = a - quotient * b
    return tl.where((remainder != 0) & ((remainder < 0) != (b < 0)), quotient - 1, quotient)''',
    "_mod": '''\
@triton.jit
def _mod(a, b):
    """a % b with the sign of b, as in Python and torch (Triton's integer % takes the sign of a)."""
    remainder = a % b
    return tl.where((remainder != 0) & ((remainder < 0) != (b < 0)), remainder + b, remainder)''',
    "_powi": '''\
@triton.jit
def _powi(x, n: tl.constexpr):
    """x ** n for a constant integer n >= 1, by repeated multiplication."""
    result = x
    for _ in tl.static_range(n - 1):
        result = result * x
    return result''',
    "_tan": '''\
@triton.jit
def _tan(x):
    return tl.sin(x) / tl.cos(x)''',
    "_atan": '''\
@triton.jit
def _atan(x):
    """atan: |x| reduced to [0, tan(pi/8)] by atan(a) = pi/2 + atan(-1/a) or pi/4 + atan((a-1)/(a+1)),
    then Cephes' single-precision polynomial."""
    a = tl.abs(x)
    big = a > 2.414213562373095  # tan(3 pi / 8)
    mid = a > 0.41421356237309503  # tan(pi / 8)
    y = tl.where(big, -1.0 / tl.maximum(a, 1.0), tl.where(mid, (a - 1.0) / (a + 1.0), a))
    z = y * y
    p = (((0.0805374449538 * z - 0.138776856032) * z + 0.199777106478) * z - 0.333329491539) * z * y + y
    r = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0)) + p
    return tl.where(x < 0, -r, r)''',
    "_asin": '''\
@triton.jit
def _asin(x):
    return _atan(x / tl.sqrt((1.0 - x) * (1.0 + x)))  # +-1 -> atan(+-inf) = +-pi/2''',
    "_acos": '''\
@triton.jit
def _acos(x):
    return 2.0 * _atan(tl.sqrt((1.0 - x) / (1.0 + x)))  # -1 -> 2 atan(inf) = pi''',
    "_expm1": '''\
@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0: Kahan's (u - 1) x / log(u), u = exp(x) rounded."""
    u = tl.exp(x)
    log_u = tl.where(u == 1.0, 1.0, tl.log(u))
    return tl.where(tl.abs(x) < 0.5, tl.where(u == 1.0, x, (u - 1.0) * x / log_u), u - 1.0)''',
    "_log1p": '''\
@triton.jit
def _log1p(x):
    """log(1 + x) without cancellation near 0: Kahan's log(u) x / (u - 1), u = 1 + x rounded."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))''',
    "_sinh": '''\
@triton.jit
def _sinh(x):
    """(e^a - e^-a) / 2 from expm1 (accurate near 0), a = |x|; e^a / 2 past 20, where e^-a no longer counts."""
    a = tl.abs(x)
    e = _expm1(tl.minimum(a, 20.0))
    s = tl.where(a < 20.0, 0.5 * (e + e / (e + 1.0)), 0.5 * tl.exp(a))
    return tl.where(x < 0, -s, s)''',
    "_cosh": '''\
@triton.jit
def _cosh(x):
    e = tl.exp(tl.abs(x))
    return 0.5 * (e + 1.0 / e)''',
    "_rint": '''\
@triton.jit
def _rint(x):
    """x rounded to the nearest integer, halves to even (torch.round); |x| >= 2^23 is an integer already."""
    r = tl.floor(x + 0.5)
    r = tl.where((r - x == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)
    return tl.where(tl.abs(x) >= 8388608.0, x, r)''',
    "_trunc": '''\
@triton.jit
def _trunc(x):
    return tl.where(x < 0, tl.ceil(x), tl.floor(x))''',
    "_fmod": '''\
@triton.jit
def _fmod(a, b):
    """a - b trunc(a / b): the remainder with the sign of a (torch.fmod), in float32."""
    return a - b * _trunc(a / b)''',
    "_tanh": '''\
@triton.jit
def _tanh(x):
    """tanh from exp2 (the interpreter has no libdevice); odd, and saturating to +-1 without overflow.

    Below |x| = 1/4, where 1 - e^(-2|x|) would cancel, its Taylor series to x^9 (exact to 1e-8).
    """
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # e^(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
    return tl.where(tl.abs(x) < 0.25, series, tl.where(x < 0, -t, t))''',
}

# The three loops of every kernel over its tile range: partial tiles, full tiles (no mask), partial tiles.
TILE_RANGES = ("lo, full_lo, True", "full_lo, full_hi, False", "full_hi, hi, True")
# One loop's call in each kernel; {tiles} is one of TILE_RANGES.
LOOP_CALLS = {
    "fwd_loops": '''\
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
                                    b, h, offs_m, N, M, {tile_args}{rope_args}
                                    {tiles}, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, DOT_PRECISION, INTERPRET_BF16)''',
    "dkdv_loops": '''\
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qk,
                                      stride_dom, stride_dok, b, h, offs_n, N, M, {tile_args}{rope_args}{grad_args}
                                      {tiles}, BLOCK_M, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, DOT_PRECISION, INTERPRET_BF16)''',
    "dq_loops": '''\
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
                            b, h, offs_m, N, M, {tile_args}{rope_args}
                            {tiles}, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, DOT_PRECISION, INTERPRET_BF16)''',
}

FORWARD = '''\
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
                    b, h, offs_m, N, M, {tile_args}{rope_args}
                    lo, hi, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Online softmax over the KV tiles [lo, hi): running max m_i, running sum l_i, accumulator acc."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < M
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk,
                    mask=kv_ok[:, None]{d_mask}, other=0.0)
{rotate_k_tile}        qk = _dot(q, tl.trans(k), None, DOT_PRECISION, INTERPRET_BF16)
        s = _scores(qk, b, h, offs_m, offs_n, N, M, {tile_args}MASKED)
        # -- online softmax: rescale the running sum and the accumulator when the max grows
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # a row without a visible key so far
        p = {exp}(s - m_safe[:, None])
        alpha = {exp}(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vk,
                    mask=kv_ok[:, None]{dv_mask}, other=0.0)
        acc = _dot(_round(p, v.dtype, INTERPRET_BF16), v, acc * alpha[:, None], DOT_PRECISION, INTERPRET_BF16)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,{pointers}{rope_pointers}
              stride_qz, stride_qh, stride_qm, stride_qk,
              stride_kz, stride_kh, stride_kn, stride_kk,
              stride_vz, stride_vh, stride_vn, stride_vk,
              stride_oz, stride_oh, stride_om, stride_ok,{strides}
              H, N, M,
              GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
              DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """o and lse of one query tile of one head (LSE is a contiguous [B, H, N] float32 tensor)."""
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    b = off_hz // H
    h = off_hz % H
    kv_h = h // GROUPS  # grouped-query attention by head index: K and V are never repeated
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_m < N
    q = tl.load(Q + b.to(tl.int64) * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qk, mask=q_ok[:, None]{d_mask}, other=0.0)
{rotate_q}    k_base = K + b.to(tl.int64) * stride_kz + kv_h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vz + kv_h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # -- KV schedule: visit the tiles [lo, hi); those in [full_lo, full_hi) are full (every key visible).
{kv_schedule}
{fwd_loops}
    # -- epilogue: o = acc / l, lse = m + log l; a row that saw no key keeps o = 0 and gets lse = -inf
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + {log}(l_safe)){to_natural}, float("-inf"))
    tl.store(LSE + off_hz.to(tl.int64) * N + offs_m, lse, mask=q_ok)
    o = acc / l_safe[:, None]
    tl.store(O + b.to(tl.int64) * stride_oz + h * stride_oh + offs_m[:, None] * stride_om
             + offs_dv[None, :] * stride_ok, _round(o, O.dtype.element_ty, INTERPRET_BF16), mask=q_ok[:, None]{dv_mask})'''

BACKWARD = '''\
@triton.jit
def _attn_bwd_preprocess(O, DO, DLSE, DELTA,
                         stride_oz, stride_oh, stride_om, stride_ok,
                         stride_doz, stride_doh, stride_dom, stride_dok,
                         H, N, BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(o * do) - dlse, the row term of dS = P * (dP - delta); DLSE, DELTA contiguous [B, H, N]."""
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    b = off_hz // H
    h = off_hz % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_m < N
    o = tl.load(O + b.to(tl.int64) * stride_oz + h * stride_oh + offs_m[:, None] * stride_om
                + offs_dv[None, :] * stride_ok, mask=q_ok[:, None]{dv_mask}, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_doz + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dok, mask=q_ok[:, None]{dv_mask}, other=0.0)
    dlse = tl.load(DLSE + off_hz.to(tl.int64) * N + offs_m, mask=q_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse
    tl.store(DELTA + off_hz.to(tl.int64) * N + offs_m, delta, mask=q_ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                         stride_qm, stride_qk, stride_dom, stride_dok,
                         b, h, offs_n, N, M, {tile_args}{rope_args}{grad_params}
                         lo, hi, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """dK += dS^T Q and dV += P^T dO of one KV tile, over the query tiles [lo, hi) of head h."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ok = offs_m < N
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                    mask=q_ok[:, None]{d_mask}, other=0.0)
{rotate_q_tile}        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dok,
                     mask=q_ok[:, None]{dv_mask}, other=0.0)
        # rows past N, and rows without a visible key (lse = -inf), get p = 0
        lse = tl.load(lse_base + offs_m, mask=q_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse){to_units}
        delta = tl.load(delta_base + offs_m, mask=q_ok, other=0.0)
        qk = _dot(q, tl.trans(k), None, DOT_PRECISION, INTERPRET_BF16)
        s = _scores(qk, b, h, offs_m, offs_n, N, M, {tile_args}MASKED)
        p = {exp}(s - lse[:, None])
        dv = _dot(tl.trans(_round(p, do.dtype, INTERPRET_BF16)), do, dv, DOT_PRECISION, INTERPRET_BF16)
        dp = _dot(do, tl.trans(v), None, DOT_PRECISION, INTERPRET_BF16)
        ds = p * (dp - delta[:, None]){captured_grads}
        {dx_line}
        dk = _dot(tl.trans(_round(dx, q.dtype, INTERPRET_BF16)), q, dk, DOT_PRECISION, INTERPRET_BF16)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,{pointers}{rope_pointers}{grad_pointers}
                   stride_qz, stride_qh, stride_qm, stride_qk,
                   stride_kz, stride_kh, stride_kn, stride_kk,
                   stride_vz, stride_vh, stride_vn, stride_vk,
                   stride_doz, stride_doh, stride_dom, stride_dok,
                   stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                   stride_dvz, stride_dvh, stride_dvn, stride_dvk,{strides}{grad_strides}
                   H, N, M,
                   GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """dK and dV of one KV tile of one KV head, summed over the GROUPS query heads that read it."""
    start_n = tl.program_id(0)
    off_hz = tl.program_id(1)
    kv_heads = H // GROUPS
    b = off_hz // kv_heads
    kv_h = off_hz % kv_heads
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_ok = offs_n < M
    k = tl.load(K + b.to(tl.int64) * stride_kz + kv_h * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kk, mask=kv_ok[:, None]{d_mask}, other=0.0)
{rotate_k}    v = tl.load(V + b.to(tl.int64) * stride_vz + kv_h * stride_vh + offs_n[:, None] * stride_vn
                + offs_dv[None, :] * stride_vk, mask=kv_ok[:, None]{dv_mask}, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUPS):
        h = kv_h * GROUPS + g
        # -- query schedule of head h: the query tiles [lo, hi) see this KV tile; for [full_lo, full_hi) it is full.
{q_schedule}
        q_base = Q + b.to(tl.int64) * stride_qz + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_doz + h * stride_doh
        lse_base = LSE + (b * H + h).to(tl.int64) * N
        delta_base = DELTA + (b * H + h).to(tl.int64) * N
{dkdv_loops}
{turn_back_dk}    tl.store(DK + b.to(tl.int64) * stride_dkz + kv_h * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkk, _round(dk, DK.dtype.element_ty, INTERPRET_BF16), mask=kv_ok[:, None]{d_mask})
    tl.store(DV + b.to(tl.int64) * stride_dvz + kv_h * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvk, _round(dv, DV.dtype.element_ty, INTERPRET_BF16), mask=kv_ok[:, None]{dv_mask})


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk,
                       b, h, offs_m, N, M, {tile_args}{rope_args}
                       lo, hi, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """dQ += dS K of one query tile, over the KV tiles [lo, hi)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < M
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk,
                    mask=kv_ok[:, None]{d_mask}, other=0.0)
{rotate_k_tile}        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vk,
                    mask=kv_ok[:, None]{dv_mask}, other=0.0)
        qk = _dot(q, tl.trans(k), None, DOT_PRECISION, INTERPRET_BF16)
        s = _scores(qk, b, h, offs_m, offs_n, N, M, {tile_args}MASKED)
        p = {exp}(s - lse[:, None])
        dp = _dot(do, tl.trans(v), None, DOT_PRECISION, INTERPRET_BF16)
        ds = p * (dp - delta[:, None])
        {dx_line}
        dq = _dot(_round(dx, k.dtype, INTERPRET_BF16), k, dq, DOT_PRECISION, INTERPRET_BF16)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,{pointers}{rope_pointers}
                 stride_qz, stride_qh, stride_qm, stride_qk,
                 stride_kz, stride_kh, stride_kn, stride_kk,
                 stride_vz, stride_vh, stride_vn, stride_vk,
                 stride_doz, stride_doh, stride_dom, stride_dok,
                 stride_dqz, stride_dqh, stride_dqm, stride_dqk,{strides}
                 H, N, M,
                 GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """dQ of one query tile of one head."""
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    b = off_hz // H
    h = off_hz % H
    kv_h = h // GROUPS
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = offs_m < N
    q = tl.load(Q + b.to(tl.int64) * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qk, mask=q_ok[:, None]{d_mask}, other=0.0)
{rotate_q}    do = tl.load(DO + b.to(tl.int64) * stride_doz + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dok, mask=q_ok[:, None]{dv_mask}, other=0.0)
    # rows past N, and rows without a visible key (lse = -inf), get p = 0
    lse = tl.load(LSE + off_hz.to(tl.int64) * N + offs_m, mask=q_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse){to_units}
    delta = tl.load(DELTA + off_hz.to(tl.int64) * N + offs_m, mask=q_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kz + kv_h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vz + kv_h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # -- KV schedule, as in the forward kernel
{kv_schedule}
{dq_loops}
{turn_back_dq}    tl.store(DQ + b.to(tl.int64) * stride_dqz + h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqk, _round(dq, DQ.dtype.element_ty, INTERPRET_BF16), mask=q_ok[:, None]{d_mask})'''

ROPE_TABLES = '''\
# RoPE {rope}: per column, the signed frequency and the other column of its pair, padded to BLOCK_D.
ROPE_FREQ = {freq}
ROPE_PAIR = {pair}
_rope_on_device = {{}}


def _rope_tables(device):
    """ROPE_FREQ (float32) and ROPE_PAIR (int32) as tensors on device, made once per device."""
    if device not in _rope_on_device:
        _rope_on_device[device] = (torch.tensor(ROPE_FREQ, dtype=torch.float32, device=device),
                                   torch.tensor(ROPE_PAIR, dtype=torch.int32, device=device))
    return _rope_on_device[device]'''

HOST = '''\
# Whether triton runs these kernels in its interpreter (it does when TRITON_INTERPRET=1 at import).
INTERPRETED = not isinstance(_attn_fwd, triton.runtime.JITFunction)


def _check_device(device):
    if device.type == "cuda":
        return
    from attncc.errors import BackendError  # imported here: the module itself needs only torch and triton

    if device.type == "cpu" and INTERPRETED:
        from attncc.backends.triton import interpreter_problem

        problem = interpreter_problem()
        if problem is not None:
            raise BackendError(problem)
        return

    if device.type == "cpu":
        raise BackendError(
            "CPU tensors run the triton kernels in Triton's interpreter, but triton was imported before "
            "TRITON_INTERPRET=1 was set; set it in the environment (or use backend='pytorch')"
        )
    raise BackendError(f"the triton backend runs on cuda and cpu tensors, not {device.type}")


def _captured_grad_buffers(captured, needs_input_grad):
    """A float32 zero gradient for each captured tensor that requires grad (the dK/dV kernel adds into those in
    TRAINABLE; the others, read by no score, keep zero), None for the others."""
    return [
        torch.zeros(t.shape, dtype=torch.float32, device=t.device) if needs else None
        for t, needs in zip(captured, needs_input_grad)
    ]


def _grad_arguments(captured, grads):
    """The dK/dV kernel's gradient arguments per tensor in TRAINABLE: (pointers, strides and whether it is wanted).

    A tensor whose gradient nobody wants passes itself with its strides: the kernel never writes it.
    """
    pointers, strides = [], []
    for i in TRAINABLE:
        target = captured[i] if grads[i] is None else grads[i]
        pointers.append(target)
        strides += [*target.stride(), grads[i] is not None]
    return pointers, strides


def _index_error_flag(device, captured):
    """The kernels' index_error_ptr argument (a flag set to 1 by a load out of range), if they take one."""
    return [torch.zeros(1, dtype=torch.int32, device=device)] if captured else []


def _strides_and_sizes(captured):
    return [n for t in captured for n in (*t.stride(), *t.shape)]


def _meta(q, block_m=BLOCK_M, block_n=BLOCK_N):
    """The constexpr arguments of the attention kernels, for inputs like q (and tiles of block_m x block_n)."""
    return dict(
        GROUPS=GROUPS, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, HEAD_DIM_V=HEAD_DIM_V, BLOCK_DV=BLOCK_DV,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs get fp32 products, not tf32
        INTERPRET_BF16=INTERPRETED and q.dtype == torch.bfloat16,
    )'''

AUTOGRAD = '''\
class FlashAttention(torch.autograd.Function):
    """{doc}

    Forward: _attn_fwd per query tile. Backward (FlashAttention-2): delta, then dK and dV
    per KV tile, then dQ per query tile; each recomputes its tiles' scores.
    """

    @staticmethod
    def forward(ctx, q, k, v, *captured):
        _check_device(q.device)
        B, H, N, _ = q.shape
        M = k.shape[2]
        o = torch.empty(B, H, N, HEAD_DIM_V, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(N, BLOCK_M), B * H)
        index_error = _index_error_flag(q.device, captured)
        _attn_fwd[grid](
            q, k, v, o, lse, *captured, *index_error,{rope_tables}
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *_strides_and_sizes(captured),
            H, N, M, **_meta(q), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
        if CHECKS_INDICES and index_error[0].item():
            raise IndexError("an index into a captured tensor is out of range: below -size or at least size")
        ctx.save_for_backward(q, k, v, o, lse, *captured)
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *captured = ctx.saved_tensors
        B, H, N, _ = q.shape
        M = k.shape[2]
        dlse = torch.zeros_like(lse) if dlse is None else dlse.float().contiguous()
        delta = torch.empty_like(lse)
        rows = (triton.cdiv(N, BWD_BLOCK_M), B * H)
        _attn_bwd_preprocess[rows](
            o, do, dlse, delta, *o.stride(), *do.stride(), H, N,
            BLOCK_M=BWD_BLOCK_M, HEAD_DIM_V=HEAD_DIM_V, BLOCK_DV=BLOCK_DV, num_warps=BWD_NUM_WARPS,
        )
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        captured_strides = _strides_and_sizes(captured)
        index_error = _index_error_flag(q.device, captured)  # the forward checked these indices
        meta = _meta(q, BWD_BLOCK_M, BWD_BLOCK_N)
        grads = _captured_grad_buffers(captured, ctx.needs_input_grad[3:])
        grad_pointers, grad_strides = _grad_arguments(captured, grads)
        _attn_bwd_dkdv[(triton.cdiv(M, BWD_BLOCK_N), B * k.shape[1])](
            q, k, v, do, lse, delta, dk, dv, *captured, *index_error,{rope_tables} *grad_pointers,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *captured_strides,
            *grad_strides, H, N, M, **meta, num_warps=BWD_NUM_WARPS, num_stages=BWD_NUM_STAGES,
        )
        _attn_bwd_dq[rows](
            q, k, v, do, lse, delta, dq, *captured, *index_error,{rope_tables}
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *captured_strides,
            H, N, M, **meta, num_warps=BWD_NUM_WARPS, num_stages=BWD_NUM_STAGES,
        )
        return (dq, dk, dv) + tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, captured))'''


def _check_graph(graph: Graph):
    """The region, its lse_of, and the output; BackendError for any other graph."""
    return single_region(graph, "triton")


def generate(graph: Graph) -> GeneratedSource:
    """Python source defining ``attention(q, k, v, *captured) -> (o, lse)`` with Triton kernels."""
    region, lse = _check_graph(graph)
    ir_names = value_names(graph)
    ir_line = format_node(region, ir_names)
    captured_names = CapturedNames(n.op.label for n in graph.captured)
    writer = RegionWriter(region, ir_line, captured_names)
    captured = [captured_names[n.op.label] for n in graph.captured]
    kernels = writer.source()
    decoding = writer.decode_source() if region.op.decode is not None else None
    helpers = ["_dot", "_round", *sorted(writer.printer.helpers | writer.helpers)]

    w = SourceWriter()
    w.line(f'"""Attention generated by attncc {attncc.__version__} (backend: triton).')
    w.line()
    w.line(
        "Inputs: q [B, H, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] (fp16, bf16 or fp32, any strides)"
        + (f", captured tensors {captured_names.described()}." if captured else ".")
    )
    w.line("Returns (o [B, H, N, Dv] in q's dtype, lse [B, H, N] in float32, natural log).")
    w.line("Fused kernels in the style of Triton's fused-attention tutorial, accumulating in float32: the")
    w.line("forward with an online softmax over KV tiles, and FlashAttention-2's backward. CUDA tensors run")
    w.line("the compiled kernels; CPU tensors run the same kernels in Triton's interpreter. From this IR:")
    w.line()
    for row in print_graph(graph).splitlines():
        w.line("    " + row)
    w.line('"""')
    w.line()
    for row in IMPORTS.splitlines():
        w.line(row)
    w.line()
    w.line(f"# {ir_line}", ir=ir_line)
    for row in writer.constants().splitlines():
        w.line(row, ir=ir_line)
    for helper in helpers:
        w.line()
        w.line()
        for row in HELPERS[helper].splitlines():
            w.line(row)
    w.line()
    w.line()
    w.line(f"# {ir_line}", ir=ir_line)
    for row in kernels.splitlines():
        w.line(row, ir=ir_line)
    if decoding is not None:
        w.line()
        w.line()
        for row in decoding[0].splitlines():
            w.line(row, ir=ir_line)
    w.line()
    w.line()
    for row in HOST.splitlines():
        w.line(row)
    if region.op.rope is not None:
        w.line()
        w.line()
        for row in writer.rope_tables().splitlines():
            w.line(row, ir=ir_line)
    w.line()
    w.line()
    for row in writer.autograd_function().splitlines():
        w.line(row, ir=ir_line)
    w.line()
    w.line()
    region_captured = [captured_names[label] for label in writer.captured]
    region_args = ", ".join(["q", "k", "v", *region_captured])
    if decoding is not None:
        for row in decoding[1].splitlines():
            w.line(row, ir=ir_line)
        w.line()
        w.line()
    w.line(f"def attention({', '.join(['q', 'k', 'v', *captured])}):")
    w.line(f'    """o and lse of {ir_names[region]} = flash_attention(...) and {ir_names[lse]} = lse_of(...)."""')
    if decoding is not None:
        w.line("    if FlashAttentionDecode.applies(q.shape[2]):", ir=ir_line)
        w.line(f"        return FlashAttentionDecodeStep.apply({region_args})", ir=ir_line)
    w.line(f"    return FlashAttention.apply({region_args})", ir=ir_line)
    if decoding is not None:
        w.line()
        w.line()
        w.line(f"def decode({', '.join(['q', 'k', 'v', 'kv_lengths', 'page_table', *captured])}):")
        w.line('    """attention(q, k, v) of each sequence b over its first kv_lengths[b] keys (a KV cache); with')
        w.line('    page_table, k and v are pages [num_pages, page_size, Hkv, *] read in place through it."""')
        w.line(f"    FlashAttentionDecode.refuse_gradients(({', '.join(['q', 'k', 'v', *region_captured])},))")
        decode_args = ", ".join(["q", "k", "v", "kv_lengths", "page_table", *region_captured])
        w.line(f"    return FlashAttentionDecode.apply({decode_args})")
    source = w.text()
    captured_names.check(python_names(source))
    return GeneratedSource(source, "attention", w.line_map, name)
