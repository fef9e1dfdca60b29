"""The reference interpreter: evaluates any graph densely in float64. It defines the meaning.

It shares no code with the backends: expressions are evaluated by walking the sympy
tree with torch operations, so a backend's printer is checked against an
independent evaluation.
"""

from __future__ import annotations

import math

import sympy
import torch
from sympy.codegen.cfunctions import expm1, log1p

from attncc.errors import InputError
from attncc.ir import ops
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
    b,
    h,
    kv_idx,
    q_idx,
)
from attncc.ir.graph import Graph
from attncc.ir.types import M, N

REAL = torch.float64


def _tensor(value):
    """Python numbers become 0-d tensors: floats as float64 so nothing drops to float32.

    An integer beyond int64 becomes the nearest float64, as the backends print it.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool):
        return torch.tensor(value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return torch.tensor(value, dtype=torch.int64)
    return torch.tensor(value, dtype=REAL)


def _real(value):
    value = _tensor(value)
    return value if value.is_floating_point() else value.to(REAL)


def _unary(fn):
    return lambda x: fn(_real(x))


def _snap(x):
    """Values within float64 rounding of an integer are that integer.

    The reference computes transcendental functions in float64; where the exact
    result is an integer (T5's bucket 8 log(64/8) / log(16) = 6), float64 can land a
    hair below it, and floor would be off by one from the mathematical value.
    """
    nearest = torch.round(x)
    return torch.where((x - nearest).abs() <= 1e-12 * nearest.abs().clamp(min=1.0), nearest, x)


def _floor(x):
    x = _tensor(x)
    return x if not x.is_floating_point() else torch.floor(_snap(x)).to(torch.int64)


def _ceiling(x):
    x = _tensor(x)
    return x if not x.is_floating_point() else torch.ceil(_snap(x)).to(torch.int64)


def _pow(base, exponent):
    base, exponent = _tensor(base), _tensor(exponent)
    if not base.is_floating_point() and (exponent.is_floating_point() or bool((exponent < 0).any())):
        base = base.to(REAL)
    return torch.pow(base, exponent)


def _reduce(fn, args):
    result = _tensor(args[0])
    for arg in args[1:]:
        result = fn(result, _tensor(arg))
    return result


def _piecewise(pieces):
    (value, _), *rest = pieces[::-1]
    result = _tensor(value)
    for value, condition in rest:
        result = torch.where(_tensor(condition), _tensor(value), result)
    return result


_FUNCTIONS = {
    sympy.exp: _unary(torch.exp),
    sympy.log: _unary(torch.log),
    sympy.tanh: _unary(torch.tanh),
    sympy.Abs: lambda x: torch.abs(_tensor(x)),
    sympy.floor: _floor,
    sympy.ceiling: _ceiling,
    FloorDiv: lambda x, y: torch.div(_tensor(x), _tensor(y), rounding_mode="floor"),
    sympy.Mod: lambda x, y: torch.remainder(_tensor(x), _tensor(y)),
    sympy.sin: _unary(torch.sin),
    sympy.cos: _unary(torch.cos),
    sympy.tan: _unary(torch.tan),
    sympy.asin: _unary(torch.asin),
    sympy.acos: _unary(torch.acos),
    sympy.atan: _unary(torch.atan),
    sympy.sinh: _unary(torch.sinh),
    sympy.cosh: _unary(torch.cosh),
    sympy.erf: _unary(torch.erf),
    expm1: _unary(torch.expm1),
    log1p: _unary(torch.log1p),
    sympy.sign: lambda x: torch.sign(_tensor(x)),
    Trunc: lambda x: torch.trunc(_tensor(x)),
    RoundHalfEven: lambda x: torch.round(_tensor(x)),
    FMod: lambda x, y: torch.fmod(_tensor(x), _tensor(y)),
    BitAnd: lambda x, y: torch.bitwise_and(_tensor(x), _tensor(y)),
    BitOr: lambda x, y: torch.bitwise_or(_tensor(x), _tensor(y)),
    BitXor: lambda x, y: torch.bitwise_xor(_tensor(x), _tensor(y)),
    LeftShift: lambda x, y: torch.bitwise_left_shift(_tensor(x), _tensor(y)),
    RightShift: lambda x, y: torch.bitwise_right_shift(_tensor(x), _tensor(y)),
    BitNot: lambda x: torch.bitwise_not(_tensor(x)),
}
_RELATIONS = {
    sympy.Lt: torch.lt, sympy.Le: torch.le, sympy.Gt: torch.gt,
    sympy.Ge: torch.ge, sympy.Eq: torch.eq, sympy.Ne: torch.ne,
}  # fmt: skip


def evaluate(expr, env: dict, captured: dict):
    """Evaluate an IR expression with torch; ``env`` maps symbol names to values (broadcastable)."""

    def ev(e):
        if e.is_Symbol:
            return env[e.name]
        if e.is_Integer:
            return int(e)
        if e is sympy.true or e is sympy.false:
            return bool(e)
        if e in (sympy.oo, -sympy.oo):
            return float(e)
        if e.is_Number or e.is_NumberSymbol:
            return float(e)
        if isinstance(e, sympy.Indexed):
            indices = tuple(_tensor(ev(i)) for i in e.indices)
            return captured[str(e.base.label)][indices]
        if isinstance(e, sympy.Add):
            return _reduce(torch.add, [ev(a) for a in e.args])
        if isinstance(e, sympy.Mul):
            return _reduce(torch.mul, [ev(a) for a in e.args])
        if isinstance(e, sympy.Pow):
            return _pow(ev(e.base), ev(e.exp))
        if isinstance(e, sympy.Min):
            return _reduce(torch.minimum, [ev(a) for a in e.args])
        if isinstance(e, sympy.Max):
            return _reduce(torch.maximum, [ev(a) for a in e.args])
        if isinstance(e, sympy.Piecewise):
            return _piecewise([(ev(value), ev(cond)) for value, cond in e.args])
        if isinstance(e, sympy.And):
            return _reduce(torch.logical_and, [ev(a) for a in e.args])
        if isinstance(e, sympy.Or):
            return _reduce(torch.logical_or, [ev(a) for a in e.args])
        if isinstance(e, sympy.Xor):
            return _reduce(torch.logical_xor, [ev(a) for a in e.args])
        if isinstance(e, sympy.Not):
            return torch.logical_not(_tensor(ev(e.args[0])))
        if type(e) in _RELATIONS:
            return _RELATIONS[type(e)](_tensor(ev(e.lhs)), _tensor(ev(e.rhs)))
        if e.func in _FUNCTIONS:
            return _FUNCTIONS[e.func](*[ev(a) for a in e.args])
        raise NotImplementedError(f"the reference interpreter cannot evaluate {type(e).__name__}: {e}")

    return ev(expr)


def index_grids(batch: int, heads: int, n: int, m: int, device) -> dict:
    """The index symbols as broadcastable [B, H, N, M] grids, and the lengths as ints."""
    arange = lambda size: torch.arange(size, device=device)  # noqa: E731
    return {
        str(b): arange(batch).view(-1, 1, 1, 1),
        str(h): arange(heads).view(1, -1, 1, 1),
        str(q_idx): arange(n).view(1, 1, -1, 1),
        str(kv_idx): arange(m).view(1, 1, 1, -1),
        str(N): n,
        str(M): m,
    }


def _softmax(scores, exp2: bool):
    if exp2:
        scores = scores * math.log(2)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == -math.inf, 0.0, row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total == 0, 1.0, total)


def _logsumexp(scores, exp2: bool):
    return torch.logsumexp(scores * math.log(2) if exp2 else scores, dim=-1)


def rotate(x, rope, position, role: str, lengths: tuple[int, int], captured: dict):
    """RoPE of x [B, H, L, D] in float64, row l of batch b at ``position`` (the ``rope`` op's meaning)."""
    batch, _, length, head_dim = x.shape
    index = torch.arange(length, device=x.device).view(1, -1)
    env = {"b": torch.arange(batch, device=x.device).view(-1, 1), "N": lengths[0], "M": lengths[1],
           "q_idx" if role == "query" else "kv_idx": index}  # fmt: skip
    positions = torch.broadcast_to(_tensor(evaluate(position, env, captured)), (batch, length))
    dim = rope.rotated_columns(head_dim)
    inv_freq = torch.tensor(rope.inverse_frequencies(head_dim), dtype=REAL, device=x.device)
    angle = (positions.to(REAL)[..., None] * inv_freq)[:, None]  # [B, 1, L, dim / 2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    pairs = x[..., :dim].unflatten(-1, (-1, 2) if rope.interleaved else (2, -1))
    first, second = pairs.unbind(-1 if rope.interleaved else -2)
    turned = (first * cos - second * sin, second * cos + first * sin)
    rotated = torch.stack(turned, -1 if rope.interleaved else -2).flatten(-2)
    return torch.cat((rotated, x[..., dim:]), dim=-1)


def _grouped(kv, groups: int):
    return kv.repeat_interleave(groups, dim=1) if groups > 1 else kv


def _flash_attention(op, q, k, v, grids: dict, captured: dict):
    """Run the region's schedule literally: query tiles, KV tiles, online softmax, in float64.

    With a tile schedule, KV tiles outside a query tile's bounds are skipped and tiles
    the schedule calls full are not masked, so an unsound schedule changes the result.
    When the decode schedule applies, every KV tile is a split of its own and the
    splits' (o, lse) are merged, the finest split a backend may choose.
    """
    n, m = q.shape[2], k.shape[2]
    if op.rope is not None:
        q = rotate(q, op.rope, op.q_position, "query", (n, m), captured)
        k = rotate(k, op.rope, op.kv_position, "key", (n, m), captured)
    k, v = _grouped(k, op.groups), _grouped(v, op.groups)
    block_m, block_n = op.block_m or n, op.block_n or m
    power = (lambda x: torch.exp2(x)) if op.exp2 else torch.exp
    schedule = op.schedule
    decoding = op.decode is not None and op.decode.applies(op.groups * n)
    o = torch.zeros(*q.shape[:3], v.shape[3], dtype=REAL, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=REAL, device=q.device)
    for r0 in range(0, n, block_m):
        rows = slice(r0, min(n, r0 + block_m))
        if schedule is not None:
            at_tile = {**grids, "q_first": rows.start, "q_last": rows.stop - 1}
            lo, hi, full_lo, full_hi = (_tensor(evaluate(e, at_tile, captured)) for e in schedule.expressions()[:4])
        row_max = torch.full(q[:, :, rows, 0].shape, -math.inf, dtype=REAL, device=q.device)
        total = torch.zeros_like(row_max)
        acc = torch.zeros(*row_max.shape, v.shape[3], dtype=REAL, device=q.device)
        splits = []
        for c0 in range(0, m, block_n):
            cols = slice(c0, min(m, c0 + block_n))
            tile = {**grids, "q_idx": grids["q_idx"][:, :, rows], "kv_idx": grids["kv_idx"][..., cols]}
            scores = q[:, :, rows] @ k[:, :, cols].transpose(-1, -2)
            scores = _real(evaluate(op.score, {**tile, "score": scores}, captured)).expand_as(scores)
            keep = _tensor(evaluate(op.mask, tile, captured))
            if schedule is not None:
                visited = (cols.start < hi) & (cols.stop > lo)
                full = (cols.start >= full_lo) & (cols.stop <= full_hi)
                if schedule.residual is not sympy.true:
                    full = full & torch.broadcast_to(keep, scores.shape).flatten(2).all(-1)[..., None, None]
                keep = torch.where(full, True, keep) & visited
            scores = torch.where(keep, scores, -math.inf)
            if decoding:
                splits.append((_softmax(scores, op.exp2) @ v[:, :, cols], _logsumexp(scores, op.exp2)))
                continue
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            safe_max = torch.where(new_max == -math.inf, 0.0, new_max)
            weights = power(scores - safe_max.unsqueeze(-1))
            rescale = power(row_max - safe_max)
            total = total * rescale + weights.sum(dim=-1)
            acc = acc * rescale.unsqueeze(-1) + weights @ v[:, :, cols]
            row_max = new_max
        if decoding:
            o[:, :, rows], lse[:, :, rows] = _merge_splits(splits)
            continue
        safe_max = torch.where(row_max == -math.inf, 0.0, row_max)
        o[:, :, rows] = acc / torch.where(total == 0, 1.0, total).unsqueeze(-1)
        log_total = torch.log2(total) if op.exp2 else torch.log(total)
        lse[:, :, rows] = (safe_max + log_total) * (math.log(2) if op.exp2 else 1.0)
    return o, lse


def _feature_map(phi, x):
    return _real(evaluate(phi, {"x": x}, {})).expand_as(x)


def _normalize_rows(a, eps):
    total = a.sum(dim=-1, keepdim=True) + eps
    return torch.where(total == 0, 0.0, a / torch.where(total == 0, 1.0, total))


def run_linear_region(op: ops.LinearAttention, q, k, v, state=None):
    """Run a linear_attention region's form literally in float64: (o, (kv, k_sum)).

    ``state`` is (kv [B, Hkv, D, Dv], k_sum [B, Hkv, D]) summarising keys before these (or
    None: none); the result's state summarises those and all of k, v. The chunked form
    walks query chunks in order, each with its own keys under the causal mask and the
    state of the keys before them.
    """
    q, k, v = q.to(REAL), k.to(REAL), v.to(REAL)
    batch, kv_heads, m, dv = v.shape
    n = q.shape[2]
    phi_q, phi_k = _feature_map(op.phi, q), _feature_map(op.phi, k)
    values = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [V 1]: numerator and denominator at once
    if state is None:
        carried = torch.zeros(batch, kv_heads, k.shape[3], dv + 1, dtype=REAL, device=q.device)
    else:
        carried = torch.cat([state[0].to(REAL), state[1].to(REAL).unsqueeze(-1)], dim=-1)
    scale = float(op.scale)

    def read(rows, summary):  # scale * phi(q) . (state), each query head reading its KV head
        return scale * phi_q[:, :, rows] @ _grouped(summary, op.groups)

    if op.form == "parallel":
        carried = carried + phi_k.transpose(-1, -2) @ values
        out = read(slice(0, n), carried)
    else:
        out = torch.zeros(*q.shape[:3], dv + 1, dtype=REAL, device=q.device)
        offset = m - n  # query i sits at key position i + M - N
        lead, first = max(offset, 0), max(-offset, 0)
        carried = carried + phi_k[:, :, :lead].transpose(-1, -2) @ values[:, :, :lead]
        out[:, :, :first] = read(slice(0, first), carried)
        for r0 in range(first, n, op.chunk):
            rows = slice(r0, min(n, r0 + op.chunk))
            keys = slice(rows.start + offset, rows.stop + offset)
            size = rows.stop - rows.start
            causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
            a = (phi_q[:, :, rows] @ _grouped(phi_k[:, :, keys], op.groups).transpose(-1, -2)) * causal
            out[:, :, rows] = scale * a @ _grouped(values[:, :, keys], op.groups) + read(rows, carried)
            carried = carried + phi_k[:, :, keys].transpose(-1, -2) @ values[:, :, keys]
    numerator, denominator = out[..., :dv], out[..., dv:]
    if op.normalize:
        total = denominator + float(op.eps)
        o = torch.where(total == 0, 0.0, numerator / torch.where(total == 0, 1.0, total))
    else:
        o = numerator
    return o, (carried[..., :dv], carried[..., dv])
def _merge_splits(splits):
    """(o, lse) over the union of the splits' keys from each split's (o, lse), in float64; see attncc.merge."""
    lses = torch.stack([lse for _, lse in splits])
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.where(lses == -math.inf, 0.0, torch.exp(lses - torch.where(lse == -math.inf, 0.0, lse)))
    return sum(w.unsqueeze(-1) * part for w, (part, _) in zip(weights, splits)), lse


def run_reference(graph: Graph, q, k, v, captured: dict | None = None) -> dict:
    """Evaluate the graph in float64; returns its outputs by name (``o`` and ``lse``, or ``o`` for linear attention)."""
    captured = {name: (t.to(REAL) if t.is_floating_point() else t) for name, t in (captured or {}).items()}
    for node in graph.captured:
        if node.op.label not in captured:
            raise InputError(f"captured tensor {node.op.label!r} has no value; pass it by name")
    inputs = {"query": q.to(REAL), "key": k.to(REAL), "value": v.to(REAL)}
    batch, heads, n, _ = q.shape
    grids = index_grids(batch, heads, n, k.shape[2], q.device)
    values, regions = {}, {}
    for node in graph.nodes:
        op, args = node.op, [values.get(i) for i in node.inputs]
        if isinstance(op, ops.Input):
            values[node] = inputs.get(op.role, captured.get(op.label))
        elif isinstance(op, ops.Rope):
            values[node] = rotate(args[0], op.rope, op.position, op.role, (n, k.shape[2]), captured)
        elif isinstance(op, ops.RepeatKV):
            values[node] = args[0].repeat_interleave(op.groups, dim=1)
        elif isinstance(op, ops.Matmul):
            other = _grouped(args[1], op.kv_groups)
            values[node] = torch.matmul(args[0], other.transpose(-1, -2) if op.transpose_b else other)
        elif isinstance(op, ops.Scale):
            values[node] = args[0] * float(op.factor)
        elif isinstance(op, ops.Alibi):
            offset = 0 if op.alignment == "top_left" else grids["M"] - grids["N"]
            slope = _real(evaluate(op.slope, grids, captured))
            distance = (grids["q_idx"] + offset - grids["kv_idx"]).abs()
            values[node] = args[0] - slope * distance
        elif isinstance(op, ops.ScoreMod):
            result = _real(evaluate(op.expr, {**grids, "score": args[0]}, captured))
            values[node] = result.expand_as(args[0])
        elif isinstance(op, ops.Mask):
            keep = _tensor(evaluate(op.predicate, grids, captured))
            values[node] = torch.where(keep, args[0], -math.inf)
        elif isinstance(op, ops.FeatureMap):
            values[node] = _feature_map(op.phi, args[0])
        elif isinstance(op, ops.MaskZero):
            keep = _tensor(evaluate(op.predicate, grids, captured))
            values[node] = torch.where(keep, args[0], 0.0)
        elif isinstance(op, ops.NormalizeRows):
            values[node] = _normalize_rows(args[0], float(op.eps))
        elif isinstance(op, ops.LinearAttention):
            values[node] = run_linear_region(op, *args)[0]
        elif isinstance(op, ops.Softmax):
            values[node] = _softmax(args[0], op.exp2)
        elif isinstance(op, ops.LogSumExp):
            values[node] = _logsumexp(args[0], op.exp2)
        elif isinstance(op, ops.FlashAttention):
            regions[node] = _flash_attention(op, *args[:3], grids, captured)
            values[node] = regions[node][0]
        elif isinstance(op, ops.LseOf):
            values[node] = regions[node.inputs[0]][1]
        elif isinstance(op, ops.Output):
            return dict(zip(op.names, args))
        else:
            raise NotImplementedError(f"the reference interpreter has no rule for {op.name}")
    raise AssertionError("a verified graph ends with an output node")
