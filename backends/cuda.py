"""The CUDA C++ backend: fused forward and backward attention kernels generated from the optimized IR.

The graph must be one ``flash_attention`` region (the ``cuda`` pipeline fuses it). The
generated CUDA source (``CUDA_SOURCE`` of the generated module, or the file ``attncc
compile --backend cuda -o attn.cu`` writes) holds:

- the region's score, mask, score derivative (``sympy.diff``) and sparsity bounds as
  scalar ``__device__`` functions, printed from sympy by ``CudaPrinter``;
- ``attention_forward<T>``: one query tile of one head per block, each warp owning 16
  query rows; an online softmax in registers with exp2 over KV tiles that ``cp.async``
  copies into double-buffered shared memory; ``mma.sync`` m16n8k16 tensor-core products
  for fp16 and bf16, plain float32 products for fp32;
- ``attention_backward_dkdv<T>`` / ``attention_backward_dq<T>`` (FlashAttention-2) and
  ``attention_backward_delta<T>``;
- ``extern "C"`` kernels per dtype and ``extern "C"`` host launch functions (the C ABI of
  ``CUDA_HEADER``), compiled where a host compiler sees them.

Device-only code (PTX, intrinsics, the launch syntax) sits in the device prelude; compiled
with ``-DATTNCC_EMULATION`` the source includes ``include/attncc_emulation.h`` instead,
which runs the same kernels on host threads (see ``docs/cuda.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from string import Template

import numpy
import sympy
from sympy.codegen.ast import float32, real
from sympy.printing.c import C99CodePrinter

import attncc
from attncc.backends.source import (
    CapturedNames,
    ExpressionDispatch,
    GeneratedSource,
    SourceWriter,
    fold_numbers,
    score_derivative,
    single_region,
)
from attncc.errors import BackendError
from attncc.ir.expr import b, h, is_boolean
from attncc.ir.graph import Graph
from attncc.ir.printer import format_node, print_graph, value_names
from attncc.ir.schedule import q_first, q_last
from attncc.ir.types import M, N

name = "cuda"
devices = ("cuda", "cpu")  # cpu: the same source compiled against the host emulation header

LN2 = math.log(2)
LOG2_E = 1 / math.log(2)
WARP_ROWS = 16  # rows of one warp's MMA tiles (m16n8k16)
DTYPES = {"f16": "__half", "bf16": "__nv_bfloat16", "f32": "float"}  # kernel suffix -> element type
DTYPE_CODES = {"f16": 0, "bf16": 1, "f32": 2}  # the C ABI's dtype argument
ELEMENT_BYTES = {"f16": 2, "bf16": 2, "f32": 4}
CAPTURED_TYPES = {"f16": "__half", "bf16": "__nv_bfloat16", "f32": "float", "f64": "double", "u8": "uint8_t",
                  "i8": "int8_t", "i16": "int16_t", "i32": "int32_t", "i64": "int64_t", "bool": "bool"}  # fmt: skip
# The scalars a query tile's KV bounds may read (besides captured tensors indexed by them).
BOUND_SYMBOLS = {q_first, q_last, N, M, b, h}


def padded(size: int) -> int:
    """A head dimension rounded up to a multiple of 16, the k of one MMA."""
    return -(-size // WARP_ROWS) * WARP_ROWS


def comment(text: str) -> str:
    """Text safe inside a // comment: no backslash (a line splice) and printable characters only."""
    return "".join(c if c.isprintable() and c != "\\" else "?" for c in text)


def _float_literal(value) -> str:
    value = float(value)
    if math.isnan(value):
        return "NAN"
    if math.isinf(value):
        return "INFINITY" if value > 0 else "(-INFINITY)"
    return f"{value!r}f" if "e" in repr(value) or "." in repr(value) else f"{value!r}.0f"


class CudaPrinter(ExpressionDispatch, C99CodePrinter):
    """Prints IR expressions as scalar C++ (float32 arithmetic, ``long long`` integers).

    Integer ``//`` and ``%`` keep Python's flooring semantics (C truncates toward zero)
    through ``floor_div`` and ``floor_mod``; captured-tensor loads reach the printer
    hoisted into symbols (``ScalarExpressions``).
    """

    def __init__(self):
        super().__init__({"type_aliases": {real: float32}})

    def _print(self, expr, **kwargs):
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.is_Integer:
            return _float_literal(expr)
        return super()._print(expr, **kwargs)

    def _print_Integer(self, expr):
        return f"{int(expr)}LL" if abs(int(expr)) >= 2**31 else str(int(expr))

    def _float(self, expr) -> str:
        if expr.is_integer:
            return f"(float)({self._print(expr)})"
        return self._print(expr)

    def _print_Symbol(self, expr):
        return expr.name

    def _print_Indexed(self, expr):
        raise AssertionError(f"captured-tensor loads are hoisted before printing, found {expr}")

    def _print_FloorDiv(self, expr):
        a, c = expr.args
        if not (a.is_integer and c.is_integer):
            return f"floorf(({self._float(a)}) / ({self._float(c)}))"
        if a.is_nonnegative and c.is_positive:  # truncation is flooring here
            return f"((long long)({self._print(a)}) / ({self._print(c)}))"
        return f"floor_div({self._print(a)}, {self._print(c)})"

    def _print_Mod(self, expr):
        a, c = expr.args
        if not (a.is_integer and c.is_integer):
            x, y = f"({self._float(a)})", f"({self._float(c)})"
            return f"({x} - {y} * floorf({x} / {y}))"
        if a.is_nonnegative and c.is_positive:
            return f"((long long)({self._print(a)}) % ({self._print(c)}))"
        return f"floor_mod({self._print(a)}, {self._print(c)})"

    def _print_Pow(self, expr, rational=False):
        base, exponent = expr.args
        if exponent == sympy.Rational(1, 2):
            return f"sqrtf({self._float(base)})"
        if exponent == -sympy.Rational(1, 2):
            return f"(1.0f / sqrtf({self._float(base)}))"
        if exponent == -1:
            return f"(1.0f / ({self._float(base)}))"
        if exponent.is_Integer and exponent != 0:
            factors = " * ".join([f"({self._float(base)})"] * abs(int(exponent)))
            return f"({factors})" if exponent > 0 else f"(1.0f / ({factors}))"
        if base == 2:
            return f"exp2f({self._float(exponent)})"
        if base.is_number and base.is_positive:
            return f"exp2f({_float_literal(sympy.log(base, 2))} * ({self._float(exponent)}))"
        return f"exp2f(({self._float(exponent)}) * log2f({self._float(base)}))"

    def _print_exp(self, expr):
        return f"expf({self._float(expr.args[0])})"

    def _print_log(self, expr):
        return f"logf({self._float(expr.args[0])})"

    def _print_tanh(self, expr):
        return f"tanhf({self._float(expr.args[0])})"

    def _print_Abs(self, expr):
        (arg,) = expr.args
        if arg.is_integer:
            return f"absolute((long long)({self._print(arg)}))"
        return f"fabsf({self._float(arg)})"

    def _rounding(self, expr, fn: str):
        (arg,) = expr.args
        if arg.is_integer:
            return self._print(arg)
        return f"(long long)({fn}f({self._float(arg)}))"

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"(({x}) > 0 ? 1.0f : (({x}) < 0 ? -1.0f : 0.0f))"

    def _elementwise(self, name: str, args):
        """libm's float functions (``sinf``, ``expm1f``, ...); round is ``rintf`` (half to even)."""
        if name == "sign":
            return self._print_sign(sympy.sign(args[0]))
        if name == "fmod" and all(arg.is_integer for arg in args):
            a, c = (f"(long long)({self._print(arg)})" for arg in args)
            return f"({a} % {c})"  # C's integer % truncates toward zero, as fmod does
        function = "rintf" if name == "round" else f"{name}f"
        return f"{function}({', '.join(self._float(arg) for arg in args)})"

    def _print_Heaviside(self, expr):
        x = self._print(expr.args[0])
        at_zero = _float_literal(expr.args[1]) if len(expr.args) > 1 else "0.5f"
        return f"(({x}) > 0 ? 1.0f : (({x}) < 0 ? 0.0f : {at_zero}))"

    def _min_max(self, expr, fn: str):
        if all(arg.is_integer for arg in expr.args):
            function = f"integer_{fn}"
            args = [f"(long long)({self._print(a)})" for a in expr.args]
        else:
            function = f"f{fn[:3]}f"
            args = [self._float(a) for a in expr.args]
        result = args[-1]
        for arg in reversed(args[:-1]):
            result = f"{function}({arg}, {result})"
        return result

    def _print_Piecewise(self, expr):
        *pieces, (otherwise, last_condition) = expr.args
        if last_condition is not sympy.true:
            raise BackendError(f"a Piecewise without a default branch cannot be printed: {expr}")
        result = self._branch(otherwise, expr)
        for value, condition in reversed(pieces):
            result = f"({self._print(condition)} ? {self._branch(value, expr)} : {result})"
        return result

    def _branch(self, value, whole) -> str:
        """One branch of a conditional, as a float unless the whole is an integer or a predicate."""
        if whole.is_integer or is_boolean(value):
            return self._print(value)
        return self._float(value)

    def _print_ITE(self, expr):
        condition, a, c = expr.args
        return f"({self._print(condition)} ? {self._print(a)} : {self._print(c)})"

    def _logical(self, expr, symbol: str):
        operator = {"&": " && ", "|": " || ", "^": " != "}[symbol]
        return "(" + operator.join(f"(bool)({self._print(a)})" for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(!{self._print(expr.args[0])})"

    def _print_BooleanTrue(self, expr):
        return "true"

    def _print_BooleanFalse(self, expr):
        return "false"

    def _print_Infinity(self, expr):
        return "INFINITY"

    def _print_NegativeInfinity(self, expr):
        return "(-INFINITY)"

    def _print_Derivative(self, expr):
        raise BackendError(f"the cuda backend cannot differentiate {expr.expr}; use backend='pytorch'")


def _like(symbol_name: str, expr) -> sympy.Symbol:
    """A symbol standing for ``expr``, with the assumptions the printer reads that hold for it."""
    if is_boolean(expr):
        return sympy.Symbol(symbol_name)
    facts = {fact: True for fact in ("integer", "nonnegative", "positive", "real") if getattr(expr, f"is_{fact}")}
    return sympy.Symbol(symbol_name, **facts)


def _c_type(expr) -> str:
    if is_boolean(expr):
        return "bool"
    return "long long" if expr.is_integer else "float"


@dataclass(frozen=True)
class CapturedTensor:
    """A captured tensor as the kernels see it: ``name`` is its identifier by the shared rule
    (``CapturedNames``: ``cap<position>_<ascii hint>``), never the user's label itself."""

    name: str
    label: str
    rank: int
    dtype: str

    @property
    def element(self) -> str:
        return CAPTURED_TYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in ("f16", "bf16", "f32", "f64")


class ScalarExpressions:
    """Writes IR expressions as statements of one scalar ``__device__`` function.

    Captured-tensor loads come first, innermost first (``offsets[doc[kv_idx]]`` loads
    ``doc`` then ``offsets``), as ``const`` locals; then common subexpressions; then the value.
    """

    def __init__(self, printer: CudaPrinter, captured: dict[str, CapturedTensor]):
        self.printer = printer
        self.captured = captured
        self.temporaries = sympy.numbered_symbols("tmp")
        self.loads: dict = {}

    def lines(self, expr, target: str) -> list[str]:
        """Statements ending in ``return expr`` (``target`` == "return") or ``target = expr``."""
        lines: list[str] = []
        expr = self._hoist_loads(fold_numbers(expr), lines)
        replacements, (reduced,) = sympy.cse([expr], symbols=self.temporaries)
        renamed = {}
        for symbol, value in replacements:
            value = value.xreplace(renamed)
            renamed[symbol] = _like(symbol.name, value)
            lines.append(f"const {_c_type(value)} {renamed[symbol]} = {self.printer.doprint(value)};")
        value = self.printer.doprint(reduced.xreplace(renamed))
        lines.append(f"return {value};" if target == "return" else f"{target} = {value};")
        return lines

    def _hoist_loads(self, expr, lines: list):
        if isinstance(expr, sympy.Indexed):
            indices = tuple(self._hoist_loads(i, lines) for i in expr.indices)
            key = (str(expr.base.label), indices)
            if key not in self.loads:
                self.loads[key] = self._load(key[0], indices, expr, lines)
            return self.loads[key]
        if not expr.args or isinstance(expr, sympy.Symbol):
            return expr
        return expr.func(*(self._hoist_loads(a, lines) for a in expr.args))

    def _load(self, label: str, indices: tuple, element, lines: list) -> sympy.Symbol:
        tensor = self.captured[label]
        if len(indices) != tensor.rank:
            raise BackendError(
                f"captured tensor {tensor.name} has {tensor.rank} dims but is indexed with {len(indices)}"
            )
        terms = [
            f"(long long)({self.printer.doprint(index)}) * cap.{tensor.name}_stride[{dim}]"
            for dim, index in enumerate(indices)
            if index != 0
        ]
        offset = " + ".join(terms) if terms else "0"
        symbol = _like(f"{tensor.name}_{len(self.loads)}", element)
        value = f"cap.{tensor.name}[{offset}]"
        if tensor.is_float:
            lines.append(f"const float {symbol} = to_float({value});")
        else:
            lines.append(f"const long long {symbol} = (long long)({value});")
        return symbol


def _scalar_bound(expr) -> bool:
    """Whether a schedule bound reads only what a kernel has for its query tile (and captured tensors at those)."""
    if isinstance(expr, sympy.Indexed):
        return all(_scalar_bound(index) for index in expr.indices)
    if isinstance(expr, sympy.Symbol):
        return expr in BOUND_SYMBOLS
    return all(_scalar_bound(arg) for arg in expr.args)


@dataclass(frozen=True)
class SharedLayout:
    """Byte offsets of one kernel's shared-memory tiles for one dtype; ``bytes`` is the total."""

    offsets: dict[str, int]
    bytes: int


class RegionWriter:
    """Generates the CUDA source of one flash_attention region."""

    def __init__(self, node, ir_line: str, captured: list[CapturedTensor]):
        op = node.op
        self.op = op
        self.ir_line = ir_line
        if op.block_m == 0 or op.block_n == 0 or op.num_warps == 0:
            raise BackendError(
                f"the cuda backend needs tile sizes on the region; run tile{{target=cuda}} first: {ir_line}"
            )
        if op.block_m != WARP_ROWS * op.num_warps:
            raise BackendError(
                f"tile block_m={op.block_m} is invalid for cuda with num_warps={op.num_warps}: each warp computes "
                f"{WARP_ROWS} query rows, so block_m = {WARP_ROWS} * num_warps ({WARP_ROWS * op.num_warps}) is allowed"
            )
        backward_tiles = {
            f"bwd_{f}": getattr(op, f"bwd_{f}") for f in ("block_m", "block_n", "num_warps", "num_stages")
        }
        chosen = ", ".join(f"{key}={value}" for key, value in backward_tiles.items() if value)
        if chosen:
            raise BackendError(
                f"tile options {chosen} are invalid for cuda: its backward kernels use the forward's tiles "
                "(block_m, block_n, num_warps), so only 0 (the default) is allowed"
            )
        if op.block_n % WARP_ROWS or op.block_n <= 0:
            raise BackendError(f"tile block_n={op.block_n} is invalid for cuda: a positive multiple of 16 is allowed")
        q, _, v = (operand.type for operand in node.inputs[:3])
        self.head_dim, self.head_dim_v = int(q.shape[3]), int(v.shape[3])
        self.captured = captured
        self.by_label = {tensor.label: tensor for tensor in captured}
        self.printer = CudaPrinter()

    # -- shared memory
    def layouts(self, dtype: str) -> dict[str, SharedLayout]:
        """Each kernel's shared tiles for ``dtype``: rows padded by 16 bytes against bank conflicts."""
        size = ELEMENT_BYTES[dtype]
        pad = 16 // size
        ld_q, ld_v = padded(self.head_dim) + pad, padded(self.head_dim_v) + pad
        block_m, block_n, warps = self.op.block_m, self.op.block_n, self.op.num_warps
        scratch = warps * WARP_ROWS * block_n * 4 if dtype == "f32" else 0  # fp32 products stage P and dS here

        # with RoPE, the backward kernels stage dQ / dK (float32) over their dead tiles after the loop to turn them back
        staging = block_m * padded(self.head_dim) * 4 if self.op.rope is not None else 0

        def layout(*tiles: tuple[str, int], least: int = staging) -> SharedLayout:
            offsets, total = {}, 0
            for tile, nbytes in (*tiles, ("scratch", scratch)):
                offsets[tile] = total
                total += -(-nbytes // 16) * 16
            return SharedLayout(offsets, max(total, least))

        return {
            "forward": layout(("q", block_m * ld_q * size), ("k", 2 * block_n * ld_q * size),
                              ("v", 2 * block_n * ld_v * size), least=0),
            "dq": layout(("q", block_m * ld_q * size), ("do", block_m * ld_v * size), ("k", 2 * block_n * ld_q * size),
                         ("v", 2 * block_n * ld_v * size)),
            "dkdv": layout(("k", block_m * ld_q * size), ("v", block_m * ld_v * size), ("q", 2 * block_n * ld_q * size),
                           ("do", 2 * block_n * ld_v * size), ("lse", 2 * block_n * 4), ("delta", 2 * block_n * 4)),
        }  # fmt: skip

    # -- scalar functions of the region
    def parameters(self) -> str:
        return "int b, int h, int q_idx, int kv_idx, int N, int M, const Captured& cap"

    def score_function(self) -> list[str]:
        writer = ScalarExpressions(self.printer, self.by_label)
        lines = [
            f"// score = {comment(self.positional(self.op.score))}",
            f"__device__ __forceinline__ float score_of(float score, {self.parameters()}) {{",
        ]
        lines += ["    " + line for line in writer.lines(self.op.score, "return")]
        return [*lines, "}"]

    def mask_function(self) -> list[str]:
        writer = ScalarExpressions(self.printer, self.by_label)
        lines = [
            f"// mask = {comment(self.positional(self.op.mask))}",
            f"__device__ __forceinline__ bool visible({self.parameters()}) {{",
        ]
        lines += ["    " + line for line in writer.lines(self.op.mask, "return")]
        return [*lines, "}"]

    def score_grad_function(self) -> list[str]:
        derivative = score_derivative(self.op.score) * (LN2 if self.op.exp2 else 1)
        writer = ScalarExpressions(self.printer, self.by_label)
        units = " times ln(2): scores are in base-2 units" if self.op.exp2 else ""
        lines = [
            f"// d score / d (q . k){units}, by sympy.diff: {comment(self.positional(derivative))}",
            f"__device__ __forceinline__ float score_grad(float score, {self.parameters()}) {{",
        ]
        lines += ["    " + line for line in writer.lines(derivative, "return")]
        return [*lines, "}"]

    def usable_schedule(self):
        schedule = self.op.schedule
        if schedule is not None and not all(
            _scalar_bound(e) for e in schedule.expressions()[: 2 if schedule.table else 4]
        ):
            return None  # bounds over symbols the kernel lacks: mask every tile
        return schedule

    def bounds_function(self) -> list[str]:
        """``kv_bounds``: the keys the rows q_first .. q_last may see, and those all of them see."""
        lines = [
            "// The keys outside [kv_lo, kv_hi) are hidden from every row q_first .. q_last of a query tile;",
            "// those in [full_lo, full_hi) are visible to all of them.",
            "__device__ __forceinline__ void kv_bounds(int q_first, int q_last, int b, int h, int N, int M,",
            "                                          const Captured& cap, long long& kv_lo, long long& kv_hi,",
            "                                          long long& full_lo, long long& full_hi) {",
        ]
        schedule = self.usable_schedule()
        if schedule is None:
            if self.op.mask is sympy.true:
                body = ["// No mask: every key is visible.", "kv_lo = 0; kv_hi = M; full_lo = 0; full_hi = M;"]
            else:
                body = ["// No sparsity schedule: every key may be visible, none surely.",
                        "kv_lo = 0; kv_hi = M; full_lo = 0; full_hi = 0;"]  # fmt: skip
        else:
            body = [f"// The sparsity schedule: {comment(self.positional_schedule(schedule))}"]
            writer = ScalarExpressions(self.printer, self.by_label)
            names = ("kv_lo", "kv_hi", "full_lo", "full_hi")
            count = 2 if schedule.table else 4
            for target, expr in zip(names[:count], schedule.expressions()[:count]):
                body += writer.lines(expr, target)
            if schedule.table:
                body.append("full_lo = 0; full_hi = 0;  // a residual mask is evaluated on every tile")
        lines += ["    " + line for line in body]
        return [*lines, "}"]

    def rope_functions(self) -> list[str]:
        """``ROPE``, the per-column tables and the position of each query and key (0 without rope)."""
        rope = self.op.rope
        if rope is None:
            return [
                "// No RoPE: q and k are used as they are.",
                "constexpr bool ROPE = false;",
                "__device__ const float ROPE_FREQ[1] = {0.0f};",
                "__device__ const int ROPE_PAIR[1] = {0};",
                f"__device__ __forceinline__ long long q_position({self.parameters()}) {{ return 0; }}",
                f"__device__ __forceinline__ long long kv_position({self.parameters()}) {{ return 0; }}",
            ]
        freq, pair = rope.column_tables(self.head_dim)
        lines = [
            f"// RoPE {comment(str(rope))}: per column, the signed frequency (float32) and the partner column",
            "// (attncc.ir.rope.RoPE.column_tables); a turned row is x[d] cos(pos freq[d]) + x[pair[d]] sin(pos freq[d]).",
            "constexpr bool ROPE = true;",
            "__device__ const float ROPE_FREQ[HEAD_DIM] = {"
            + ", ".join(_float_literal(float(numpy.float32(f))) for f in freq)
            + "};",
            "__device__ const int ROPE_PAIR[HEAD_DIM] = {" + ", ".join(str(p) for p in pair) + "};",
        ]
        for role, expr in (("q", self.op.q_position), ("kv", self.op.kv_position)):
            writer = ScalarExpressions(self.printer, self.by_label)
            lines += [
                f"// {role}_position = {comment(self.positional(expr))}",
                f"__device__ __forceinline__ long long {role}_position({self.parameters()}) {{",
                *("    " + line for line in writer.lines(expr, "return")),
                "}",
            ]
        return lines

    def positional(self, expr) -> str:
        """An expression printed with captured tensors by their identifiers, for comments."""
        mapping = {
            base: sympy.IndexedBase(self.by_label[str(base.label)].name) for base in expr.atoms(sympy.IndexedBase)
        }
        return sympy.sstr(expr.xreplace(mapping))

    def positional_schedule(self, schedule) -> str:
        parts = [f"visit [{self.positional(schedule.kv_lo)}, {self.positional(schedule.kv_hi)})",
                 f"full [{self.positional(schedule.full_lo)}, {self.positional(schedule.full_hi)})"]  # fmt: skip
        if schedule.residual is not sympy.true:
            parts.append(f"residual {self.positional(schedule.residual)}")
        return ", ".join(parts)

    def captured_struct(self) -> list[str]:
        lines = ["// The captured tensors, by position (element pointer and strides in elements)."]
        for tensor in self.captured:
            lines.append(f"//   {tensor.name}: {tensor.element} [{tensor.rank} dims]  // {comment(tensor.label)}")
        lines.append("struct Captured {")
        for tensor in self.captured:
            lines.append(f"    const {tensor.element}* {tensor.name};")
            lines.append(f"    long long {tensor.name}_stride[{tensor.rank}];")
        if not self.captured:
            lines.append("    int none;  // this program captures no tensor")
        return [*lines, "};"]

    # -- kernels and launchers
    def constants(self) -> str:
        op = self.op
        return CONSTANTS.substitute(
            groups=op.groups, head_dim=self.head_dim, head_dim_p=padded(self.head_dim), head_dim_v=self.head_dim_v,
            head_dim_v_p=padded(self.head_dim_v), num_warps=op.num_warps, block_n=op.block_n,
            exp="exp2f" if op.exp2 else "expf", log="log2f" if op.exp2 else "logf",
            to_natural=repr(LN2) + "f" if op.exp2 else "1.0f", to_units=repr(LOG2_E) + "f" if op.exp2 else "1.0f",
        )  # fmt: skip

    def layout_structs(self) -> list[str]:
        lines = ["// Shared memory of each kernel, per dtype: byte offsets of its tiles, and the total."]
        lines.append("template <typename T> struct SharedLayout;")
        for dtype, element in DTYPES.items():
            lines.append(f"template <> struct SharedLayout<{element}> {{")
            for kernel, layout in self.layouts(dtype).items():
                fields = ", ".join(
                    f"{kernel.upper()}_{tile.upper()} = {offset}" for tile, offset in layout.offsets.items()
                )
                lines.append(f"    static constexpr int {fields};")
                lines.append(f"    static constexpr int {kernel.upper()}_BYTES = {layout.bytes};")
            lines.append("};")
        return lines

    def captured_kernel_params(self) -> str:
        params = []
        for tensor in self.captured:
            params.append(f"const {tensor.element}* {tensor.name}")
            params += [f"int {tensor.name}_stride_{d}" for d in range(tensor.rank)]
        return "".join(f", {p}" for p in params)

    def captured_init(self) -> str:
        fields = []
        for tensor in self.captured:
            strides = ", ".join(f"{tensor.name}_stride_{d}" for d in range(tensor.rank))
            fields += [tensor.name, f"{{{strides}}}"]
        return "{" + ", ".join(fields or ["0"]) + "}"

    def kernels(self) -> list[str]:
        """The extern "C" kernels, one per kernel and dtype, each calling its template."""
        lines = []
        captured = self.captured_kernel_params()
        init = self.captured_init()
        for suffix, element in DTYPES.items():
            for kernel in KERNELS:
                params = kernel.params.replace("T*", f"{element}*")
                lines += [
                    f'extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1) attncc_{kernel.name}_{suffix}(',
                    f"        {params}{captured if kernel.captured else ''},",
                    f"        {kernel.sizes}) {{",
                ]
                if kernel.captured:
                    lines.append(f"    const Captured cap = {init};")
                lines += [f"    {kernel.template}<{element}>({kernel.args});", "}", ""]
        return lines

    def captured_abi_params(self) -> str:
        return "".join(f", const void* {t.name}, const int64_t* {t.name}_strides" for t in self.captured)

    def captured_launch_args(self) -> str:
        args = []
        for tensor in self.captured:
            args.append(f"static_cast<const {tensor.element}*>({tensor.name})")
            args += [f"(int){tensor.name}_strides[{d}]" for d in range(tensor.rank)]
        return "".join(f", {a}" for a in args)

    def stride_checks(self, names: list[str]) -> str:
        arrays = [f"{n}_strides" for n in names] + [f"{t.name}_strides" for t in self.captured]
        ranks = [4] * len(names) + [t.rank for t in self.captured]
        checks = [f"!strides_fit({array}, {rank})" for array, rank in zip(arrays, ranks)]
        return " || ".join(checks)

    def launchers(self) -> str:
        captured = self.captured_abi_params()
        launch = self.captured_launch_args()
        cases = {}
        for kernel in ("forward", "backward"):
            rows = []
            for suffix, element in DTYPES.items():
                body = LAUNCH_CASES[kernel].substitute(suffix=suffix, T=element, captured=launch)
                rows.append(f"    case {DTYPE_CODES[suffix]}: {{\n{body}\n    }}")
            cases[kernel] = "\n".join(rows)
        return LAUNCHERS.substitute(
            captured_params=captured,
            forward_cases=cases["forward"],
            backward_cases=cases["backward"],
            forward_checks=self.stride_checks(["q", "k", "v", "o"]),
            backward_checks=self.stride_checks(["q", "k", "v", "o", "do", "dq", "dk", "dv"]),
        )

    def header(self, guard: str) -> str:
        return ABI_HEADER.substitute(
            guard=guard, captured_params=self.captured_abi_params(),
            captured_doc="\n".join(
                f"//   {t.name}, {t.name}_strides: {t.element} [{t.rank} dims]" for t in self.captured
            ) or "//   (none)",
        )  # fmt: skip

    def source(self) -> list[str]:
        parts = [
            self.constants().splitlines(),
            self.layout_structs(),
            self.captured_struct(),
            COMMON.splitlines(),
            self.score_function(),
            self.mask_function(),
            self.score_grad_function(),
            self.bounds_function(),
            self.rope_functions(),
            KERNEL_BODIES.splitlines(),
            self.kernels(),
            self.launchers().splitlines(),
        ]
        lines: list[str] = []
        for part in parts:
            lines += [*part, ""]
        return lines


@dataclass(frozen=True)
class Kernel:
    """One extern "C" kernel: its template, parameters (``T*`` per dtype) and arguments."""

    name: str
    template: str
    params: str
    sizes: str
    args: str
    captured: bool = True


STRIDES = {t: ", ".join(f"int stride_{t}{a}" for a in "zhmk") for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}
STRIDE_ARGS = {t: ", ".join(f"stride_{t}{a}" for a in "zhmk") for t in STRIDES}
KERNELS = (
    Kernel("forward", "attention_forward",
           "const T* Q, const T* K, const T* V, T* O, float* LSE",
           "int H, int N, int M, " + ", ".join(STRIDES[t] for t in ("q", "k", "v", "o")),
           "Q, K, V, O, LSE, cap, H, N, M, " + ", ".join(STRIDE_ARGS[t] for t in ("q", "k", "v", "o"))),
    Kernel("backward_delta", "attention_backward_delta", "const T* O, const T* DO, const float* DLSE, float* DELTA",
           f"int H, int N, {STRIDES['o']}, {STRIDES['do']}",
           f"O, DO, DLSE, DELTA, H, N, {STRIDE_ARGS['o']}, {STRIDE_ARGS['do']}", captured=False),
    Kernel("backward_dkdv", "attention_backward_dkdv",
           "const T* Q, const T* K, const T* V, const T* DO, const float* LSE, const float* DELTA, T* DK, T* DV",
           "int H, int N, int M, " + ", ".join(STRIDES[t] for t in ("q", "k", "v", "do", "dk", "dv")),
           "Q, K, V, DO, LSE, DELTA, DK, DV, cap, H, N, M, "
           + ", ".join(STRIDE_ARGS[t] for t in ("q", "k", "v", "do", "dk", "dv"))),
    Kernel("backward_dq", "attention_backward_dq",
           "const T* Q, const T* K, const T* V, const T* DO, const float* LSE, const float* DELTA, T* DQ",
           "int H, int N, int M, " + ", ".join(STRIDES[t] for t in ("q", "k", "v", "do", "dq")),
           "Q, K, V, DO, LSE, DELTA, DQ, cap, H, N, M, "
           + ", ".join(STRIDE_ARGS[t] for t in ("q", "k", "v", "do", "dq"))),
)  # fmt: skip

CONSTANTS = Template("""\
// ---- this program's constants
constexpr int GROUPS = $groups;  // query heads per KV head: head h reads KV head h / GROUPS
constexpr int HEAD_DIM = $head_dim, HEAD_DIM_P = $head_dim_p;  // q and k head dim; padded to a multiple of 16
constexpr int HEAD_DIM_V = $head_dim_v, HEAD_DIM_V_P = $head_dim_v_p;  // v head dim; padded
constexpr int NUM_WARPS = $num_warps, NUM_THREADS = 32 * NUM_WARPS;
constexpr int BLOCK_M = 16 * NUM_WARPS;  // query rows of a forward / dQ block (16 per warp); keys of a dK/dV block
constexpr int BLOCK_N = $block_n;  // keys per KV tile (forward, dQ); query rows per tile of the dK/dV loop
constexpr float TO_NATURAL = $to_natural;  // scores are in base-2 units when the region uses exp2
constexpr float TO_UNITS = $to_units;
__device__ __forceinline__ float softmax_exp(float x) { return $exp(x); }
__device__ __forceinline__ float softmax_log(float x) { return $log(x); }""")

DEVICE_PRELUDE = """\
// ---- device prelude: the only code that differs from the host emulation (include/attncc_emulation.h)
#if defined(__CUDACC_RTC__)
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
#else
#include <cstdint>
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

__device__ __forceinline__ unsigned char* shared_memory() {
    extern __shared__ __align__(16) unsigned char attncc_shared[];
    return attncc_shared;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
__device__ __forceinline__ uint32_t bits_of(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// D = A B + C of one warp, m16n8k16, fp32 accumulators (sm_80 and later); the last argument picks the input type.
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
#if defined(__CUDA_ARCH__)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             __nv_bfloat16) {
#if defined(__CUDA_ARCH__)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// 16 bytes from global to shared memory, asynchronously (cp.async, sm_80 and later).
__device__ __forceinline__ void cp_async_16(void* shared, const void* global) {
#if defined(__CUDA_ARCH__)
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(address), "l"(global));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.commit_group;");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_one() {  // all but the most recent group have landed
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group 1;" ::: "memory");
#endif
}

#if !defined(__CUDACC_RTC__)
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 threads, size_t shared_bytes, cudaStream_t stream,
                   Args... args) {
    if (shared_bytes >= 48 * 1024) {
        const cudaError_t status =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
        if (status != cudaSuccess) return status;
    }
    kernel<<<grid, threads, shared_bytes, stream>>>(static_cast<Params>(args)...);
    return cudaGetLastError();
}
#endif"""


def integer_helpers(qualifier: str) -> str:
    """C++ for the integer functions CudaPrinter calls (Python's flooring ``//`` and ``%``, abs, min, max),
    each declared with ``qualifier`` (``__device__ __forceinline__`` in kernels, ``static inline`` on the host)."""
    return f"""\
{qualifier} long long floor_div(long long a, long long b) {{  // Python's //: rounds toward -inf
    const long long quotient = a / b;
    return (a % b != 0 && ((a % b < 0) != (b < 0))) ? quotient - 1 : quotient;
}}
{qualifier} long long floor_mod(long long a, long long b) {{  // Python's %: the sign of b
    const long long remainder = a % b;
    return (remainder != 0 && ((remainder < 0) != (b < 0))) ? remainder + b : remainder;
}}
{qualifier} long long absolute(long long a) {{ return a < 0 ? -a : a; }}
{qualifier} long long integer_minimum(long long a, long long b) {{ return a < b ? a : b; }}
{qualifier} long long integer_maximum(long long a, long long b) {{ return a > b ? a : b; }}
"""


COMMON = (
    """\
// ---- integer and tile helpers
"""
    + integer_helpers("__device__ __forceinline__")
    + """\
__device__ __forceinline__ int last_row(int first, int rows, int n) { return (first + rows < n ? first + rows : n) - 1; }

template <typename T> constexpr bool is_fp32 = false;
template <> constexpr bool is_fp32<float> = true;

// Row stride of a shared tile with COLS columns: 16 bytes of padding against bank conflicts.
template <typename T, int COLS> constexpr int padded_row = COLS + 16 / (int)sizeof(T);

__device__ __forceinline__ uint32_t pair_at(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <typename T> __device__ __forceinline__ uint32_t pack(T low, T high) {
    return bits_of(low) | (bits_of(high) << 16);
}

// A [ROWS x COLS_P] tile into shared memory (row stride padded_row), rows >= rows and columns >= cols as 0.
// 16-byte chunks go by cp.async where the source allows it (unit column stride, 16-byte aligned rows);
// others element by element.
template <typename T, int ROWS, int COLS_P>
__device__ __forceinline__ void load_tile(T* tile, const T* source, int rows, int cols, int row_stride,
                                          int col_stride) {
    constexpr int VEC = 16 / (int)sizeof(T), LD = padded_row<T, COLS_P>, CHUNKS = ROWS * COLS_P / VEC;
    const bool vector = col_stride == 1 && row_stride % VEC == 0 &&
                        reinterpret_cast<unsigned long long>(source) % 16 == 0;
    for (int chunk = threadIdx.x; chunk < CHUNKS; chunk += NUM_THREADS) {
        const int row = chunk / (COLS_P / VEC), col = chunk % (COLS_P / VEC) * VEC;
        T* target = tile + row * LD + col;
        if (vector && row < rows && col + VEC <= cols) {
            cp_async_16(target, source + (long long)row * row_stride + col);
        } else {
            for (int e = 0; e < VEC; ++e) {
                const bool inside = row < rows && col + e < cols;
                target[e] = inside ? source[(long long)row * row_stride + (long long)(col + e) * col_stride]
                                   : from_float<T>(0.0f);
            }
        }
    }
}

// ---- warp-level products; a warp's accumulators are 16 x 8 tiles in mma.m16n8k16's C layout:
// lane = 4 group + quad holds c[0], c[1] at row group, columns 2 quad, 2 quad + 1, and c[2], c[3] 8 rows below.

// C[16 x 8 NT] += A[16 x 16 KS] . B^T, A and B row-major in shared memory (B is [8 NT][16 KS]).
template <typename T, int KS, int NT>
__device__ __forceinline__ void warp_mma_nt(float (&c)[NT][4], const T* a, int lda, const T* b, int ldb) {
    const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
    if constexpr (is_fp32<T>) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const T* row = a + (group + 8 * (e / 2)) * lda;
                const T* col = b + (8 * j + 2 * quad + e % 2) * ldb;
                float sum = c[j][e];
#pragma unroll 8
                for (int k = 0; k < 16 * KS; ++k) sum = fmaf(row[k], col[k], sum);
                c[j][e] = sum;
            }
        }
    } else {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const T* top = a + group * lda + 16 * ks + 2 * quad;
            const uint32_t fa[4] = {pair_at(top), pair_at(top + 8 * lda), pair_at(top + 8), pair_at(top + 8 * lda + 8)};
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const T* column = b + (8 * j + group) * ldb + 16 * ks + 2 * quad;
                const uint32_t fb[2] = {pair_at(column), pair_at(column + 8)};
                mma_m16n8k16(c[j], fa, fb, T());
            }
        }
    }
}

// C[16 x 8 NT] += A[16 x 16 KS] . B: A in registers (2 KS accumulator tiles, rounded to T as FlashAttention
// does), B row-major [16 KS][8 NT] in shared memory. fp32 stages A in the warp's scratch [16][16 KS].
template <typename T, int KS, int NT>
__device__ __forceinline__ void warp_mma_rn(float (&c)[NT][4], const float (&a)[2 * KS][4], const T* b, int ldb,
                                            float* scratch) {
    const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
    if constexpr (is_fp32<T>) {
#pragma unroll
        for (int j = 0; j < 2 * KS; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) scratch[(group + 8 * (e / 2)) * (16 * KS) + 8 * j + 2 * quad + e % 2] = a[j][e];
        }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float* row = scratch + (group + 8 * (e / 2)) * (16 * KS);
                const T* col = b + 8 * j + 2 * quad + e % 2;
                float sum = c[j][e];
#pragma unroll 8
                for (int k = 0; k < 16 * KS; ++k) sum = fmaf(row[k], col[k * ldb], sum);
                c[j][e] = sum;
            }
        }
        __syncwarp();
    } else {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const uint32_t fa[4] = {
                pack(from_float<T>(a[2 * ks][0]), from_float<T>(a[2 * ks][1])),
                pack(from_float<T>(a[2 * ks][2]), from_float<T>(a[2 * ks][3])),
                pack(from_float<T>(a[2 * ks + 1][0]), from_float<T>(a[2 * ks + 1][1])),
                pack(from_float<T>(a[2 * ks + 1][2]), from_float<T>(a[2 * ks + 1][3])),
            };
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const T* column = b + (16 * ks + 2 * quad) * ldb + 8 * j + group;
                const uint32_t fb[2] = {pack(column[0], column[ldb]), pack(column[8 * ldb], column[9 * ldb])};
                mma_m16n8k16(c[j], fa, fb, T());
            }
        }
    }
}

// Sum over the 4 lanes of a group: the lanes that hold one row of a C tile.
__device__ __forceinline__ float group_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float group_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}"""
)

KERNEL_BODIES = """\
// The score of one element: -inf outside the sequences, and where the mask hides it in a masked tile.
__device__ __forceinline__ float element_score(float qk, int b, int h, int q_idx, int kv_idx, int N, int M,
                                               const Captured& cap, bool masked) {
    if (q_idx >= N || kv_idx >= M) return -INFINITY;
    if (masked && !visible(b, h, q_idx, kv_idx, N, M, cap)) return -INFINITY;
    return score_of(qk, b, h, q_idx, kv_idx, N, M, cap);
}

// The KV tiles (of TILE keys) of the rows q_first .. q_last: [lo, hi), full ones [full_lo, full_hi), with
// 0 <= lo <= full_lo <= full_hi <= hi <= M; lo and the full range on tile edges.
__device__ __forceinline__ void kv_tiles(int q_first, int q_last, int b, int h, int N, int M, const Captured& cap,
                                         int tile, int& lo, int& hi, int& full_lo, int& full_hi) {
    long long kv_lo, kv_hi, kv_full_lo, kv_full_hi;
    kv_bounds(q_first, q_last, b, h, N, M, cap, kv_lo, kv_hi, kv_full_lo, kv_full_hi);
    kv_lo = kv_lo < 0 ? 0 : (kv_lo > M ? M : kv_lo);
    lo = (int)(kv_lo / tile * tile);
    hi = (int)(kv_hi < M ? kv_hi : M);
    hi = hi > lo ? hi : lo;
    long long first_full = kv_full_lo > lo ? kv_full_lo : lo;
    first_full = (first_full + tile - 1) / tile * tile;
    full_lo = (int)(first_full < hi / tile * tile ? first_full : hi / tile * tile);
    long long last_full = kv_full_hi < hi ? kv_full_hi : hi;
    last_full = last_full > full_lo ? last_full : full_lo;
    full_hi = (int)(last_full / tile * tile);
}

// ---- RoPE: rows first_row + r < rows of a shared tile (row stride LD) turned in place, row r at position(first_row
// + r); the angle is float32, float(pos) * freq as the other backends compute it; sign -1 turns back (the transpose,
// for gradients). Each item turns one pair of columns; pass-through columns (freq 0) stay.
template <typename T, int ROWS, int LD, typename Position>
__device__ __forceinline__ void rope_tile(T* tile, int first_row, int rows, Position position, float sign) {
    for (int item = threadIdx.x; item < ROWS * HEAD_DIM; item += NUM_THREADS) {
        const int r = item / HEAD_DIM, d = item % HEAD_DIM, partner = ROPE_PAIR[d];
        if (partner <= d || first_row + r >= rows) continue;
        const float angle = (float)position(first_row + r) * (sign * ROPE_FREQ[d]);
        const float c = cosf(angle), s = sinf(angle);
        T* x = tile + r * LD;
        const float own = to_float(x[d]), other = to_float(x[partner]);
        x[d] = from_float<T>(own * c + other * s);  // the partner's frequency is -freq[d]
        x[partner] = from_float<T>(other * c - own * s);
    }
}

// dQ or dK of BLOCK_M rows (16 per warp, in registers in the C layout) turned back by RoPE and stored: staged as
// float32 over the block's shared memory (its tiles are done), turned, then written row by row.
template <typename T, typename Position>
__device__ __forceinline__ void store_turned_back(const float (&grad)[HEAD_DIM_P / 8][4], T* target, int first_row,
                                                  int rows, long long row_stride, long long col_stride,
                                                  Position position) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
    float* staged = reinterpret_cast<float*>(shared_memory());
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int j = 0; j < HEAD_DIM_P / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e)
                staged[(warp * 16 + group + 8 * r) * HEAD_DIM_P + 8 * j + 2 * quad + e] = grad[j][2 * r + e];
        }
    }
    __syncthreads();
    rope_tile<float, BLOCK_M, HEAD_DIM_P>(staged, first_row, rows, position, -1.0f);
    __syncthreads();
    for (int item = threadIdx.x; item < BLOCK_M * HEAD_DIM; item += NUM_THREADS) {
        const int r = item / HEAD_DIM, col = item % HEAD_DIM;
        if (first_row + r < rows)
            target[(first_row + r) * row_stride + col * col_stride] = from_float<T>(staged[r * HEAD_DIM_P + col]);
    }
}

// ---- forward: o and lse of one query tile (BLOCK_M rows, 16 per warp) of one head; LSE contiguous [B, H, N].
template <typename T>
__device__ void attention_forward(const T* Q, const T* K, const T* V, T* O, float* LSE, const Captured& cap,
                                  int H, int N, int M, int stride_qz, int stride_qh, int stride_qm, int stride_qk,
                                  int stride_kz, int stride_kh, int stride_km, int stride_kk,
                                  int stride_vz, int stride_vh, int stride_vm, int stride_vk,
                                  int stride_oz, int stride_oh, int stride_om, int stride_ok) {
    constexpr int LDQ = padded_row<T, HEAD_DIM_P>, LDV = padded_row<T, HEAD_DIM_V_P>;
    using Layout = SharedLayout<T>;
    unsigned char* shared = shared_memory();
    T* q_tile = reinterpret_cast<T*>(shared + Layout::FORWARD_Q);
    T* k_tiles = reinterpret_cast<T*>(shared + Layout::FORWARD_K);
    T* v_tiles = reinterpret_cast<T*>(shared + Layout::FORWARD_V);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
    float* scratch = reinterpret_cast<float*>(shared + Layout::FORWARD_SCRATCH) + warp * 16 * BLOCK_N;
    const int start_m = blockIdx.x * BLOCK_M;
    const int b = blockIdx.y / H, h = blockIdx.y % H, kv_h = h / GROUPS;  // GQA by head index
    const T* k_base = K + b * (long long)stride_kz + kv_h * (long long)stride_kh;
    const T* v_base = V + b * (long long)stride_vz + kv_h * (long long)stride_vh;
    auto q_at = [&](int row) { return q_position(b, h, row, 0, N, M, cap); };
    auto kv_at = [&](int key) { return kv_position(b, h, 0, key, N, M, cap); };
    // -- KV schedule: visit the tiles [lo, hi); those in [full_lo, full_hi) need no mask.
    int lo, hi, full_lo, full_hi;
    kv_tiles(start_m, last_row(start_m, BLOCK_M, N), b, h, N, M, cap, BLOCK_N, lo, hi, full_lo, full_hi);
    load_tile<T, BLOCK_M, HEAD_DIM_P>(q_tile, Q + b * (long long)stride_qz + h * (long long)stride_qh +
                                      start_m * (long long)stride_qm, N - start_m, HEAD_DIM, stride_qm, stride_qk);
    if (lo < hi) {
        load_tile<T, BLOCK_N, HEAD_DIM_P>(k_tiles, k_base + lo * (long long)stride_km, M - lo, HEAD_DIM, stride_km,
                                          stride_kk);
        load_tile<T, BLOCK_N, HEAD_DIM_V_P>(v_tiles, v_base + lo * (long long)stride_vm, M - lo, HEAD_DIM_V,
                                            stride_vm, stride_vk);
    }
    cp_async_commit();
    float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.0f, 0.0f};  // rows group and group + 8; l_i per lane
    float acc[HEAD_DIM_V_P / 8][4] = {};
    int buffer = 0;
    for (int start_n = lo; start_n < hi; start_n += BLOCK_N, buffer ^= 1) {
        const int next = start_n + BLOCK_N;
        if (next < hi) {  // prefetch the next tile into the other buffer while this one is computed
            load_tile<T, BLOCK_N, HEAD_DIM_P>(k_tiles + (buffer ^ 1) * BLOCK_N * LDQ,
                                              k_base + next * (long long)stride_km, M - next, HEAD_DIM, stride_km,
                                              stride_kk);
            load_tile<T, BLOCK_N, HEAD_DIM_V_P>(v_tiles + (buffer ^ 1) * BLOCK_N * LDV,
                                                v_base + next * (long long)stride_vm, M - next, HEAD_DIM_V,
                                                stride_vm, stride_vk);
        }
        cp_async_commit();
        cp_async_wait_one();
        __syncthreads();
        if constexpr (ROPE) {  // turn the q tile once, and each K tile as it arrives
            if (start_n == lo) rope_tile<T, BLOCK_M, LDQ>(q_tile, start_m, N, q_at, 1.0f);
            rope_tile<T, BLOCK_N, LDQ>(k_tiles + buffer * BLOCK_N * LDQ, start_n, M, kv_at, 1.0f);
            __syncthreads();
        }
        const T* k_tile = k_tiles + buffer * BLOCK_N * LDQ;
        const T* v_tile = v_tiles + buffer * BLOCK_N * LDV;
        float s[BLOCK_N / 8][4] = {};
        warp_mma_nt<T, HEAD_DIM_P / 16, BLOCK_N / 8>(s, q_tile + warp * 16 * LDQ, LDQ, k_tile, LDQ);
        const bool masked = start_n < full_lo || start_n >= full_hi;
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = start_m + warp * 16 + group + 8 * (e / 2), col = start_n + 8 * j + 2 * quad + e % 2;
                s[j][e] = element_score(s[j][e], b, h, row, col, N, M, cap, masked);
            }
        }
        // -- online softmax: rescale the running sum and the accumulator when the row max grows
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float row_max = m_i[r];
#pragma unroll
            for (int j = 0; j < BLOCK_N / 8; ++j) row_max = fmaxf(row_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
            row_max = group_max(row_max);
            const float m_safe = row_max == -INFINITY ? 0.0f : row_max;  // a row without a visible key so far
            const float alpha = softmax_exp(m_i[r] - m_safe);
            float row_sum = 0.0f;
#pragma unroll
            for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
                for (int e = 2 * r; e < 2 * r + 2; ++e) {
                    s[j][e] = softmax_exp(s[j][e] - m_safe);
                    row_sum += s[j][e];
                }
            }
            l_i[r] = l_i[r] * alpha + row_sum;
#pragma unroll
            for (int j = 0; j < HEAD_DIM_V_P / 8; ++j) {
                acc[j][2 * r] *= alpha;
                acc[j][2 * r + 1] *= alpha;
            }
            m_i[r] = row_max;
        }
        warp_mma_rn<T, BLOCK_N / 16, HEAD_DIM_V_P / 8>(acc, s, v_tile, LDV, scratch);
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
    cp_async_wait_all();
    // -- epilogue: o = acc / l, lse = m + log l; a row that saw no key keeps o = 0 and gets lse = -inf
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = start_m + warp * 16 + group + 8 * r;
        const float l = group_sum(l_i[r]);
        const float l_safe = l > 0.0f ? l : 1.0f;
        if (row >= N) continue;
        if (quad == 0) LSE[((long long)b * H + h) * N + row] = l > 0.0f ? (m_i[r] + softmax_log(l)) * TO_NATURAL : -INFINITY;
        T* o_row = O + b * (long long)stride_oz + h * (long long)stride_oh + row * (long long)stride_om;
#pragma unroll
        for (int j = 0; j < HEAD_DIM_V_P / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 8 * j + 2 * quad + e;
                if (col < HEAD_DIM_V) o_row[col * (long long)stride_ok] = from_float<T>(acc[j][2 * r + e] / l_safe);
            }
        }
    }
}

// ---- backward (FlashAttention-2): delta = rowsum(o * do) - dlse, the row term of dS = P (dP - delta).
template <typename T>
__device__ void attention_backward_delta(const T* O, const T* DO, const float* DLSE, float* DELTA, int H, int N,
                                         int stride_oz, int stride_oh, int stride_om, int stride_ok,
                                         int stride_doz, int stride_doh, int stride_dom, int stride_dok) {
    const int row = blockIdx.x * NUM_THREADS + threadIdx.x;
    const int b = blockIdx.y / H, h = blockIdx.y % H;
    if (row >= N) return;
    const T* o = O + b * (long long)stride_oz + h * (long long)stride_oh + row * (long long)stride_om;
    const T* d_o = DO + b * (long long)stride_doz + h * (long long)stride_doh + row * (long long)stride_dom;
    float sum = 0.0f;
    for (int d = 0; d < HEAD_DIM_V; ++d) sum += to_float(o[d * (long long)stride_ok]) * to_float(d_o[d * (long long)stride_dok]);
    const long long index = ((long long)b * H + h) * N + row;
    DELTA[index] = sum - DLSE[index];
}

// The probabilities and dS of one element, from its q . k and dP (the softmax's row terms in base units).
__device__ __forceinline__ void probability_and_ds(float& qk_then_p, float& dp_then_ds, float lse, float delta,
                                                   int b, int h, int q_idx, int kv_idx, int N, int M,
                                                   const Captured& cap, bool masked) {
    const float qk = qk_then_p;
    const float p = softmax_exp(element_score(qk, b, h, q_idx, kv_idx, N, M, cap, masked) - lse);
    const float ds = p * (dp_then_ds - delta);
    qk_then_p = p;
    dp_then_ds = p == 0.0f ? 0.0f : ds * score_grad(qk, b, h, q_idx, kv_idx, N, M, cap);  // hidden: nothing
}

// lse in the softmax's units; a row without a visible key (lse = -inf) gets +inf, so its p = 0.
__device__ __forceinline__ float lse_units(float lse) { return lse == -INFINITY ? INFINITY : lse * TO_UNITS; }

// dK and dV of one KV tile (BLOCK_M keys, 16 per warp) of one KV head, summed over its GROUPS query heads,
// over the query tiles (BLOCK_N rows) whose KV schedule includes it.
template <typename T>
__device__ void attention_backward_dkdv(const T* Q, const T* K, const T* V, const T* DO, const float* LSE,
                                        const float* DELTA, T* DK, T* DV, const Captured& cap, int H, int N, int M,
                                        int stride_qz, int stride_qh, int stride_qm, int stride_qk,
                                        int stride_kz, int stride_kh, int stride_km, int stride_kk,
                                        int stride_vz, int stride_vh, int stride_vm, int stride_vk,
                                        int stride_doz, int stride_doh, int stride_dom, int stride_dok,
                                        int stride_dkz, int stride_dkh, int stride_dkm, int stride_dkk,
                                        int stride_dvz, int stride_dvh, int stride_dvm, int stride_dvk) {
    constexpr int LDQ = padded_row<T, HEAD_DIM_P>, LDV = padded_row<T, HEAD_DIM_V_P>;
    using Layout = SharedLayout<T>;
    unsigned char* shared = shared_memory();
    T* k_tile = reinterpret_cast<T*>(shared + Layout::DKDV_K);
    T* v_tile = reinterpret_cast<T*>(shared + Layout::DKDV_V);
    T* q_tiles = reinterpret_cast<T*>(shared + Layout::DKDV_Q);
    T* do_tiles = reinterpret_cast<T*>(shared + Layout::DKDV_DO);
    float* lse_tiles = reinterpret_cast<float*>(shared + Layout::DKDV_LSE);
    float* delta_tiles = reinterpret_cast<float*>(shared + Layout::DKDV_DELTA);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
    float* scratch = reinterpret_cast<float*>(shared + Layout::DKDV_SCRATCH) + warp * 16 * BLOCK_N;
    const int kv_heads = H / GROUPS;
    const int start_n = blockIdx.x * BLOCK_M;
    const int b = blockIdx.y / kv_heads, kv_h = blockIdx.y % kv_heads;
    load_tile<T, BLOCK_M, HEAD_DIM_P>(k_tile, K + b * (long long)stride_kz + kv_h * (long long)stride_kh +
                                      start_n * (long long)stride_km, M - start_n, HEAD_DIM, stride_km, stride_kk);
    load_tile<T, BLOCK_M, HEAD_DIM_V_P>(v_tile, V + b * (long long)stride_vz + kv_h * (long long)stride_vh +
                                        start_n * (long long)stride_vm, M - start_n, HEAD_DIM_V, stride_vm,
                                        stride_vk);
    // The (query head, query tile) pairs in order; a pair is visited when its KV tiles include this one.
    const int q_tiles_per_head = (N + BLOCK_N - 1) / BLOCK_N, pairs = GROUPS * q_tiles_per_head;
    constexpr int SKIPPED = 0, PARTIAL = 1, FULL = 2;  // how a pair's KV schedule includes this tile
    auto visit = [&](int pair) {
        const int h = kv_h * GROUPS + pair / q_tiles_per_head, q_first = pair % q_tiles_per_head * BLOCK_N;
        int lo, hi, full_lo, full_hi;
        kv_tiles(q_first, last_row(q_first, BLOCK_N, N), b, h, N, M, cap, BLOCK_M, lo, hi, full_lo, full_hi);
        if (start_n < lo || start_n >= hi) return SKIPPED;
        return full_lo <= start_n && start_n < full_hi ? FULL : PARTIAL;
    };
    auto next_pair = [&](int pair) {
        while (pair < pairs && visit(pair) == SKIPPED) ++pair;
        return pair;
    };
    auto load_pair = [&](int pair, int buffer) {
        const int h = kv_h * GROUPS + pair / q_tiles_per_head, q_first = pair % q_tiles_per_head * BLOCK_N;
        load_tile<T, BLOCK_N, HEAD_DIM_P>(q_tiles + buffer * BLOCK_N * LDQ, Q + b * (long long)stride_qz +
                                          h * (long long)stride_qh + q_first * (long long)stride_qm, N - q_first,
                                          HEAD_DIM, stride_qm, stride_qk);
        load_tile<T, BLOCK_N, HEAD_DIM_V_P>(do_tiles + buffer * BLOCK_N * LDV, DO + b * (long long)stride_doz +
                                            h * (long long)stride_doh + q_first * (long long)stride_dom,
                                            N - q_first, HEAD_DIM_V, stride_dom, stride_dok);
        for (int i = threadIdx.x; i < BLOCK_N; i += NUM_THREADS) {
            const long long row = ((long long)b * H + h) * N + q_first + i;
            const bool inside = q_first + i < N;
            lse_tiles[buffer * BLOCK_N + i] = inside ? lse_units(LSE[row]) : INFINITY;
            delta_tiles[buffer * BLOCK_N + i] = inside ? DELTA[row] : 0.0f;
        }
    };
    float dk[HEAD_DIM_P / 8][4] = {}, dv[HEAD_DIM_V_P / 8][4] = {};
    auto kv_at = [&](int key) { return kv_position(b, kv_h * GROUPS, 0, key, N, M, cap); };
    bool k_turned = false;
    int pair = next_pair(0), buffer = 0;
    if (pair < pairs) load_pair(pair, 0);
    cp_async_commit();
    for (; pair < pairs; buffer ^= 1) {
        const int following = next_pair(pair + 1);
        if (following < pairs) load_pair(following, buffer ^ 1);
        cp_async_commit();
        cp_async_wait_one();
        __syncthreads();
        const bool full = visit(pair) == FULL;
        const int h = kv_h * GROUPS + pair / q_tiles_per_head, q_first = pair % q_tiles_per_head * BLOCK_N;
        if constexpr (ROPE) {  // turn the K tile once, and each q tile as it arrives
            if (!k_turned) rope_tile<T, BLOCK_M, LDQ>(k_tile, start_n, M, kv_at, 1.0f);
            k_turned = true;
            auto q_at = [&](int row) { return q_position(b, h, row, 0, N, M, cap); };
            rope_tile<T, BLOCK_N, LDQ>(q_tiles + buffer * BLOCK_N * LDQ, q_first, N, q_at, 1.0f);
            __syncthreads();
        }
        const T* q_tile = q_tiles + buffer * BLOCK_N * LDQ;
        const T* do_tile = do_tiles + buffer * BLOCK_N * LDV;
        const float* lse = lse_tiles + buffer * BLOCK_N;
        const float* delta = delta_tiles + buffer * BLOCK_N;
        float s[BLOCK_N / 8][4] = {}, dp[BLOCK_N / 8][4] = {};  // transposed: rows are keys, columns queries
        warp_mma_nt<T, HEAD_DIM_P / 16, BLOCK_N / 8>(s, k_tile + warp * 16 * LDQ, LDQ, q_tile, LDQ);
        warp_mma_nt<T, HEAD_DIM_V_P / 16, BLOCK_N / 8>(dp, v_tile + warp * 16 * LDV, LDV, do_tile, LDV);
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = start_n + warp * 16 + group + 8 * (e / 2), column = 8 * j + 2 * quad + e % 2;
                probability_and_ds(s[j][e], dp[j][e], lse[column], delta[column], b, h, q_first + column, key, N, M,
                                   cap, !full);
            }
        }
        warp_mma_rn<T, BLOCK_N / 16, HEAD_DIM_V_P / 8>(dv, s, do_tile, LDV, scratch);  // dV += P^T dO
        warp_mma_rn<T, BLOCK_N / 16, HEAD_DIM_P / 8>(dk, dp, q_tile, LDQ, scratch);    // dK += dS^T Q
        __syncthreads();
        pair = following;
    }
    cp_async_wait_all();
    if constexpr (ROPE)  // dK of the turned keys, turned back
        store_turned_back<T>(dk, DK + b * (long long)stride_dkz + kv_h * (long long)stride_dkh, start_n, M,
                             stride_dkm, stride_dkk, kv_at);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = start_n + warp * 16 + group + 8 * r;
        if (key >= M) continue;
        T* dk_row = DK + b * (long long)stride_dkz + kv_h * (long long)stride_dkh + key * (long long)stride_dkm;
        T* dv_row = DV + b * (long long)stride_dvz + kv_h * (long long)stride_dvh + key * (long long)stride_dvm;
#pragma unroll
        for (int j = 0; j < HEAD_DIM_P / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 8 * j + 2 * quad + e;
                if (col < HEAD_DIM && !ROPE) dk_row[col * (long long)stride_dkk] = from_float<T>(dk[j][2 * r + e]);
            }
        }
#pragma unroll
        for (int j = 0; j < HEAD_DIM_V_P / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 8 * j + 2 * quad + e;
                if (col < HEAD_DIM_V) dv_row[col * (long long)stride_dvk] = from_float<T>(dv[j][2 * r + e]);
            }
        }
    }
}

// dQ of one query tile (BLOCK_M rows, 16 per warp) of one head, over the KV tiles of its schedule.
template <typename T>
__device__ void attention_backward_dq(const T* Q, const T* K, const T* V, const T* DO, const float* LSE,
                                      const float* DELTA, T* DQ, const Captured& cap, int H, int N, int M,
                                      int stride_qz, int stride_qh, int stride_qm, int stride_qk,
                                      int stride_kz, int stride_kh, int stride_km, int stride_kk,
                                      int stride_vz, int stride_vh, int stride_vm, int stride_vk,
                                      int stride_doz, int stride_doh, int stride_dom, int stride_dok,
                                      int stride_dqz, int stride_dqh, int stride_dqm, int stride_dqk) {
    constexpr int LDQ = padded_row<T, HEAD_DIM_P>, LDV = padded_row<T, HEAD_DIM_V_P>;
    using Layout = SharedLayout<T>;
    unsigned char* shared = shared_memory();
    T* q_tile = reinterpret_cast<T*>(shared + Layout::DQ_Q);
    T* do_tile = reinterpret_cast<T*>(shared + Layout::DQ_DO);
    T* k_tiles = reinterpret_cast<T*>(shared + Layout::DQ_K);
    T* v_tiles = reinterpret_cast<T*>(shared + Layout::DQ_V);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
    float* scratch = reinterpret_cast<float*>(shared + Layout::DQ_SCRATCH) + warp * 16 * BLOCK_N;
    const int start_m = blockIdx.x * BLOCK_M;
    const int b = blockIdx.y / H, h = blockIdx.y % H, kv_h = h / GROUPS;
    const T* k_base = K + b * (long long)stride_kz + kv_h * (long long)stride_kh;
    const T* v_base = V + b * (long long)stride_vz + kv_h * (long long)stride_vh;
    auto q_at = [&](int row) { return q_position(b, h, row, 0, N, M, cap); };
    auto kv_at = [&](int key) { return kv_position(b, h, 0, key, N, M, cap); };
    int lo, hi, full_lo, full_hi;
    kv_tiles(start_m, last_row(start_m, BLOCK_M, N), b, h, N, M, cap, BLOCK_N, lo, hi, full_lo, full_hi);
    load_tile<T, BLOCK_M, HEAD_DIM_P>(q_tile, Q + b * (long long)stride_qz + h * (long long)stride_qh +
                                      start_m * (long long)stride_qm, N - start_m, HEAD_DIM, stride_qm, stride_qk);
    load_tile<T, BLOCK_M, HEAD_DIM_V_P>(do_tile, DO + b * (long long)stride_doz + h * (long long)stride_doh +
                                        start_m * (long long)stride_dom, N - start_m, HEAD_DIM_V, stride_dom,
                                        stride_dok);
    if (lo < hi) {
        load_tile<T, BLOCK_N, HEAD_DIM_P>(k_tiles, k_base + lo * (long long)stride_km, M - lo, HEAD_DIM, stride_km,
                                          stride_kk);
        load_tile<T, BLOCK_N, HEAD_DIM_V_P>(v_tiles, v_base + lo * (long long)stride_vm, M - lo, HEAD_DIM_V,
                                            stride_vm, stride_vk);
    }
    cp_async_commit();
    float lse[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = start_m + warp * 16 + group + 8 * r;
        const long long index = ((long long)b * H + h) * N + row;
        lse[r] = row < N ? lse_units(LSE[index]) : INFINITY;
        delta[r] = row < N ? DELTA[index] : 0.0f;
    }
    float dq[HEAD_DIM_P / 8][4] = {};
    int buffer = 0;
    for (int start_n = lo; start_n < hi; start_n += BLOCK_N, buffer ^= 1) {
        const int next = start_n + BLOCK_N;
        if (next < hi) {
            load_tile<T, BLOCK_N, HEAD_DIM_P>(k_tiles + (buffer ^ 1) * BLOCK_N * LDQ,
                                              k_base + next * (long long)stride_km, M - next, HEAD_DIM, stride_km,
                                              stride_kk);
            load_tile<T, BLOCK_N, HEAD_DIM_V_P>(v_tiles + (buffer ^ 1) * BLOCK_N * LDV,
                                                v_base + next * (long long)stride_vm, M - next, HEAD_DIM_V,
                                                stride_vm, stride_vk);
        }
        cp_async_commit();
        cp_async_wait_one();
        __syncthreads();
        if constexpr (ROPE) {  // turn the q tile once, and each K tile as it arrives
            if (start_n == lo) rope_tile<T, BLOCK_M, LDQ>(q_tile, start_m, N, q_at, 1.0f);
            rope_tile<T, BLOCK_N, LDQ>(k_tiles + buffer * BLOCK_N * LDQ, start_n, M, kv_at, 1.0f);
            __syncthreads();
        }
        const T* k_tile = k_tiles + buffer * BLOCK_N * LDQ;
        const T* v_tile = v_tiles + buffer * BLOCK_N * LDV;
        float s[BLOCK_N / 8][4] = {}, dp[BLOCK_N / 8][4] = {};
        warp_mma_nt<T, HEAD_DIM_P / 16, BLOCK_N / 8>(s, q_tile + warp * 16 * LDQ, LDQ, k_tile, LDQ);
        warp_mma_nt<T, HEAD_DIM_V_P / 16, BLOCK_N / 8>(dp, do_tile + warp * 16 * LDV, LDV, v_tile, LDV);
        const bool masked = start_n < full_lo || start_n >= full_hi;
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = start_m + warp * 16 + group + 8 * (e / 2), col = start_n + 8 * j + 2 * quad + e % 2;
                probability_and_ds(s[j][e], dp[j][e], lse[e / 2], delta[e / 2], b, h, row, col, N, M, cap, masked);
            }
        }
        warp_mma_rn<T, BLOCK_N / 16, HEAD_DIM_P / 8>(dq, dp, k_tile, LDQ, scratch);  // dQ += dS K
        __syncthreads();
    }
    cp_async_wait_all();
    if constexpr (ROPE) {  // dQ of the turned queries, turned back
        store_turned_back<T>(dq, DQ + b * (long long)stride_dqz + h * (long long)stride_dqh, start_m, N, stride_dqm,
                             stride_dqk, q_at);
        return;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = start_m + warp * 16 + group + 8 * r;
        if (row >= N) continue;
        T* dq_row = DQ + b * (long long)stride_dqz + h * (long long)stride_dqh + row * (long long)stride_dqm;
#pragma unroll
        for (int j = 0; j < HEAD_DIM_P / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 8 * j + 2 * quad + e;
                if (col < HEAD_DIM) dq_row[col * (long long)stride_dqk] = from_float<T>(dq[j][2 * r + e]);
            }
        }
    }
}"""

LAUNCH_CASES = {
    "forward": Template("""\
        const dim3 grid((q_len + BLOCK_M - 1) / BLOCK_M, batch * heads);
        return launch(attncc_forward_$suffix, grid, dim3(NUM_THREADS), SharedLayout<$T>::FORWARD_BYTES, stream,
                      static_cast<const $T*>(q), static_cast<const $T*>(k), static_cast<const $T*>(v),
                      static_cast<$T*>(o), lse$captured, heads, q_len, kv_len, STRIDES(q), STRIDES(k), STRIDES(v),
                      STRIDES(o));"""),
    "backward": Template("""\
        const int kv_heads = heads / GROUPS;
        cudaError_t status = launch(attncc_backward_delta_$suffix, dim3((q_len + NUM_THREADS - 1) / NUM_THREADS,
                                    batch * heads), dim3(NUM_THREADS), 0, stream, static_cast<const $T*>(o),
                                    static_cast<const $T*>(d_o), dlse, delta, heads, q_len, STRIDES(o), STRIDES(do));
        if (status != cudaSuccess) return status;
        status = launch(attncc_backward_dkdv_$suffix, dim3((kv_len + BLOCK_M - 1) / BLOCK_M, batch * kv_heads),
                        dim3(NUM_THREADS), SharedLayout<$T>::DKDV_BYTES, stream, static_cast<const $T*>(q),
                        static_cast<const $T*>(k), static_cast<const $T*>(v), static_cast<const $T*>(d_o), lse,
                        delta, static_cast<$T*>(dk), static_cast<$T*>(dv)$captured, heads, q_len, kv_len, STRIDES(q),
                        STRIDES(k), STRIDES(v), STRIDES(do), STRIDES(dk), STRIDES(dv));
        if (status != cudaSuccess) return status;
        return launch(attncc_backward_dq_$suffix, dim3((q_len + BLOCK_M - 1) / BLOCK_M, batch * heads),
                      dim3(NUM_THREADS), SharedLayout<$T>::DQ_BYTES, stream, static_cast<const $T*>(q),
                      static_cast<const $T*>(k), static_cast<const $T*>(v), static_cast<const $T*>(d_o), lse, delta,
                      static_cast<$T*>(dq)$captured, heads, q_len, kv_len, STRIDES(q), STRIDES(k), STRIDES(v),
                      STRIDES(do), STRIDES(dq));"""),
}

LAUNCHERS = Template("""\
// ---- the C ABI (see the header): host launch functions
#if !defined(__CUDACC_RTC__)
static bool strides_fit(const int64_t* strides, int count) {  // the kernels take int strides
    for (int i = 0; i < count; ++i) {
        if (strides[i] > 2147483647LL || strides[i] < -2147483647LL) return false;
    }
    return true;
}
#define STRIDES(name) (int)name##_strides[0], (int)name##_strides[1], (int)name##_strides[2], (int)name##_strides[3]

extern "C" int attncc_attention_forward(int dtype, const void* q, const int64_t* q_strides, const void* k,
                                        const int64_t* k_strides, const void* v, const int64_t* v_strides, void* o,
                                        const int64_t* o_strides, float* lse, int batch, int heads, int q_len,
                                        int kv_len$captured_params, cudaStream_t stream) {
    if (heads % GROUPS != 0 || batch < 0 || q_len < 0 || kv_len < 0 || $forward_checks) return cudaErrorInvalidValue;
    if (batch == 0 || heads == 0 || q_len == 0) return cudaSuccess;
    switch (dtype) {
$forward_cases
    }
    return cudaErrorInvalidValue;
}

extern "C" int attncc_attention_backward(int dtype, const void* q, const int64_t* q_strides, const void* k,
                                         const int64_t* k_strides, const void* v, const int64_t* v_strides,
                                         const void* o, const int64_t* o_strides, const float* lse, const void* d_o,
                                         const int64_t* do_strides, const float* dlse, void* dq,
                                         const int64_t* dq_strides, void* dk, const int64_t* dk_strides, void* dv,
                                         const int64_t* dv_strides, float* delta, int batch, int heads, int q_len,
                                         int kv_len$captured_params, cudaStream_t stream) {
    if (heads % GROUPS != 0 || batch < 0 || q_len < 0 || kv_len < 0 || $backward_checks) return cudaErrorInvalidValue;
    if (batch == 0 || heads == 0 || q_len == 0 || kv_len == 0) return cudaSuccess;
    switch (dtype) {
$backward_cases
    }
    return cudaErrorInvalidValue;
}
#undef STRIDES
#endif""")

ABI_HEADER = Template("""\
// The C ABI of an attention program generated by attncc (backend: cuda). The .cu file is self-contained;
// this header declares its launch functions for a host program.
//
// Layouts (SDPA's): q [B, H, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv], o [B, H, N, Dv], with any
// strides in elements (four per tensor); lse, dlse and delta are contiguous float32 [B, H, N]. dtype is
// ATTNCC_F16, ATTNCC_BF16 or ATTNCC_F32 for q, k, v, o and the gradients alike. lse is the natural-log
// logsumexp of each row (-inf for a row that sees no key, whose o is 0). The backward also takes dlse
// (zeros when lse is not used) and a workspace delta of B * H * N floats. Captured tensors follow, by
// position, each an element pointer and its strides:
$captured_doc
// Both functions launch on stream and return a cudaError_t (0: success; cudaErrorInvalidValue for a
// head count that is not a multiple of the program's KV groups, an unknown dtype, or a stride beyond int).
#ifndef $guard
#define $guard

#include <cuda_runtime.h>
#include <stdint.h>

#define ATTNCC_F16 0
#define ATTNCC_BF16 1
#define ATTNCC_F32 2

#ifdef __cplusplus
extern "C" {
#endif

int attncc_attention_forward(int dtype, const void* q, const int64_t* q_strides, const void* k,
                             const int64_t* k_strides, const void* v, const int64_t* v_strides, void* o,
                             const int64_t* o_strides, float* lse, int batch, int heads, int q_len,
                             int kv_len$captured_params, cudaStream_t stream);

int attncc_attention_backward(int dtype, const void* q, const int64_t* q_strides, const void* k,
                              const int64_t* k_strides, const void* v, const int64_t* v_strides, const void* o,
                              const int64_t* o_strides, const float* lse, const void* d_o, const int64_t* do_strides,
                              const float* dlse, void* dq, const int64_t* dq_strides, void* dk,
                              const int64_t* dk_strides, void* dv, const int64_t* dv_strides, float* delta,
                              int batch, int heads, int q_len, int kv_len$captured_params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif""")

MODULE = Template('''\
"""Attention generated by attncc $version (backend: cuda).

Inputs: q [B, H, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] (fp16, bf16 or fp32, any strides)$captured_note
Returns (o [B, H, N, Dv] in q's dtype, lse [B, H, N] in float32, natural log).
CUDA_SOURCE holds the kernels and their C ABI (CUDA_HEADER): CUDA tensors run them compiled by NVRTC,
CPU tensors run the same source compiled against attncc's host emulation header (see docs/cuda.md).
"""

import torch
from torch.autograd.function import once_differentiable

from attncc.backends.cuda_runtime import CudaProgram

CUDA_SOURCE = \'\'\'$source\'\'\'

CUDA_HEADER = \'\'\'$header\'\'\'

CAPTURED_NAMES = $captured_names  # the captured tensors' identifiers, in the kernels' and the C ABI's order

PROGRAM = CudaProgram(
    CUDA_SOURCE,
    groups=$groups,
    block_m=$block_m,
    block_n=$block_n,
    num_warps=$num_warps,
    shared_bytes=$shared_bytes,
    captured_ranks=$captured_ranks,
)


def _refuse_captured_gradients(needs_input_grad):
    if any(needs_input_grad[3:]):
        from attncc.errors import BackendError

        raise BackendError(
            "the cuda backend computes no gradients for captured tensors, and one requires grad; "
            "compile with backend='pytorch' to train it (or detach it)"
        )


class FlashAttention(torch.autograd.Function):
    """$doc

    Forward: one block per query tile. Backward (FlashAttention-2): delta, then dK and dV per KV
    tile, then dQ per query tile; each recomputes its tiles' scores.
    """

    @staticmethod
    def forward(ctx, q, k, v, *captured):
        _refuse_captured_gradients(ctx.needs_input_grad)
        o, lse = PROGRAM.forward(q, k, v, captured)
        ctx.save_for_backward(q, k, v, o, lse, *captured)
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        _refuse_captured_gradients(ctx.needs_input_grad)
        q, k, v, o, lse, *captured = ctx.saved_tensors
        dq, dk, dv = PROGRAM.backward(q, k, v, o, lse, do, dlse, captured)
        return (dq, dk, dv) + (None,) * len(captured)


def attention($params):
    """o and lse of $region = flash_attention(...) and $lse = lse_of(...)."""
    return FlashAttention.apply($args)
''')


def _check_graph(graph: Graph):
    """The region, its lse_of, and the output; BackendError for any other graph."""
    return single_region(graph, "cuda")


@dataclass(frozen=True)
class CudaSource:
    """The CUDA source of a program, its ABI header, and the constants its launchers need."""

    source: str
    header: str
    writer: RegionWriter
    ir_line: str
    region_name: str
    lse_name: str


def cuda_source(graph: Graph, header_guard: str = "ATTNCC_ATTENTION_H") -> CudaSource:
    """The self-contained CUDA source (and C ABI header) of a graph's fused region."""
    region, lse = _check_graph(graph)
    ir_names = value_names(graph)
    operands = region.inputs[3:]
    names = CapturedNames(operand.op.label for operand in operands)  # positions: the region's inputs
    captured = [
        CapturedTensor(names[operand.op.label], operand.op.label, operand.type.rank, operand.type.dtype)
        for operand in operands
    ]
    ir_line = comment(format_node(region, ir_names))
    writer = RegionWriter(region, ir_line, captured)
    w = SourceWriter()
    w.line(f"// Attention generated by attncc {attncc.__version__} (backend: cuda), from this IR:")
    for row in print_graph(graph).splitlines():
        w.line(f"//     {comment(row)}")
    w.line("//")
    w.line("// Kernels: attncc_forward_*, attncc_backward_delta_*, attncc_backward_dkdv_*, attncc_backward_dq_*")
    w.line("// per dtype (f16, bf16: mma.sync tensor cores; f32: float32 products). C ABI: attncc_attention_forward,")
    w.line("// attncc_attention_backward (see the header). Needs sm_80 or later.")
    w.line("#if defined(ATTNCC_EMULATION)")
    w.line('#include "attncc_emulation.h"')
    w.line("#else")
    for row in DEVICE_PRELUDE.splitlines():
        w.line(row)
    w.line("#endif")
    w.line()
    w.line(f"// {ir_line}", ir=ir_line)
    for row in writer.source():
        w.line(row, ir=ir_line)
    return CudaSource(w.text(), writer.header(header_guard) + "\n", writer, ir_line, ir_names[region], ir_names[lse])


def generate(graph: Graph) -> GeneratedSource:
    """Python source defining ``attention(q, k, v, *captured) -> (o, lse)`` around the CUDA kernels."""
    program = cuda_source(graph)
    writer = program.writer
    for text in (program.source, program.header):
        if "'''" in text or "\\" in text:
            raise BackendError("the generated CUDA source cannot be embedded in Python (a quote or backslash)")
    names = [tensor.name for tensor in writer.captured]  # the region's order, the kernels' and the C ABI's
    by_label = {tensor.label: tensor.name for tensor in writer.captured}
    inputs = [by_label[node.op.label] for node in graph.captured]  # the program's order
    op = writer.op
    shared = {
        kernel: {dtype: writer.layouts(dtype)[kernel].bytes for dtype in DTYPES} for kernel in ("forward", "dq", "dkdv")
    }
    text = MODULE.substitute(
        version=attncc.__version__,
        captured_note=f", then the captured tensors {', '.join(inputs)}." if names else ".",
        source=program.source,
        header=program.header,
        groups=op.groups,
        block_m=op.block_m,
        block_n=op.block_n,
        num_warps=op.num_warps,
        shared_bytes=repr(shared),
        captured_ranks=repr(tuple(tensor.rank for tensor in writer.captured)),
        captured_names=repr(tuple(names)),
        doc=program.ir_line.replace('"', "'"),
        params=", ".join(["q", "k", "v", *inputs]),
        args=", ".join(["q", "k", "v", *names]),
        region=program.region_name,
        lse=program.lse_name,
    )
    return GeneratedSource(text, "attention", {}, name)
