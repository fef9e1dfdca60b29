"""The ops of the attention IR, declared as typed dataclasses.

Each op names itself, holds typed attributes (never a free-form dict) and infers the
type of its result from the types of its inputs, raising ``IRError`` when they do not
fit. The unoptimized graph uses the textbook ops below; passes add fused region ops.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import ClassVar

import sympy

from attncc.errors import AttnccError, IRError
from attncc.ir.expr import (
    INDEX_SYMBOLS,
    LENGTH_SYMBOLS,
    captured_names,
    feature,
    free_symbol_names,
    is_boolean,
    kv_idx,
    q_idx,
    score,
)
from attncc.ir.rope import RoPE
from attncc.ir.schedule import DecodeSchedule, TileSchedule
from attncc.ir.types import M, N, TensorType

ALIGNMENTS = ("bottom_right", "top_left")
LINEAR_FORMS = ("parallel", "chunked")


class Op:
    """Base of all ops. Subclasses are frozen dataclasses whose fields are the attributes."""

    name: ClassVar[str]

    def attributes(self) -> dict:
        """The attributes to print: every field without a default, and those that differ from it."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.default is MISSING or getattr(self, f.name) != f.default
        }

    def infer_type(self, inputs: list[TensorType]) -> TensorType | None:
        raise NotImplementedError(type(self).__name__)

    def captured_inputs(self) -> set[str]:
        """Names of the captured tensors this op reads (its inputs after the first)."""
        return set()


def _expect_arity(op: Op, inputs: list, count: int):
    if len(inputs) != count:
        raise IRError(f"{op.name} takes {count} inputs, got {len(inputs)}")


def _expect_float_scores(op: Op, scores: TensorType):
    if scores.rank != 4 or scores.dtype != "f32":
        raise IRError(f"{op.name} expects f32 scores [B, H, N, M], got {scores}")


def _check_expression(op: Op, expr, allowed: set[str]):
    unknown = free_symbol_names(expr) - allowed
    if unknown:
        raise IRError(f"{op.name} expression {expr} uses unknown symbols {sorted(unknown)}")


_INDEX_NAMES = {str(s) for s in (*INDEX_SYMBOLS, *LENGTH_SYMBOLS)}
# What a RoPE position may read: the batch index, the lengths and its own sequence index.
POSITION_NAMES = {"query": {"b", "N", "M", "q_idx"}, "key": {"b", "N", "M", "kv_idx"}}


def _check_rope(op: Op, rope, positions: dict, head_dim) -> None:
    if not isinstance(rope, RoPE):
        raise IRError(f"{op.name} needs a RoPE attribute, got {rope!r}")
    if not head_dim.is_Integer:
        raise IRError(f"{op.name} needs a constant head dim, got {head_dim}")
    try:
        rope.rotated_columns(int(head_dim))
    except AttnccError as exc:
        raise IRError(f"{op.name}: {exc}") from None
    for role, position in positions.items():
        if not isinstance(position, sympy.Expr) or position.is_integer is not True:
            raise IRError(f"{op.name} {role} position {position} is not an integer expression")
        _check_expression(op, position, POSITION_NAMES[role])


@dataclass(frozen=True)
class Input(Op):
    """A runtime input: the query, key, value, or a captured tensor of a mod."""

    name: ClassVar[str] = "input"
    label: str
    role: str
    type: TensorType

    def __post_init__(self):
        if self.role not in ("query", "key", "value", "captured"):
            raise IRError(f"input role {self.role!r} is not query, key, value or captured")

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 0)
        return self.type


@dataclass(frozen=True)
class RepeatKV(Op):
    """Repeat each KV head ``groups`` times along the head axis (Llama's repeat_kv)."""

    name: ClassVar[str] = "repeat_kv"
    groups: int

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 1)
        (x,) = inputs
        if x.rank != 4 or self.groups < 1:
            raise IRError(f"repeat_kv expects a [B, Hkv, M, D] tensor and groups >= 1, got {x} and {self.groups}")
        b, heads, m, d = x.shape
        return x.with_shape((b, heads * self.groups, m, d))


@dataclass(frozen=True)
class Matmul(Op):
    """Batched matrix product over the last two axes; accumulates in f32.

    With ``kv_groups = g`` the second operand has H / g heads and head ``h`` of the
    first reads head ``h // g`` of the second (grouped-query attention without
    repeating K or V).
    """

    name: ClassVar[str] = "matmul"
    transpose_b: bool
    kv_groups: int = 1

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 2)
        a, c = inputs
        if a.rank != 4 or c.rank != 4 or self.kv_groups < 1:
            raise IRError(f"matmul expects [B, H, *, *] operands and kv_groups >= 1, got {a}, {c}, {self.kv_groups}")
        if a.shape[0] != c.shape[0] or sympy.simplify(a.shape[1] - c.shape[1] * self.kv_groups) != 0:
            raise IRError(f"matmul operands {a} and {c} do not share batch and heads (kv_groups = {self.kv_groups})")
        rows, inner = a.shape[2], a.shape[3]
        c_inner, cols = (c.shape[3], c.shape[2]) if self.transpose_b else (c.shape[2], c.shape[3])
        if sympy.simplify(inner - c_inner) != 0:
            raise IRError(f"matmul inner dimensions differ: {inner} and {c_inner}")
        return TensorType((*a.shape[:2], rows, cols), "f32")


@dataclass(frozen=True)
class Scale(Op):
    """Multiply the scores by a constant factor."""

    name: ClassVar[str] = "scale"
    factor: sympy.Expr

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 1)
        _expect_float_scores(self, inputs[0])
        if not (self.factor.is_number and self.factor.is_real):
            raise IRError(f"scale factor {self.factor} is not a real constant")
        return inputs[0]


@dataclass(frozen=True)
class Rope(Op):
    """Rotate the rows of q (``role = query``) or k (``role = key``) by RoPE (``attncc.ir.rope``).

    Row ``q_idx`` (or ``kv_idx``) of batch ``b`` sits at ``position``, an integer
    expression over b, N, M, its index and captured position tensors. The result is
    float32 (float64 in the reference).
    """

    name: ClassVar[str] = "rope"
    rope: RoPE
    role: str
    position: sympy.Expr

    def captured_inputs(self):
        return captured_names(self.position)

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 1 + len(self.captured_inputs()))
        x = inputs[0]
        if x.rank != 4 or self.role not in POSITION_NAMES:
            raise IRError(f"rope expects a [B, H, L, D] tensor and role query or key, got {x} and {self.role!r}")
        _check_rope(self, self.rope, {self.role: self.position}, x.shape[3])
        return x.with_dtype("f32")


@dataclass(frozen=True)
class Alibi(Op):
    """Add ALiBi's linear bias ``-slope(h) * |q_pos - kv_idx|``, q_pos aligned like causal."""

    name: ClassVar[str] = "alibi"
    slope: sympy.Expr
    alignment: str

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 1)
        _expect_float_scores(self, inputs[0])
        if self.alignment not in ALIGNMENTS:
            raise IRError(f"alibi alignment {self.alignment!r} is not one of {ALIGNMENTS}")
        _check_expression(self, self.slope, {"h"})
        return inputs[0]

    def as_score_mod(self) -> sympy.Expr:
        """The bias as a score expression: ``score - slope(h) * |q_pos - kv_idx|``."""
        position = q_idx if self.alignment == "top_left" else q_idx + M - N
        return score - self.slope * sympy.Abs(position - kv_idx)


@dataclass(frozen=True)
class ScoreMod(Op):
    """Replace each score by ``expr`` over score, b, h, q_idx, kv_idx and captured tensors."""

    name: ClassVar[str] = "score_mod"
    expr: sympy.Expr

    def captured_inputs(self):
        return captured_names(self.expr)

    def infer_type(self, inputs):
        _expect_float_scores(self, inputs[0])
        if is_boolean(self.expr):
            raise IRError(f"score_mod expression {self.expr} is boolean, not a number")
        _check_expression(self, self.expr, _INDEX_NAMES | {str(score)})
        return inputs[0]


@dataclass(frozen=True)
class Mask(Op):
    """Set the scores where ``predicate`` is false to -inf."""

    name: ClassVar[str] = "mask"
    predicate: sympy.Basic

    def captured_inputs(self):
        return captured_names(self.predicate)

    def infer_type(self, inputs):
        _expect_float_scores(self, inputs[0])
        if not is_boolean(self.predicate):
            raise IRError(f"mask predicate {self.predicate} is not boolean")
        _check_expression(self, self.predicate, _INDEX_NAMES)
        return inputs[0]


@dataclass(frozen=True)
class Softmax(Op):
    """Softmax over the key axis; a row without a finite score gives zeros.

    With ``exp2`` the scores are in base-2 units: the weights are 2^s, not e^s.
    """

    name: ClassVar[str] = "softmax"
    exp2: bool = False

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 1)
        _expect_float_scores(self, inputs[0])
        return inputs[0]


@dataclass(frozen=True)
class LogSumExp(Op):
    """Natural-log logsumexp over the key axis; -inf for a row without a finite score.

    With ``exp2`` the scores are in base-2 units; the result is still a natural log.
    """

    name: ClassVar[str] = "logsumexp"
    exp2: bool = False

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 1)
        _expect_float_scores(self, inputs[0])
        return inputs[0].with_shape(inputs[0].shape[:3])


@dataclass(frozen=True)
class FlashAttention(Op):
    """A fused attention region: o = softmax(where(mask, score, -inf)) v, streamed over KV tiles.

    Inputs: q [B, H, N, D], k and v [B, H / groups, M, *], then the captured tensors
    the expressions read. ``score`` is an expression over the raw dot product
    ``score`` = q . k (and b, h, q_idx, kv_idx, captured tensors); with ``exp2`` it is
    in base-2 units. Per query tile of ``block_m`` rows the region keeps a running
    max ``m``, a running sum ``l`` of 2^(s - m) (or e^(s - m)) and an accumulator
    ``acc`` of the weighted values, rescaled whenever ``m`` grows, over KV tiles of
    ``block_n`` keys; then o = acc / l and lse = m + log l. Tile sizes 0 mean
    "not chosen yet" (one tile spans the whole axis). ``num_warps`` and
    ``num_stages`` are launch parameters for GPU targets (0 where unused). The
    ``bwd_*`` fields give the backward kernels tiles, warps and stages of their own
    (0: the forward's). ``fused_kernel`` (pytorch target) names the platform's fused
    attention kernel that computes the region exactly ("dense", "causal_top_left", or
    "causal_bottom_right", which holds when N == M), or how it serves other linear
    scores ("masked": short sequences with the mask as a bias; "band": that, and a band's
    inner query tiles in one call with one bias); "" streams the tiles.
    ``schedule`` (from the sparsity pass) bounds the KV tiles each query tile
    visits and marks those that need no mask (see ``attncc.ir.schedule``).
    With ``rope``, q and k are rotated first (as ``rope`` ops would), the query row
    ``q_idx`` at ``q_position`` and the key ``kv_idx`` at ``kv_position``.
    ``decode`` (from the split-kv pass) says when and how the region decodes:
    query heads of a group packed into one tile, keys split across programs.
    """

    name: ClassVar[str] = "flash_attention"
    groups: int
    score: sympy.Expr
    mask: sympy.Basic
    exp2: bool
    block_m: int = 0
    block_n: int = 0
    num_warps: int = 0
    num_stages: int = 0
    bwd_block_m: int = 0
    bwd_block_n: int = 0
    bwd_num_warps: int = 0
    bwd_num_stages: int = 0
    fused_kernel: str = ""
    schedule: TileSchedule | None = None
    decode: DecodeSchedule | None = None
    rope: RoPE | None = None
    q_position: sympy.Expr | None = None
    kv_position: sympy.Expr | None = None

    def positions(self) -> dict:
        """The RoPE positions by role (query, key); empty without rope."""
        return {} if self.rope is None else {"query": self.q_position, "key": self.kv_position}

    def captured_inputs(self):
        names = captured_names(self.score) | captured_names(self.mask)
        for position in self.positions().values():
            names |= captured_names(position)
        for expr in self.schedule.expressions() if self.schedule else ():
            names |= captured_names(expr)
        return names

    def infer_type(self, inputs):
        if len(inputs) < 3:
            raise IRError(f"flash_attention takes q, k, v and captured tensors, got {len(inputs)} inputs")
        q, k, v = inputs[:3]
        if q.rank != 4 or k.rank != 4 or v.rank != 4 or self.groups < 1:
            raise IRError(f"flash_attention expects 4-D q, k, v and groups >= 1, got {q}, {k}, {v}, {self.groups}")
        if sympy.simplify(q.shape[1] - k.shape[1] * self.groups) != 0 or k.shape[1] != v.shape[1]:
            raise IRError(f"flash_attention heads do not match: q {q}, k {k}, v {v}, groups {self.groups}")
        if q.shape[3] != k.shape[3] or k.shape[2] != v.shape[2] or not (q.shape[0] == k.shape[0] == v.shape[0]):
            raise IRError(f"flash_attention shapes do not fit: q {q}, k {k}, v {v}")
        if is_boolean(self.score) or not is_boolean(self.mask):
            raise IRError(f"flash_attention needs a numeric score and a boolean mask, got {self.score} and {self.mask}")
        _check_expression(self, self.score, _INDEX_NAMES | {str(score)})
        _check_expression(self, self.mask, _INDEX_NAMES)
        for expr in self.schedule.expressions() if self.schedule else ():
            _check_expression(self, expr, _INDEX_NAMES | {"q_first", "q_last"})
        if self.rope is not None:
            _check_rope(self, self.rope, self.positions(), q.shape[3])
        elif self.q_position is not None or self.kv_position is not None:
            raise IRError("flash_attention has RoPE positions but no rope")
        for size in (self.block_m, self.block_n, self.num_warps, self.num_stages):
            if size < 0:
                raise IRError(f"flash_attention tile and launch sizes must be >= 0, got {size}")
        if self.decode is not None and min(self.decode.max_rows, self.decode.min_keys, self.decode.waves) < 1:
            raise IRError(f"flash_attention decode schedule needs positive sizes, got {self.decode}")
        return TensorType((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), "f32")


@dataclass(frozen=True)
class LseOf(Op):
    """The logsumexp (natural log) that a flash_attention region computes alongside o."""

    name: ClassVar[str] = "lse_of"

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 1)
        return inputs[0].with_shape(inputs[0].shape[:3])


@dataclass(frozen=True)
class Output(Op):
    """The graph's results, named."""

    name: ClassVar[str] = "output"
    names: tuple[str, ...]

    def infer_type(self, inputs):
        _expect_arity(self, inputs, len(self.names))
        return None


# --------------------------------------------------------------------------- linear attention

# Bottom-right causality, the mask of causal linear attention: query i sees key j iff j <= i + M - N.
CAUSAL_BOTTOM_RIGHT = sympy.Le(kv_idx, q_idx + M - N)


def _check_feature_map(op: Op, phi) -> None:
    if not isinstance(phi, sympy.Expr) or is_boolean(phi) or phi.atoms(sympy.Indexed):
        raise IRError(f"{op.name} feature map {phi} is not a number expression of x alone")
    _check_expression(op, phi, {str(feature)})


@dataclass(frozen=True)
class FeatureMap(Op):
    """Apply ``phi``, an expression of one element ``x``, to every element of q or k (in f32)."""

    name: ClassVar[str] = "feature_map"
    phi: sympy.Expr

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 1)
        if inputs[0].rank != 4:
            raise IRError(f"feature_map expects a [B, H, L, D] tensor, got {inputs[0]}")
        _check_feature_map(self, self.phi)
        return inputs[0].with_dtype("f32")


@dataclass(frozen=True)
class MaskZero(Op):
    """Set the scores where ``predicate`` is false to 0 (linear attention's mask)."""

    name: ClassVar[str] = "mask_zero"
    predicate: sympy.Basic

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 1)
        _expect_float_scores(self, inputs[0])
        if not is_boolean(self.predicate) or self.predicate.atoms(sympy.Indexed):
            raise IRError(f"mask_zero predicate {self.predicate} is not a boolean of the indices")
        _check_expression(self, self.predicate, _INDEX_NAMES)
        return inputs[0]


@dataclass(frozen=True)
class NormalizeRows(Op):
    """Divide each row by its sum plus ``eps``; a row whose divisor is 0 gives zeros."""

    name: ClassVar[str] = "normalize_rows"
    eps: sympy.Expr

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 1)
        _expect_float_scores(self, inputs[0])
        if not (self.eps.is_number and self.eps.is_real and self.eps >= 0):
            raise IRError(f"normalize_rows eps {self.eps} is not a real constant >= 0")
        return inputs[0]


@dataclass(frozen=True)
class LinearAttention(Op):
    """Linear attention, reassociated: o_i = sum_j a_ij v_j (/ (sum_j a_ij + eps)) in O(N) time.

    a_ij = scale * phi(q_i) . phi(k_j) over the visible keys (all, or j <= i + M - N when
    ``causal``); query head h reads KV head h // ``groups``. ``form``:

    - ``parallel`` (not causal): o = phi(Q) (phi(K)^T [V 1]), one [D, Dv + 1] state per head;
    - ``chunked`` (causal): query chunks of ``chunk`` rows, each against its own ``chunk``
      keys with the causal mask, plus a running state S = sum phi(k) v^T, z = sum phi(k) of
      the keys before them (``chunk = 1`` is the recurrent form of decoding).

    The keys a state summarises may come from an earlier call (``initial_state``); the
    region then reads it as keys before all of its own.
    """

    name: ClassVar[str] = "linear_attention"
    groups: int
    phi: sympy.Expr
    scale: sympy.Expr
    causal: bool
    normalize: bool
    eps: sympy.Expr
    form: str
    chunk: int = 0

    def infer_type(self, inputs):
        _expect_arity(self, inputs, 3)
        q, k, v = inputs
        if q.rank != 4 or k.rank != 4 or v.rank != 4 or self.groups < 1:
            raise IRError(f"linear_attention expects 4-D q, k, v and groups >= 1, got {q}, {k}, {v}, {self.groups}")
        if sympy.simplify(q.shape[1] - k.shape[1] * self.groups) != 0 or k.shape[1] != v.shape[1]:
            raise IRError(f"linear_attention heads do not match: q {q}, k {k}, v {v}, groups {self.groups}")
        if q.shape[3] != k.shape[3] or k.shape[2] != v.shape[2] or not (q.shape[0] == k.shape[0] == v.shape[0]):
            raise IRError(f"linear_attention shapes do not fit: q {q}, k {k}, v {v}")
        _check_feature_map(self, self.phi)
        if self.form not in LINEAR_FORMS or (self.form == "chunked") != self.causal:
            raise IRError(f"linear_attention form {self.form!r} does not fit causal={self.causal}: parallel or chunked")
        if self.form == "chunked" and self.chunk < 1:
            raise IRError(f"linear_attention chunked form needs chunk >= 1, got {self.chunk}")
        for label, value in (("scale", self.scale), ("eps", self.eps)):
            if not (value.is_number and value.is_real and value >= 0):
                raise IRError(f"linear_attention {label} {value} is not a real constant >= 0")
        return TensorType((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), "f32")
