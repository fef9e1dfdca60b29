"""Lower an AttentionSpec to the unoptimized, textbook attention graph."""

from __future__ import annotations

import sympy

from attncc.errors import ModError, SpecError
from attncc.frontend.mod import Captured, TracedMod
from attncc.ir import ops
from attncc.ir.expr import b, captured_names, captured_symbol, h, kv_idx, number, q_idx, score
from attncc.ir.graph import Graph, GraphBuilder
from attncc.ir.types import B, M, N, TensorType
from attncc.spec import AttentionSpec


def trace_mods(spec: AttentionSpec) -> tuple[TracedMod | None, TracedMod | None]:
    """The spec's score_mod and mask_mod as IR expressions (traced if they are callables)."""
    from attncc.frontend.trace import trace_mask_mod, trace_score_mod

    score_mod = None if spec.score_mod is None else trace_score_mod(spec.score_mod)
    mask_mod = None if spec.mask_mod is None else trace_mask_mod(spec.mask_mod)
    return score_mod, mask_mod


def query_offset(spec: AttentionSpec) -> sympy.Expr:
    """How far query i is shifted to line up with the keys: M - N bottom-right, 0 top-left."""
    return sympy.Integer(0) if spec.alignment == "top_left" else M - N


def alibi_slope(num_heads: int) -> sympy.Expr:
    """ALiBi's head slopes (Press et al.) as an expression in h, any number of heads.

    For a power of two n: 2^(-8(h+1)/n). Otherwise the first n = 2^floor(log2 H)
    heads use those, and the rest take every other slope of the 2n sequence.
    """
    n = 2 ** (num_heads.bit_length() - 1)
    base = sympy.Pow(2, -sympy.Rational(8, n) * (h + 1))
    if n == num_heads:
        return base
    extra = sympy.Pow(2, -sympy.Rational(4, n) * (2 * (h - n) + 1))
    return sympy.Piecewise((base, h < n), (extra, True))


def mask_predicate(spec: AttentionSpec, mask_mod: TracedMod | None):
    """The conjunction of causal, window and mask_mod; sympy.true if nothing is masked."""
    position = q_idx + query_offset(spec)
    terms = []
    if spec.causal:
        terms.append(sympy.Le(kv_idx, position))
    if spec.window is not None:
        left, right = spec.window
        if left is not None:
            terms.append(sympy.Ge(kv_idx, position - left))
        if right is not None and not spec.causal:
            terms.append(sympy.Le(kv_idx, position + right))
    if mask_mod is not None:
        terms.append(mask_mod.expr)
    return sympy.And(*terms)


SHARD = Captured("shard", "i64", 1)
_shard = captured_symbol(SHARD.name, SHARD.dtype)


def global_positions(expr):
    """``expr`` over a shard's local positions, reading its global ones from the captured tensor ``shard``.

    ``shard = (first query position, first key position, global N, global M)``: query i
    of the shard is global query ``i + shard[0]``, key j global key ``j + shard[1]``.
    The offsets are runtime values, so every shard runs one compiled program.
    """
    return expr.xreplace({q_idx: q_idx + _shard[0], kv_idx: kv_idx + _shard[1], N: _shard[2], M: _shard[3]})


def merged_captured(*mods: TracedMod | None) -> dict[str, Captured]:
    """The captured tensors of all mods by name; one name must mean one tensor."""
    merged: dict[str, Captured] = {}
    for mod in mods:
        for captured in mod.captured if mod is not None else ():
            known = merged.get(captured.name)
            if known is not None and (known.dtype, known.ndim) != (captured.dtype, captured.ndim):
                raise ModError(
                    f"captured tensor {captured.name!r} is {known.dtype} with {known.ndim} dims in one mod and "
                    f"{captured.dtype} with {captured.ndim} dims in another; rename one of them"
                )
            if known is not None and known.value is not None and captured.value is not None:
                if known.value is not captured.value:
                    raise ModError(
                        f"score_mod and mask_mod capture different tensors under the name {captured.name!r}; "
                        "rename one of them"
                    )
            merged.setdefault(captured.name, captured)
    return merged


# The call-time position tensors of RoPE, [B, N] and [B, M] int64, by the sequence they place.
POSITION_TENSORS = {"q": "q_positions", "kv": "kv_positions"}


def _check_given(given) -> None:
    unknown = sorted(set(given) - set(POSITION_TENSORS), key=str)
    if unknown:
        raise SpecError(f"positions {unknown[0]!r} is invalid: allowed are {', '.join(POSITION_TENSORS)}")


def rope_positions(spec: AttentionSpec, given=()) -> dict[str, sympy.Expr]:
    """The RoPE position of each query and key: bottom-right (query i at M - N + i, key j at j),
    or ``q_positions[b, q_idx]`` / ``kv_positions[b, kv_idx]`` for the sequences in ``given``."""
    _check_given(given)
    if given and spec.rope is None:
        raise SpecError("RoPE positions are given, but the spec has no rope")
    positions = {"q": M - N + q_idx, "kv": kv_idx}
    for role, index in (("q", q_idx), ("kv", kv_idx)):
        if role in given:
            positions[role] = captured_symbol(POSITION_TENSORS[role], "i64")[b, index]
    return positions


def position_captured(given) -> dict[str, Captured]:
    """The captured tensors of the RoPE positions in ``given`` (int64, 2-D)."""
    _check_given(given)
    return {POSITION_TENSORS[role]: Captured(POSITION_TENSORS[role], "i64", 2) for role in sorted(given)}


def captured_type(captured: Captured) -> TensorType:
    shape = sympy.symbols(f"{captured.name}_d0:{captured.ndim}", integer=True, nonnegative=True)
    return TensorType(tuple(shape), captured.dtype)


def sharded_captured(captured: dict[str, Captured]) -> dict[str, Captured]:
    """The captured tensors of a sharded program: the mods' tensors and ``shard``."""
    if SHARD.name in captured:
        raise ModError(
            f"captured tensor name {SHARD.name!r} is reserved for the shard positions of context parallelism; "
            "rename the tensor in the mod"
        )
    return {**captured, SHARD.name: SHARD}


def lower(spec: AttentionSpec, traced: tuple[TracedMod | None, TracedMod | None] | None = None, *,
          sharded: bool = False, given_positions=()) -> Graph:  # fmt: skip
    """The textbook graph: rope, repeat_kv, QK^T, scale, alibi, score_mod, softcap, mask, softmax, PV.

    ``traced`` is the spec's (score_mod, mask_mod) from ``trace_mods`` (traced here if omitted).
    ``sharded``: q and k are shards of longer sequences; masks, ALiBi and mods see global
    positions read from the captured tensor ``shard`` (see ``global_positions``).
    ``given_positions``: the sequences ("q", "kv") whose RoPE positions are call-time tensors.
    """
    score_mod, mask_mod = trace_mods(spec) if traced is None else traced
    positions = global_positions if sharded else (lambda expr: expr)
    captured_tensors = merged_captured(score_mod, mask_mod)
    if sharded:
        captured_tensors = sharded_captured(captured_tensors)
    H, Hkv, D, Dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim
    g = GraphBuilder()
    q = g.input("q", "query", TensorType((B, H, N, D), "T"))
    k = g.input("k", "key", TensorType((B, Hkv, M, D), "T"))
    v = g.input("v", "value", TensorType((B, Hkv, M, Dv), "T"))
    where = rope_positions(spec, given_positions)
    if sharded and spec.rope is not None:
        raise SpecError(
            "a sharded program (context parallelism) with rope is not supported: RoPE would turn q and k by "
            "their positions in the shard; rotate them before the call (as attncc.nn.Attention does)"
        )
    position_inputs = position_captured(given_positions)
    clash = sorted(set(captured_tensors) & set(position_inputs))
    if clash:
        raise ModError(f"captured tensor {clash[0]!r} clashes with the RoPE position tensor of that name; rename it")
    captured_tensors = {**captured_tensors, **position_inputs}
    # In name order, the order in which fused regions take them, so a region can be the whole program.
    captured = {name: g.input(name, "captured", captured_type(c)) for name, c in sorted(captured_tensors.items())}

    if spec.rope is not None:
        q = g.add(ops.Rope(spec.rope, "query", where["q"]), q, *_captured_operands(where["q"], captured))
        k = g.add(ops.Rope(spec.rope, "key", where["kv"]), k, *_captured_operands(where["kv"], captured))

    if spec.groups > 1:
        k = g.add(ops.RepeatKV(spec.groups), k)
        v = g.add(ops.RepeatKV(spec.groups), v)
    s = g.add(ops.Matmul(transpose_b=True), q, k)
    factor = number(spec.scale) if spec.scale is not None else 1 / sympy.sqrt(D)
    s = g.add(ops.Scale(factor), s)
    if spec.alibi and sharded:
        bias = positions(ops.Alibi(alibi_slope(H), spec.alignment).as_score_mod())
        s = g.add(ops.ScoreMod(bias), s, *_captured_operands(bias, captured))
    elif spec.alibi:
        s = g.add(ops.Alibi(alibi_slope(H), spec.alignment), s)
    if score_mod is not None:
        expr = positions(score_mod.expr)
        s = g.add(ops.ScoreMod(expr), s, *_captured_operands(expr, captured))
    if spec.softcap is not None:
        cap = number(spec.softcap)
        s = g.add(ops.ScoreMod(cap * sympy.tanh(score / cap)), s)
    predicate = positions(mask_predicate(spec, mask_mod))
    if predicate is not sympy.true:
        s = g.add(ops.Mask(predicate), s, *_captured_operands(predicate, captured))
    p = g.add(ops.Softmax(), s)
    lse = g.add(ops.LogSumExp(), s)
    o = g.add(ops.Matmul(transpose_b=False), p, v)
    return g.finish({"o": o, "lse": lse})


def _captured_operands(expr, captured: dict) -> list:
    return [captured[name] for name in sorted(captured_names(expr))]


def lower_linear(spec: AttentionSpec, phi: sympy.Expr) -> Graph:
    """Linear attention's quadratic graph, its meaning: feature maps, QK^T, scale, mask by zero, normalise, AV.

    ``phi`` is the feature map as an expression of ``x`` (``feature_map_expr``).
    """
    H, Hkv, D, Dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim
    g = GraphBuilder()
    q = g.input("q", "query", TensorType((B, H, N, D), "T"))
    k = g.input("k", "key", TensorType((B, Hkv, M, D), "T"))
    v = g.input("v", "value", TensorType((B, Hkv, M, Dv), "T"))
    phi_q = g.add(ops.FeatureMap(phi), q)
    phi_k = g.add(ops.FeatureMap(phi), k)
    if spec.groups > 1:
        phi_k = g.add(ops.RepeatKV(spec.groups), phi_k)
        v = g.add(ops.RepeatKV(spec.groups), v)
    a = g.add(ops.Matmul(transpose_b=True), phi_q, phi_k)
    factor = number(spec.scale) if spec.scale is not None else 1 / sympy.sqrt(D)
    a = g.add(ops.Scale(factor), a)
    if spec.causal:
        a = g.add(ops.MaskZero(ops.CAUSAL_BOTTOM_RIGHT), a)
    if spec.normalize:
        a = g.add(ops.NormalizeRows(number(spec.eps)), a)
    o = g.add(ops.Matmul(transpose_b=False), a, v)
    return g.finish({"o": o})
