"""The PyTorch backend: generates plain torch source for a graph; runs on any device."""

from __future__ import annotations

import math

import sympy

import attncc
from attncc.backends.cpu_decode import native_decode
from attncc.backends.pytorch_decode import decode_source
from attncc.backends.source import (
    CapturedNames,
    ExpressionPrinter,
    GeneratedSource,
    SourceWriter,
    python_names,
    unique_names,
)
from attncc.ir import ops
from attncc.ir.expr import INDEX_SYMBOLS, score, split_linear
from attncc.ir.graph import Graph
from attncc.ir.printer import format_node, print_graph, value_names

name = "pytorch"
devices = ("cpu", "cuda", "mps", "xpu")

_TENSOR_SYMBOLS = {str(s) for s in (*INDEX_SYMBOLS, score)}


def is_tensor(expr) -> bool:
    """Whether an expression is a tensor in generated code (it reads an index, the score or a captured tensor)."""
    return bool(expr.atoms(sympy.Indexed)) or any(s.name in _TENSOR_SYMBOLS for s in expr.atoms(sympy.Symbol))


class TorchPrinter(ExpressionPrinter):
    """Prints IR expressions as torch code over broadcast index grids; plain Python where all is scalar."""

    def _print_Indexed(self, expr):
        indices = ", ".join(self._print(i) for i in expr.indices)
        return f"{self.captured[str(expr.base.label)]}[{indices}]"

    def _print_FloorDiv(self, expr):
        a, c = expr.args
        return f"({self.parenthesize(a, 40)} // {self.parenthesize(c, 50)})"  # 2 // (7/10), not 2 // 7/10

    def _print_Mod(self, expr):
        a, c = expr.args
        return f"({self.parenthesize(a, 40)} % {self.parenthesize(c, 50)})"

    def _tensor_call(self, expr, torch_fn: str, math_fn: str):
        (arg,) = expr.args
        if is_tensor(arg):
            return f"torch.{torch_fn}({self._print(arg)})"
        return f"math.{math_fn}({self._print(arg)})"

    def _print_exp(self, expr):
        return self._tensor_call(expr, "exp", "exp")

    def _print_log(self, expr):
        return self._tensor_call(expr, "log", "log")

    def _print_tanh(self, expr):
        return self._tensor_call(expr, "tanh", "tanh")

    def _print_Abs(self, expr):
        return f"abs({self._print(expr.args[0])})"

    def _elementwise(self, name: str, args):
        printed = [self._print(arg) for arg in args]
        if not any(is_tensor(arg) for arg in args):
            return _SCALAR_FUNCTIONS[name].format(*printed)
        if not is_tensor(args[0]):  # torch.fmod(number, tensor) needs a tensor first
            printed[0] = f"torch.as_tensor({printed[0]})"
        return f"torch.{name}({', '.join(printed)})"

    def _rounding(self, expr, fn: str):
        (arg,) = expr.args
        if arg.is_integer:
            return self._print(arg)
        if is_tensor(arg):
            return f"torch.{fn}({self._print(arg)}).long()"
        return f"math.{fn}({self._print(arg)})"

    def _print_Pow(self, expr, rational=False):
        base, exponent = expr.args
        if not is_tensor(expr):
            return f"({self._print(base)}) ** ({self._print(exponent)})"
        if exponent == sympy.Rational(1, 2):
            return f"torch.sqrt({self._print(base)})"
        if exponent == -1:
            return f"(1 / {self.parenthesize(base, 50)})"
        if exponent == -sympy.Rational(1, 2):
            return f"torch.rsqrt({self._print(base)})"
        if base.is_Number:
            # 2 ** tensor: a float base keeps integer tensors from integer powers.
            return f"({float(base)!r} ** {self.parenthesize(exponent, 60)})"
        if base.is_integer and not (exponent.is_integer and exponent.is_nonnegative):
            return f"({self.parenthesize(base, 60)}).double() ** {self.parenthesize(exponent, 60)}"
        return f"{self.parenthesize(base, 60)} ** {self.parenthesize(exponent, 60)}"

    def _min_max(self, expr, torch_fn: str):
        python_fn = torch_fn[:3]  # min, max
        tensors = [a for a in expr.args if is_tensor(a)]
        scalars = [a for a in expr.args if not is_tensor(a)]
        if not tensors:
            return f"{python_fn}({', '.join(self._print(a) for a in scalars)})"
        result = self._print(tensors[0])
        for arg in tensors[1:]:
            result = f"torch.{torch_fn}({result}, {self._print(arg)})"
        if scalars:
            bound = (
                self._print(scalars[0])
                if len(scalars) == 1
                else f"{python_fn}({', '.join(self._print(a) for a in scalars)})"
            )
            keyword = "max" if torch_fn == "minimum" else "min"
            result = f"torch.clamp({result}, {keyword}={bound})"
        return result

    def _print_Piecewise(self, expr):
        *pieces, (otherwise, last_condition) = expr.args
        if last_condition is not sympy.true:
            raise ValueError(f"Piecewise without a default branch: {expr}")
        result = self._print(otherwise)
        for value, condition in reversed(pieces):
            if is_tensor(condition):
                result = f"torch.where({self._print(condition)}, {self._print(value)}, {result})"
            else:
                result = f"({self._print(value)} if {self._print(condition)} else {result})"
        return result

    def _logical(self, expr, symbol: str):
        word = {"&": "and", "|": "or", "^": "!="}[symbol]  # on Python booleans
        operator = f" {symbol} " if is_tensor(expr) else f" {word} "
        return "(" + operator.join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        (arg,) = expr.args
        return f"(~{self._print(arg)})" if is_tensor(arg) else f"(not {self._print(arg)})"

    def _print_Infinity(self, expr):
        return "float('inf')"

    def _print_NegativeInfinity(self, expr):
        return "float('-inf')"

    def _print_NaN(self, expr):
        return "float('nan')"


def print_expr(expr, captured: CapturedNames) -> str:
    return TorchPrinter(captured).doprint(expr)


# ELEMENTWISE_FUNCTIONS on Python numbers (expressions of the lengths alone).
_SCALAR_FUNCTIONS = {
    **{name: f"math.{name}({{0}})" for name in ("sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh")},
    **{name: f"math.{name}({{0}})" for name in ("erf", "expm1", "log1p")},
    "sign": "(float({0} > 0) - float({0} < 0))",
    "trunc": "float(math.trunc({0}))",
    "round": "float(round({0}))",  # Python rounds halves to even, as torch.round does
    "fmod": "math.fmod({0}, {1})",
}


_BASE_NAMES = {
    ops.Matmul: lambda op: "scores" if op.transpose_b else "o",
    ops.Softmax: lambda op: "probs",
    ops.LogSumExp: lambda op: "lse",
    ops.FlashAttention: lambda op: "o",
    ops.LseOf: lambda op: "lse",
    ops.Rope: lambda op: "q_rot" if op.role == "query" else "k_rot",
}


def _value_name(node, captured: CapturedNames) -> str:
    if isinstance(node.op, ops.Input):
        return captured[node.op.label] if node.op.role == "captured" else node.op.label
    if isinstance(node.op, ops.RepeatKV):
        return node.inputs[0].op.label + "_rep" if isinstance(node.inputs[0].op, ops.Input) else "kv_rep"
    return _BASE_NAMES.get(type(node.op), lambda op: "scores")(node.op)


def _uses(expr, symbol: str) -> bool:
    return any(s.name == symbol for s in expr.atoms(sympy.Symbol))


def _grid_lines(expr, w: SourceWriter, defined: set[str]) -> None:
    """Define the index grids an expression reads, once each (unoptimized graphs)."""
    shapes = {"b": "-1, 1, 1, 1", "h": "1, -1, 1, 1", "q_idx": "1, 1, -1, 1", "kv_idx": "1, 1, 1, -1"}
    sizes = {"b": "B", "h": "H", "q_idx": "N", "kv_idx": "M"}
    for symbol in ("b", "h", "q_idx", "kv_idx"):
        if symbol in defined or not _uses(expr, symbol):
            continue
        w.line(f"{symbol} = torch.arange({sizes[symbol]}, device=q.device).view({shapes[symbol]})")
        defined.add(symbol)


REGION_TEMPLATE = '''\
class {cls}(torch.autograd.Function):
    """{doc}

    Forward streams KV tiles with online softmax; backward recomputes each tile's
    scores and differentiates them locally, so memory stays O(N x BLOCK_N).
    """

    BLOCK_M = {block_m}  # packed query rows per tile (GROUPS query heads share a KV head)
    BLOCK_N = {block_n}  # keys per tile
    GROUPS = {groups}
{band_tiles}
    @staticmethod
    def scores(q_tile, k_tile, b, h, q_idx, kv_idx, N, M, masked{captured_params}, out=None):
        """One tile of {units} scores: the region's score expression, masked with -inf unless the tile is full.

        ``out``: a buffer the tile's q . k may be written to (the forward reuses one for every tile).
        """
{score_lines}
{rope_source}    @staticmethod
    def bounds(q_first, q_last, b, h, N, M{captured_params}):
        """Keys [lo, hi) may be visible to queries q_first..q_last; keys [full_lo, full_hi) are visible to all."""
{bounds_lines}{table_source}
    @classmethod
    def tiles(cls, B, N, M, kv_heads, device, b{captured_params}, skip=(0, 0)):
        """For each query tile but those of queries skip[0] .. skip[1] - 1: its rows, index grids, and the KV tiles
        it visits as (c0, c1, masked)."""
{table_lookup}        for index, (r0, r1, q_first, q_last) in enumerate(_row_tiles(N, cls.GROUPS, cls.BLOCK_M)):
            if skip[0] <= q_first and q_last < skip[1]:
                continue
            h, q_idx = _packed_rows(r0, r1, N, kv_heads, cls.GROUPS, device)
            lo, hi, full_lo, full_hi = cls.bounds(q_first, q_last, b, h, N, M{captured_args})
{kv_tiles}            yield r0, r1, h, q_idx, kv_tiles

    @staticmethod
    def forward(ctx, q, k, v{captured_params}):
        B, H, N, D = q.shape
        M, Dv = k.shape[2], v.shape[3]
{platform_forward}        kv_heads, rows = k.shape[1], {cls}.GROUPS * N
{load_forward}{captured_to_float}        b = torch.arange(B, device=q.device).view(-1, 1, 1, 1)
{band_forward}        o = torch.empty(B, kv_heads, rows, Dv, device=q.device)
        lse = torch.empty(B, kv_heads, rows, device=q.device)
        # one buffer for every tile's scores: fresh multi-MiB tensors per tile cost page faults
        scores_buffer = torch.empty(B * kv_heads * min(rows, {cls}.BLOCK_M) * min(M, {cls}.BLOCK_N), device=q.device)
        for r0, r1, h, q_idx, kv_tiles in {cls}.tiles(B, N, M, kv_heads, q.device, b{captured_args}{skip_arg}):
            q_tile = q_rows[:, :, r0:r1]{prescale}
            row_max = torch.full((B, kv_heads, r1 - r0), float("-inf"), device=q.device)
            row_sum = torch.zeros(B, kv_heads, r1 - r0, device=q.device)
            acc = torch.zeros(B * kv_heads, r1 - r0, Dv, device=q.device)
            for c0, c1, masked in kv_tiles:
                kv_idx = torch.arange(c0, c1, device=q.device).view(1, 1, 1, -1)
                shape = (B, kv_heads, r1 - r0, c1 - c0)
                out = scores_buffer[: math.prod(shape)].view(shape)
                s = {cls}.scores(q_tile, k_f[:, :, c0:c1], b, h, q_idx, kv_idx, N, M, masked{captured_args}, out=out)
                # -- online softmax: rescale the running sum and accumulator when the max grows
                new_max = torch.maximum(row_max, s.amax(dim=-1))
                safe_max = torch.where(new_max == float("-inf"), 0.0, new_max)
                p = s.sub_(safe_max.unsqueeze(-1)).{exp}_()
                rescale = torch.{exp}(row_max - safe_max)
                row_sum.mul_(rescale).add_(p.sum(dim=-1))
                # acc = acc * rescale + p @ v, the sum done by the matmul
                acc.mul_(rescale.view(-1, r1 - r0, 1)).baddbmm_(p.reshape(-1, r1 - r0, c1 - c0),
                                                                v_f[:, :, c0:c1].reshape(-1, c1 - c0, Dv))
                row_max = new_max
            # -- epilogue: a row that saw no key keeps acc = 0 and gets lse = -inf
            safe_max = torch.where(row_max == float("-inf"), 0.0, row_max)
            o[:, :, r0:r1] = acc.view(B, kv_heads, r1 - r0, Dv) / torch.where(row_sum == 0, 1.0, row_sum).unsqueeze(-1)
            lse[:, :, r0:r1] = (safe_max + torch.{log}(row_sum)){to_natural}
        o = o.view(B, H, N, Dv)
        lse = lse.view(B, H, N)
{band_store}        ctx.save_for_backward(q, k, v, o, lse{saved_captured})
        return o.to(q.dtype), lse

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse, *captured = ctx.saved_tensors
        B, H, N, D = q.shape
        M, Dv = k.shape[2], v.shape[3]
{platform_backward}        kv_heads, rows = k.shape[1], {cls}.GROUPS * N
{load_backward}        grad_o = grad_o.float().reshape(B, kv_heads, rows, Dv)
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float()
        # d lse / d s = p: the lse gradient joins delta = rowsum(o * dO) in one row term
        row_term = ((o.reshape(B, kv_heads, rows, Dv) * grad_o).sum(dim=-1) - grad_lse.reshape(B, kv_heads, rows))
        lse_units = lse.reshape(B, kv_heads, rows){to_units}
        lse_units = torch.where(torch.isinf(lse_units), 0.0, lse_units)
        trainable = [i for i, t in enumerate(captured) if ctx.needs_input_grad[3 + i]]
        grad_q = torch.zeros_like(q_rows)
        grad_k = torch.zeros_like(k_f)
        grad_v = torch.zeros_like(v_f)
        grad_captured = [torch.zeros_like(captured[i], dtype=torch.float32) for i in trainable]
        b = torch.arange(B, device=q.device).view(-1, 1, 1, 1)
        computed = [_compute_dtype(t) for t in captured]
        for r0, r1, h, q_idx, kv_tiles in {cls}.tiles(B, N, M, kv_heads, q.device, b, *computed):
            for c0, c1, masked in kv_tiles:
                kv_idx = torch.arange(c0, c1, device=q.device).view(1, 1, 1, -1)
                with torch.enable_grad():
                    q_tile = q_rows[:, :, r0:r1].detach().requires_grad_()
                    k_tile = k_f[:, :, c0:c1].detach().requires_grad_()
                    inputs = [t.detach().requires_grad_() if i in trainable else t for i, t in enumerate(computed)]
                    s = {cls}.scores(q_tile{prescale}, k_tile, b, h, q_idx, kv_idx, N, M, masked, *inputs)
                p = torch.{exp}(s.detach() - lse_units[:, :, r0:r1].unsqueeze(-1))
                grad_v[:, :, c0:c1] += torch.matmul(p.transpose(-1, -2), grad_o[:, :, r0:r1])
                grad_p = torch.matmul(grad_o[:, :, r0:r1], v_f[:, :, c0:c1].transpose(-1, -2))
                grad_s = p * (grad_p - row_term[:, :, r0:r1].unsqueeze(-1)){from_units}
                if not s.requires_grad:  # the scores read neither q . k nor a trainable tensor
                    continue
                leaves = [q_tile, k_tile] + [inputs[i] for i in trainable]
                grads = torch.autograd.grad(s, leaves, grad_s, allow_unused=True)
                for total, grad in zip([grad_q[:, :, r0:r1], grad_k[:, :, c0:c1], *grad_captured], grads):
                    if grad is not None:
                        total += grad
        grad_inputs = [None] * len(captured)
        for i, grad in zip(trainable, grad_captured):
            grad_inputs[i] = grad.to(captured[i].dtype)
{rotate_grads}        return (grad_q.reshape(q.shape).to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), *grad_inputs)
'''

PACKED_ROWS = '''\
def _row_tiles(N, groups, block_m):
    """Query tiles over the packed rows as (r0, r1, q_first, q_last).

    A tile never straddles two heads unless it holds whole heads (short sequences,
    as in decoding), so q_first..q_last bounds the query indices of its rows.
    """
    if N >= block_m:
        for head in range(groups):
            for start in range(0, N, block_m):
                stop = min(start + block_m, N)
                yield head * N + start, head * N + stop, start, stop - 1
    else:
        step = (block_m // N) * N
        for r0 in range(0, groups * N, step):
            yield r0, min(r0 + step, groups * N), 0, N - 1


def _kv_chunks(lo, hi, full_lo, full_hi, M, block_n):
    """The KV tiles (c0, c1, masked) of keys [lo, hi), of which [full_lo, full_hi) are visible to every row.

    A range that fits in one tile is one tile (a band: one matmul per query tile). Otherwise
    tiles of block_n keys start at lo: masked ones up to the first tile edge at or after
    full_lo, unmasked ones while whole tiles fit below full_hi, masked ones to hi.
    """
    lo, hi = max(lo, 0), min(hi, M)
    if hi <= lo:
        return []
    if hi - lo <= block_n:
        return [(lo, hi, not (full_lo <= lo and hi <= full_hi))]
    first_full = lo + -(-max(full_lo - lo, 0) // block_n) * block_n
    end_full = first_full + max(min(full_hi, hi) - first_full, 0) // block_n * block_n
    if end_full == first_full:
        first_full = end_full = hi  # no whole tile is full: mask them all
    tiles = [(c0, min(c0 + block_n, first_full), True) for c0 in range(lo, first_full, block_n)]
    tiles += [(c0, c0 + block_n, False) for c0 in range(first_full, end_full, block_n)]
    tiles += [(c0, min(c0 + block_n, hi), True) for c0 in range(end_full, hi, block_n)]
    return tiles


def _compute_dtype(tensor):
    """Captured float tensors join the float32 arithmetic of the scores (fp16 and bf16 tables too)."""
    return tensor.float() if tensor.is_floating_point() else tensor


class _NoGradients:
    """The context a region's forward gets when no gradient can flow: it keeps nothing."""

    def save_for_backward(self, *tensors):
        pass


def _apply(region, *inputs):
    """``region.apply(*inputs)``; without a gradient to record, its forward alone (no autograd bookkeeping)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return region.apply(*inputs)
    return region.forward(_NoGradients(), *inputs)


def _usual_lse(lse):
    """Every lse finite and not 0 (one aminmax of |lse|: a NaN makes both extremes NaN)."""
    low, high = torch.aminmax(lse.abs())
    return 0.0 < float(low) and float(high) < math.inf


def _lowest(value):
    return int(value.min()) if isinstance(value, torch.Tensor) else int(value)


def _highest(value):
    return int(value.max()) if isinstance(value, torch.Tensor) else int(value)


def _packed_rows(r0, r1, N, kv_heads, groups, device):
    """Head and query index grids of packed rows r0..r1 (row r is query r % N of head group r // N)."""
    packed = torch.arange(r0, r1, device=device)
    head = torch.arange(kv_heads, device=device).view(1, -1, 1, 1) * groups + (packed // N).view(1, 1, -1, 1)
    return head, (packed % N).view(1, 1, -1, 1)
'''


ROPE_HELPERS = '''\
def _positions(position, x):
    """The RoPE position of each row of x [B, H, L, D] as a [B, 1, L, 1] grid; ``position(b, index)``."""
    B, L = x.shape[0], x.shape[2]
    b = torch.arange(B, device=x.device).view(-1, 1, 1, 1)
    index = torch.arange(L, device=x.device).view(1, 1, -1, 1)
    return torch.broadcast_to(torch.as_tensor(position(b, index), device=x.device), (B, 1, L, 1))


def _rotate(x, positions, freq, partner, sign=1.0):
    """x turned by RoPE in float32: x cos(angle) + x[..., partner] sin(angle) per column, angle = position * freq.

    ``freq`` is signed (the first column of a pair turns by -angle) and ``partner`` the other column of each
    pair; columns that pass through have freq 0. ``sign=-1`` turns back: the transpose, for gradients.
    """
    angle = positions.float() * (torch.tensor(freq, dtype=torch.float32, device=x.device) * sign)
    x = x.float()
    return x * torch.cos(angle) + x[..., torch.tensor(partner, device=x.device)] * torch.sin(angle)
'''

ROPE_TEMPLATE = '''\
    # RoPE {rope}: per column, the signed frequency and the partner column (attncc.ir.rope.RoPE.column_tables)
    ROPE_FREQ = {freq}
    ROPE_PAIR = {pair}

    @classmethod
    def rotate(cls, q, k, N, M{captured_params}, sign=1.0):
        """q and k turned by RoPE in float32 (sign=-1: turned back), queries at {q_position}, keys at {kv_position}."""
        return (_rotate(q, _positions(lambda b, q_idx: {q_expr}, q), cls.ROPE_FREQ, cls.ROPE_PAIR, sign),
                _rotate(k, _positions(lambda b, kv_idx: {kv_expr}, k), cls.ROPE_FREQ, cls.ROPE_PAIR, sign))

'''


TABLE_TEMPLATE = '''
    tables = {{}}

    @classmethod
    def tile_table(cls, B, N, M, kv_heads, device, b{captured_params}):
        """Which KV tiles each query tile visits, and which of those are full, from the mask itself.

        The mask is evaluated one query tile at a time (never N x M at once) and the
        table is cached while the captured tensors are unchanged: the same tensors
        holding the same values, compared with a copy, so an update that bypasses the
        version counter (``t.data.copy_(new)``, an inference tensor) is seen too.
        """
        tensors = ({captured_tuple})
        key = (B, N, M, kv_heads, str(device), {ids})
        cached = cls.tables.get(key)
        # The entry holds the tensors it was built from, so their ids cannot be reused while it lives.
        if cached is None or any(
            old is not new or not torch.equal(copy, new) for old, copy, new in zip(cached[0], cached[1], tensors)
        ):
            kv_idx = torch.arange(M, device=device).view(1, 1, 1, -1)
            blocks = -(-M // cls.BLOCK_N)
            visit, full = [], []
            for r0, r1, _, _ in _row_tiles(N, cls.GROUPS, cls.BLOCK_M):
                h, q_idx = _packed_rows(r0, r1, N, kv_heads, cls.GROUPS, device)
                keep = torch.as_tensor({keep}, device=device)
                keep = torch.broadcast_to(keep, (*keep.shape[:2], r1 - r0, M)).transpose(0, 3).reshape(M, -1)
                padded = blocks * cls.BLOCK_N - M
                visit.append(torch.nn.functional.pad(keep, (0, 0, 0, padded)).reshape(blocks, -1).any(-1).tolist())
                full.append(torch.nn.functional.pad(keep, (0, 0, 0, padded), value=True).reshape(blocks, -1).all(-1).tolist())
            if len(cls.tables) >= 8:
                cls.tables.clear()
            cls.tables[key] = (tensors, tuple(t.clone() for t in tensors), visit, full)
        return cls.tables[key][2:]
'''


def _tuple(names: list[str]) -> str:
    return "(" + "".join(f"{n}, " for n in names).rstrip() + ")"


# torch's fused CPU attention kernel (FlashAttention's algorithm, lse included): is_causal is top-left aligned.
# It turns a query row holding NaN or inf into o = 0, lse = 0: the forward then checks q (one float32 sum: a NaN
# or inf term makes it non-finite; an overflow of finite terms only costs the loop) and such inputs take the
# streaming loop, which propagates them as the reference does. The backward checks q before calling the kernel.
PLATFORM_FORWARD = """\
        if {condition}:
            # plain{causal_note} attention: torch's fused CPU kernel computes the region in float32, lse included
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.float(), k.float(), v.float(), 0.0, {is_causal}, scale={scale!r})
            if int(lse.count_nonzero()) == lse.numel() or math.isfinite(q.sum(dtype=torch.float32)):
                ctx.save_for_backward(q, k, v, o, lse)
                return o.to(q.dtype), lse
"""
PLATFORM_BACKWARD = """\
        if {condition} and math.isfinite(q.sum(dtype=torch.float32)) and (grad_lse is None or not grad_lse.any()):
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_o.float(), q.float(), k.float(), v.float(), o.float(), lse, 0.0, {is_causal}, scale={scale!r})
            return tuple(grad.to(q.dtype) for grad in grads)
"""

# Short sequences of any other linear score: the same kernel with the mask and the additive terms as one float
# attn_mask of the N x M scores (broadcast over batch and heads where the terms allow), up to this many scores
# per (batch, head): past it the bias costs more than streaming the tiles, which skips the masked ones.
FUSED_MASK_SCORES = 1 << 18
MASKED_FORWARD = """\
        if q.device.type == "cpu" and N * M <= {short}:
            # a short sequence: torch's fused CPU kernel with the mask and the score's other terms as a float bias
            bias = {cls}.bias(B, H, N, M, q.device{captured})  # None: plain causal attention here
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.float(), k.float(), v.float(), 0.0, bias is None, attn_mask=bias, scale={scale!r})
            # the kernel gives a row that sees no key, or reads NaN or inf, lse = 0 or a non-finite lse: the loop
            # computes such rows as the reference does
            if _usual_lse(lse):
                ctx.save_for_backward(q, k, v, o, lse{captured})
                return o.to(q.dtype), lse
"""
MASKED_BACKWARD = """\
        if (q.device.type == "cpu" and N * M <= {short} and not any(ctx.needs_input_grad[3:]) and _usual_lse(lse)
                and math.isfinite(q.sum(dtype=torch.float32)) and (grad_lse is None or not grad_lse.any())):
            bias = {cls}.bias(B, H, N, M, q.device, *captured)
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_o.float(), q.float(), k.float(), v.float(), o.float(), lse, 0.0, bias is None, attn_mask=bias,
                scale={scale!r})
            return tuple(grad.to(q.dtype) for grad in grads){no_grads}
"""
BIAS_TEMPLATE = """
    biases = {{}}

    @classmethod
    def bias(cls, B, H, N, M, device{captured_params}):
        \"\"\"The mask and the score's terms other than scale * q . k, in natural units, -inf where masked:
        the fused kernel's attn_mask [B or 1, H or 1, N, M] for a short sequence; None where that is the causal
        mask of N == M and nothing else (a window wider than the sequence), which the kernel's is_causal computes
        without reading a bias and skipping the hidden blocks.\"\"\"
        def grids():
            return (torch.arange(B, device=device).view(-1, 1, 1, 1), torch.arange(H, device=device).view(1, -1, 1, 1),
                    torch.arange(N, device=device).view(1, 1, -1, 1), torch.arange(M, device=device).view(1, 1, 1, -1))

        bias = cls.grid_bias((B, H, N, M), grids, N, M, device{captured_args}, causal=N == M)
        return None if bias is None else bias.expand(bias.shape[0], bias.shape[1], N, M)

    @classmethod
    def grid_bias(cls, key, grids, N, M, device{captured_params}, causal=False):
        \"\"\"The mask and the terms (as ``bias``) over the index grids ``grids()`` gives (b, h, q_idx, kv_idx), as
        4 dimensions; with ``causal``, None if they are the N x M causal mask and nothing else. Kept (up to 4 MiB
        each) by ``key`` while the captured tensors are unchanged, compared as ``tile_table`` compares them.\"\"\"
        tensors = ({captured_tuple})
        key = (*key, str(device), {ids})
        cached = cls.biases.get(key)
        if cached is not None and all(
            old is new and torch.equal(copy, new) for old, copy, new in zip(cached[0], cached[1], tensors)
        ):
            return cached[2]
        b, h, q_idx, kv_idx = grids()
{casts}        terms = torch.as_tensor({terms}, dtype=torch.float32, device=device){to_natural}
        bias = torch.where(torch.as_tensor({keep}, device=device), terms, float("-inf"))
        bias = bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))
        if causal and bias.shape == (1, 1, N, M):
            hidden = torch.ones(N, M, dtype=torch.bool, device=device).triu_(1)
            if torch.equal(bias[0, 0], torch.zeros(N, M, device=device).masked_fill_(hidden, float("-inf"))):
                bias = None
        if bias is None or bias.numel() <= 1 << 20:
            if len(cls.biases) >= 8:
                cls.biases.clear()
            cls.biases[key] = (tensors, tuple(t.clone() for t in tensors), bias)
        return bias
"""

# A band (sliding window, fused_kernel = "band"): the query tiles inside its edges see the same mask and terms
# over a window of BAND_N keys that starts at the same distance from their first query, so one call of the fused
# kernel computes them all, each tile a batch entry whose keys are a strided view of K and V; the loop does the rest.
BAND_ROWS = 64  # query rows per tile of a band call: fewer keys per row than the loop's tiles, measured on CPU
BAND_TILES = """\
    BAND_M = {rows}  # query rows per tile of the band call (``band``)
    BAND_N = {keys}  # keys per tile of the band call: BLOCK_N - BLOCK_M + BAND_M still hold a tile's band
"""
BAND_FORWARD = """\
        skip = (0, 0)  # queries computed by the band call, which the loop leaves out
        if q.device.type == "cpu":
            band = {cls}.band(q_rows, k_f, v_f, N, M, b{captured_args})
            if band is not None:
                skip, band_o, band_lse = band
"""
BAND_STORE = """\
        if skip[1] > skip[0]:
            o[:, :, skip[0] : skip[1]] = band_o
            lse[:, :, skip[0] : skip[1]] = band_lse
"""
BAND_TEMPLATE = """
    @classmethod
    def band(cls, q_rows, k_f, v_f, N, M, b{captured_params}):
        \"\"\"The queries of a run of whole query tiles (BLOCK_M rows) in one call of the fused kernel: split into tiles
        of BAND_M rows whose visible keys lie in a window of BAND_N keys inside [0, M) that starts the same distance
        from their first query. The mask and the terms read q_idx and kv_idx only as kv_idx - q_idx (the tile pass
        checked), so one bias serves every such tile. Returns ((q0, q1), o [B, H, q1 - q0, Dv], lse) for queries
        q0 .. q1 - 1, or None (no such run, or an lse the kernel gets wrong: 0 or not finite).\"\"\"
        rows, keys, groups = cls.BAND_M, cls.BAND_N, cls.GROUPS
        B, kv_heads, D, Dv = k_f.shape[0], k_f.shape[1], k_f.shape[3], v_f.shape[3]
        h = torch.arange(kv_heads * groups, device=q_rows.device).view(1, -1, 1, 1)

        def shift(tile):  # the window's first key minus the tile's first query, if the window holds the tile's keys
            lo, hi, _, _ = cls.bounds(tile * rows, tile * rows + rows - 1, b, h, N, M{captured_args})
            return lo - tile * rows if 0 <= lo and hi <= lo + keys <= M else None

        last = N // cls.BLOCK_M * cls.BLOCK_M // rows - 1  # the last band tile inside the last whole query tile
        while last >= 0 and shift(last) is None:  # a window may reach past M near the end
            last -= 1
        if last < 0:
            return None
        first, offset = last, shift(last)
        while first > 0 and shift(first - 1) == offset:
            first -= 1
        q0, q1 = -(-first * rows // cls.BLOCK_M) * cls.BLOCK_M, (last + 1) * rows // cls.BLOCK_M * cls.BLOCK_M
        if q1 <= q0:
            return None
        count = (q1 - q0) // rows
        # rows of a tile: the query tile of each head of a KV head's group (they share its window)
        q_tiles = q_rows.view(B, kv_heads, groups, N, D)[:, :, :, q0:q1].unflatten(3, (count, rows))
        q_tiles = q_tiles.transpose(2, 3).reshape(B * kv_heads, count, groups * rows, D)

        def windows(x):  # [B x Hkv, count, keys, *]: tile t reads keys q0 + offset + t x rows onward, a view
            x = x.contiguous()
            width = x.shape[3]
            return x.as_strided((B * kv_heads, count, keys, width), (M * width, rows * width, width, 1),
                                x.storage_offset() + (q0 + offset) * width)

        bias = cls.band_bias(B, kv_heads, N, M, q0, q0 + offset, q_rows.device{captured_args})
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_tiles, windows(k_f), windows(v_f), 0.0, False, attn_mask=bias, scale={scale!r})
        if not _usual_lse(lse):
            return None
        o = o.view(B, kv_heads, count, groups, rows, Dv).transpose(2, 3).reshape(B, kv_heads * groups, q1 - q0, Dv)
        lse = lse.view(B, kv_heads, count, groups, rows).transpose(2, 3).reshape(B, kv_heads * groups, q1 - q0)
        return (q0, q1), o, lse

    @classmethod
    def band_bias(cls, B, kv_heads, N, M, q0, kv0, device{captured_params}):
        \"\"\"The band call's attn_mask [B x Hkv or 1, 1, GROUPS x BAND_M, BAND_N]: the mask and terms (as ``bias``)
        of the query tile at q0 (each head of a group in turn) over keys kv0 .. kv0 + BAND_N - 1.\"\"\"
        rows, keys = cls.GROUPS * cls.BAND_M, cls.BAND_N

        def grids():
            packed = torch.arange(rows, device=device)
            head = torch.arange(kv_heads, device=device).view(1, -1, 1, 1) * cls.GROUPS + (packed // cls.BAND_M).view(1, 1, -1, 1)
            return (torch.arange(B, device=device).view(-1, 1, 1, 1), head, (q0 + packed % cls.BAND_M).view(1, 1, -1, 1),
                    (kv0 + torch.arange(keys, device=device)).view(1, 1, 1, -1))

        bias = cls.grid_bias(("band", B, kv_heads, N, M, q0, kv0), grids, N, M, device{captured_args})
        if bias.shape[0] * bias.shape[1] == 1:
            return bias.expand(1, 1, rows, keys)
        return bias.expand(B, kv_heads, rows, keys).reshape(B * kv_heads, 1, rows, keys)
"""


def _fused_scale(op) -> float:
    """The fused kernel's scale: the score's factor of q . k in natural units."""
    coefficient, _ = split_linear(op.score)
    return coefficient * (math.log(2) if op.exp2 else 1.0)


def _platform_lines(op, cls: str, captured: list[str]) -> tuple[str, str]:
    """The forward's and backward's call of the fused kernel the tile pass chose (``op.fused_kernel``), if any."""
    if not op.fused_kernel:
        return "", ""
    scale = _fused_scale(op)
    if op.fused_kernel in ("masked", "band"):
        fields = dict(cls=cls, scale=scale, short=FUSED_MASK_SCORES, captured="".join(f", {c}" for c in captured),
                      no_grads=" + (None,) * len(captured)" if captured else "")  # fmt: skip
        return MASKED_FORWARD.format(**fields), MASKED_BACKWARD.format(**fields)
    condition = 'q.device.type == "cpu"' + (" and N == M" if op.fused_kernel == "causal_bottom_right" else "")
    causal = op.fused_kernel != "dense"
    fields = dict(condition=condition, is_causal=causal, scale=scale, causal_note=" causal" if causal else "")
    return PLATFORM_FORWARD.format(**fields), PLATFORM_BACKWARD.format(**fields)


def _bias_source(op, names: CapturedNames, captured: list[str]) -> str:
    """The ``bias`` method of a region on the "masked" or "band" fused kernel: its mask and additive terms as
    attn_mask; a band's ``band`` and ``band_bias`` too."""
    if op.fused_kernel not in ("masked", "band"):
        return ""
    _, terms = split_linear(op.score)
    captured_params = "".join(f", {c}" for c in captured)
    band = ""
    if op.fused_kernel == "band":
        band = BAND_TEMPLATE.format(captured_params=captured_params, captured_args=captured_params, scale=_fused_scale(op))
    return band + BIAS_TEMPLATE.format(
        captured_params=captured_params,
        captured_args=captured_params,
        captured_tuple=_tuple(captured),
        ids="(" + "".join(f"id({c}), " for c in captured) + ")",
        casts="".join(f"        {c} = _compute_dtype({c})\n" for c in captured),
        terms=print_expr(terms, names),
        keep=print_expr(op.mask, names),
        to_natural=" * LN2" if op.exp2 else "",
    )


def _bounds_lines(op, captured: CapturedNames) -> list[str]:
    schedule = op.schedule
    if schedule is None:
        return ["return 0, M, 0, M" if op.mask is sympy.true else "return 0, M, 0, 0"]
    names = ("lo", "hi", "full_lo", "full_hi")
    lines = [f"{name} = {print_expr(expr, captured)}" for name, expr in zip(names, schedule.expressions()[:4])]
    lines.append("return _lowest(lo), _highest(hi), _highest(full_lo), _lowest(full_hi)")
    return lines


def _region_source(node, cls: str, ir_line: str, names: CapturedNames) -> str:
    op = node.op
    captured = [names[operand.op.label] for operand in node.inputs[3:]]
    coefficient, rest = split_linear(op.score)
    lines = []
    in_place = coefficient is not None  # s is this function's own tensor (or the caller's buffer)
    if coefficient is not None:  # the linear factor is applied to each query tile once, by the caller
        lines.append("s = torch.matmul(q_tile, k_tile.transpose(-1, -2), out=out)")
        if rest != 0:
            lines.append(f"s = s.add_({print_expr(rest, names)})")
    elif not is_tensor(op.score):  # a constant score (scale 0, or a score_mod that ignores the score)
        lines.append(
            f"s = torch.full((*q_tile.shape[:3], k_tile.shape[2]), {print_expr(op.score, names)}, dtype=torch.float32, "
            "device=q_tile.device)"
        )
    else:
        lines.append("score = torch.matmul(q_tile, k_tile.transpose(-1, -2))")
        # a copy of its own: the caller updates s in place, and an expression that reads neither the
        # score nor every index is a broadcast view of fewer elements
        lines.append(f"s = torch.broadcast_to({print_expr(op.score, names)}, score.shape).float().contiguous()")
    if op.mask is not sympy.true:
        keep = print_expr(op.mask, names)
        if not is_tensor(op.mask):
            keep = f"torch.tensor({keep}, device=s.device)"
        lines.append("if masked:")
        lines.append(f'    s = s.masked_fill{"_" if in_place else ""}(~{keep}, float("-inf"))')
    lines.append("return s")
    captured_params = "".join(f", {c}" for c in captured)
    table = op.schedule is not None and op.schedule.table
    table_source = table_lookup = ""
    kv_tiles = "            kv_tiles = _kv_chunks(lo, hi, full_lo, full_hi, M, cls.BLOCK_N)\n"
    if table:
        ids = "(" + "".join(f"id({c}), " for c in captured) + ")"
        table_source = TABLE_TEMPLATE.format(captured_params=captured_params, ids=ids,
                                             captured_tuple=_tuple(captured), keep=print_expr(op.mask, names))  # fmt: skip
        table_lookup = f"        visit, full_tiles = cls.tile_table(B, N, M, kv_heads, device, b{captured_params})\n"
        kv_tiles = (  # the table's tiles are aligned to BLOCK_N
            "            kv_tiles = []\n"
            "            for c0 in range(lo - lo % cls.BLOCK_N, hi, cls.BLOCK_N):\n"
            "                c1 = min(c0 + cls.BLOCK_N, M)\n"
            "                if not visit[index][c0 // cls.BLOCK_N]:\n"
            "                    continue\n"
            "                full = full_lo <= c0 and c1 <= full_hi and full_tiles[index][c0 // cls.BLOCK_N]\n"
            "                kv_tiles.append((c0, c1, not full))\n"
        )
    casts = "".join(f"        {c} = _compute_dtype({c})\n" for c in captured)
    load_forward = "        q_rows = q.reshape(B, kv_heads, rows, D).float()\n        k_f, v_f = k.float(), v.float()\n"
    load_backward, rope_source, rotate_grads = load_forward, "", ""
    if op.rope is not None:  # the prologue turns q and k; the backward turns their gradients back
        head_dim = int(node.inputs[0].type.shape[3])
        freq, pair = op.rope.column_tables(head_dim)
        rope_source = ROPE_TEMPLATE.format(rope=op.rope, freq=tuple(freq), pair=tuple(pair), captured_params=captured_params,
                                           q_position=op.q_position, kv_position=op.kv_position,
                                           q_expr=print_expr(op.q_position, names), kv_expr=print_expr(op.kv_position, names))  # fmt: skip
        rotate = "        q_f, k_f = {cls}.rotate(q, k, N, M{args})\n"
        load = "        q_rows = q_f.reshape(B, kv_heads, rows, D)\n        v_f = v.float()\n"
        load_forward = rotate.format(cls=cls, args=captured_params) + load
        load_backward = rotate.format(cls=cls, args=", *captured") + load
        rotate_grads = (
            f"        grad_q, grad_k = {cls}.rotate(grad_q.reshape(q.shape), grad_k, N, M, *captured, sign=-1.0)\n"
        )
    platform_forward, platform_backward = _platform_lines(op, cls, captured)
    table_source += _bias_source(op, names, captured)
    band, band_rows = op.fused_kernel == "band", min(BAND_ROWS, op.block_m)
    return REGION_TEMPLATE.format(
        platform_forward=platform_forward,
        platform_backward=platform_backward,
        band_forward=BAND_FORWARD.format(cls=cls, captured_args=captured_params) if band else "",
        band_store=BAND_STORE if band else "",
        band_tiles=BAND_TILES.format(rows=band_rows, keys=op.block_n - op.block_m + band_rows) if band else "",
        skip_arg=", skip=skip" if band else "",
        load_forward=load_forward,
        load_backward=load_backward,
        rope_source=rope_source,
        rotate_grads=rotate_grads,
        cls=cls,
        captured_to_float=f"        originals = {_tuple(captured)}\n{casts}" if captured else "",
        prescale=f" * {coefficient!r}" if coefficient is not None else "",
        saved_captured=", *originals" if captured else "",
        doc=ir_line.replace('"', "'"),
        block_m=op.block_m or 1 << 30,
        block_n=op.block_n or 1 << 30,
        groups=op.groups,
        units="base-2" if op.exp2 else "natural",
        score_lines="".join(f"        {line}\n" for line in lines),
        bounds_lines="".join(f"        {line}\n" for line in _bounds_lines(op, names)),
        table_source=table_source,
        table_lookup=table_lookup,
        kv_tiles=kv_tiles,
        captured_params=captured_params,
        captured_args=captured_params,
        exp="exp2" if op.exp2 else "exp",
        log="log2" if op.exp2 else "log",
        to_natural=" * LN2" if op.exp2 else "",
        to_units=" * LOG2_E" if op.exp2 else "",
        from_units=" * LN2" if op.exp2 else "",
    )


def generate(graph: Graph) -> GeneratedSource:
    """Python source defining ``attention(q, k, v, *captured) -> (o, lse)`` for the graph."""
    ir_names = value_names(graph)
    nodes = [n for n in graph.nodes if n.type is not None]
    captured_names = CapturedNames(n.op.label for n in graph.captured)
    names = dict(zip(nodes, unique_names(_value_name(n, captured_names) for n in nodes)))
    captured = [captured_names[n.op.label] for n in graph.captured]
    regions = graph.nodes_of(ops.FlashAttention)

    w = SourceWriter()
    w.line(f'"""Attention generated by attncc {attncc.__version__} (backend: pytorch).')
    w.line()
    w.line(
        "Inputs: q [B, H, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] (fp16, bf16 or fp32)"
        + (f", captured tensors {captured_names.described()}." if captured else ".")
    )
    w.line("Returns (o [B, H, N, Dv] in q's dtype, lse [B, H, N] in float32, natural log).")
    w.line("Scores are accumulated in float32. Generated from this IR:")
    w.line()
    for row in print_graph(graph).splitlines():
        w.line("    " + row)
    w.line('"""')
    w.line()
    w.line("import math")
    w.line()
    w.line("import torch")
    w.line()
    region_classes = {}
    if graph.nodes_of(ops.Rope) or any(node.op.rope is not None for node in regions):
        for line in ROPE_HELPERS.splitlines():
            w.line(line)
        w.line()
        w.line()
    if regions:
        w.line("LOG2_E = 1.4426950408889634")
        w.line("LN2 = 0.6931471805599453")
        w.line()
        w.line()
        for line in PACKED_ROWS.splitlines():
            w.line(line)
    for index, node in enumerate(regions):
        cls = f"FlashAttention{index}" if len(regions) > 1 else "FlashAttention"
        region_classes[node] = cls
        ir_line = format_node(node, ir_names)
        w.line()
        w.line()
        for line in _region_source(node, cls, ir_line, captured_names).splitlines():
            w.line(line, ir=ir_line)
        if node.op.decode is not None:
            w.line()
            w.line()
            for line in decode_source(node, cls, captured_names, print_expr, split_linear, is_tensor).splitlines():
                w.line(line, ir=ir_line)
    w.line()
    w.line()
    w.line(f"def attention({', '.join(['q', 'k', 'v', *captured])}):")
    w.indent = 1
    w.line("B, H, N, _ = q.shape")
    w.line("M = k.shape[2]")
    grids: set[str] = set()
    for node in graph.nodes:
        op = node.op
        if isinstance(op, ops.Input):
            continue
        ir_line = format_node(node, ir_names)
        w.line()
        w.line(f"# {ir_line}", ir=ir_line)
        if isinstance(op, ops.Output):
            outputs = [names[i] for i in node.inputs]
            w.line(f"return {outputs[0]}.to(q.dtype), {outputs[1]}", ir=ir_line)
            break
        if isinstance(op, ops.FlashAttention):
            args = [names[i] for i in node.inputs]
            call = f"_apply({', '.join([region_classes[node], *args])})"
            if op.decode is not None:
                decode_args = ", ".join([*args[:3], "None", "None", *args[3:]])
                call = f"{region_classes[node]}Decode.apply({decode_args}) if {region_classes[node]}Decode.applies(N) else {call}"
            w.line(f"{names[node]}, {names[node]}_lse = {call}", ir=ir_line)
            continue
        for text in _lower_node(node, names, w, grids, captured_names):
            w.line(text, ir=ir_line)
    decoded = _decoded_region(graph)
    if decoded is not None:
        w.indent = 0
        w.line()
        w.line()
        w.line(f"def decode({', '.join(['q', 'k', 'v', 'kv_lengths', 'page_table', *captured])}):")
        w.indent = 1
        w.line('"""attention(q, k, v) of each sequence b over its first kv_lengths[b] keys (a KV cache);')
        w.line('with page_table, k and v are pages [num_pages, page_size, Hkv, *] read through it."""')
        args = ", ".join(["q", "k", "v", "kv_lengths", "page_table", *captured])
        w.line(f"return {region_classes[decoded]}Decode.apply({args})")

    source = w.text()
    captured_names.check(python_names(source))
    return GeneratedSource(source, "attention", w.line_map, name)


def attach(module, graph: Graph) -> None:
    """Give each decode class of a loaded module its region's CPU decoding kernel (``cpu_decode``), once."""
    regions = graph.nodes_of(ops.FlashAttention)
    ir_names = value_names(graph)
    for index, node in enumerate(regions):
        decode_class = getattr(module, f"FlashAttention{index if len(regions) > 1 else ''}Decode", None)
        if decode_class is not None and decode_class.native is None:
            decode_class.native = native_decode(node, format_node(node, ir_names))


def _decoded_region(graph: Graph):
    """The region if the graph is one region with a decode schedule applied to q, k, v and the captured tensors."""
    regions = graph.nodes_of(ops.FlashAttention)
    if len(regions) != 1 or regions[0].op.decode is None:
        return None
    region, outputs = regions[0], graph.output.inputs
    if region.inputs != (graph.input("q"), graph.input("k"), graph.input("v"), *graph.captured):
        return None
    return region if outputs[0] is region and isinstance(outputs[1].op, ops.LseOf) else None


def _grouped_matmul(a: str, c: str, op: ops.Matmul) -> str:
    """a [B, H, n, x] times c [B, H / g, ...] with head h reading c's head h // g, without repeating c."""
    other = f"{c}.float().transpose(-1, -2)" if op.transpose_b else f"{c}.float()"
    if op.kv_groups == 1:
        return f"torch.matmul({a}.float(), {other})"
    g = op.kv_groups
    grouped = f"{a}.float().reshape(B, -1, {g}, {a}.shape[2], {a}.shape[3])"
    return f"torch.matmul({grouped}, {other}.unsqueeze(2)).flatten(1, 2)"


def _lower_node(node, names, w: SourceWriter, grids: set[str], captured: CapturedNames) -> list[str]:
    op, out = node.op, names[node]
    args = [names[i] for i in node.inputs]
    if isinstance(op, ops.RepeatKV):
        return [f"{out} = {args[0]}.repeat_interleave({op.groups}, dim=1)"]
    if isinstance(op, ops.Rope):
        freq, pair = op.rope.column_tables(int(node.inputs[0].type.shape[3]))
        index = "q_idx" if op.role == "query" else "kv_idx"
        position = f"_positions(lambda b, {index}: {print_expr(op.position, captured)}, {args[0]})"
        return [f"{out} = _rotate({args[0]}, {position}, {tuple(freq)}, {tuple(pair)})  # RoPE {op.rope}"]
    if isinstance(op, ops.Matmul):
        return [f"{out} = {_grouped_matmul(args[0], args[1], op)}"]
    if isinstance(op, ops.LseOf):
        return [f"{out} = {args[0]}_lse"]
    if isinstance(op, ops.Scale):
        return [f"{out} = {args[0]} * {float(op.factor)!r}"]
    if isinstance(op, ops.Alibi):
        _grid_lines(sympy.Symbol("h") + sympy.Symbol("q_idx") + sympy.Symbol("kv_idx"), w, grids)
        offset = "" if op.alignment == "top_left" else " + (M - N)"
        return [
            f"slope = {print_expr(op.slope, captured)}",
            f"{out} = {args[0]} - slope * (q_idx{offset} - kv_idx).abs()",
        ]
    if isinstance(op, ops.ScoreMod):
        _grid_lines(op.expr, w, grids)
        if not is_tensor(op.expr):
            return [f"{out} = torch.full_like({args[0]}, {print_expr(op.expr, captured)})"]
        return [
            f"score = {args[0]}",
            f"{out} = torch.broadcast_to({print_expr(op.expr, captured)}, score.shape).float()",
        ]
    if isinstance(op, ops.Mask):
        _grid_lines(op.predicate, w, grids)
        keep = print_expr(op.predicate, captured)
        if not is_tensor(op.predicate):
            keep = f"torch.tensor({keep}, device=q.device)"
        return [f"{out} = torch.where({keep}, {args[0]}, float('-inf'))"]
    if isinstance(op, ops.Softmax):
        exp = "torch.exp2" if op.exp2 else "torch.exp"
        return [
            f"row_max = {args[0]}.amax(dim=-1, keepdim=True)",
            "row_max = torch.where(row_max == float('-inf'), 0.0, row_max)  # a fully masked row gives zeros",
            f"weights = {exp}({args[0]} - row_max)",
            "total = weights.sum(dim=-1, keepdim=True)",
            f"{out} = weights / torch.where(total == 0, 1.0, total)",
        ]
    if isinstance(op, ops.LogSumExp):
        units = f"{args[0]} * {math.log(2)!r}" if op.exp2 else args[0]
        return [f"{out} = torch.logsumexp({units}, dim=-1)"]
    raise NotImplementedError(f"the pytorch backend has no lowering for {op.name}")
