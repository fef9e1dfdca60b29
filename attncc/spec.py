"""AttentionSpec: what an attention layer computes, validated field by field."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from attncc.errors import SpecError
from attncc.frontend.mod import TracedMod
from attncc.ir.rope import RoPE

CAUSAL_VALUES = (False, True, "bottom_right", "top_left")
# Caps far above any model (128 heads, head dims of 576 at most), so that checking a spec and
# listing the allowed values stay cheap whatever a spec file says.
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
KINDS = ("softmax", "linear")
LINEAR_EPS = 1e-6

Mod = Callable | TracedMod | None


def _positive_int(field: str, value, largest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise SpecError(f"{field}={value!r} is invalid: a positive integer is allowed")
    if value > largest:
        raise SpecError(f"{field}={value} is invalid: at most {largest} is allowed")
    return int(value)


def _finite_float(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SpecError(f"{field}={value!r} is invalid: a finite number is allowed")
    return float(value)


@dataclass(frozen=True)
class AttentionSpec:
    """One attention layer.

    ``causal``: False, True (= "bottom_right": query i sees key j iff j <= i + M - N),
    or "top_left" (j <= i). ``window=(left, right)``: query i sees keys from
    i + off - left to i + off + right, off = M - N (bottom-right) or 0 (top-left,
    when causal="top_left"); None on a side means unbounded. ``softcap``: scores
    become softcap * tanh(score / softcap) after ``score_mod``. ``alibi``: add
    -slope(h) * |i + off - j| with the standard slopes for ``num_heads`` heads.
    ``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)``
    follow FlexAttention. ``rope``: an ``attncc.RoPE`` (or a mapping of its fields)
    rotating q and k; key j sits at position j and query i at M - N + i, unless
    the call passes ``q_positions`` / ``kv_positions``.
    Head counts are at most ``MAX_HEADS`` and head dims at most ``MAX_HEAD_DIM`` (4096 each).

    ``kind="linear"``: linear attention (docs/semantics.md), o_i = sum_j a_ij v_j with
    a_ij = scale * phi(q_i) . phi(k_j) over the visible keys, divided by
    sum_j a_ij + ``eps`` when ``normalize``. ``feature_map`` is ``"elu+1"`` (default),
    ``"relu"``, ``"identity"`` or an element-wise callable ``phi(x)``; ``eps`` defaults
    to 1e-6. Linear attention takes ``causal`` False or bottom-right, no window,
    softcap, alibi, rope or mods.
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    v_head_dim: int | None = None
    scale: float | None = None
    causal: bool | str = False
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    alibi: bool = False
    score_mod: Mod = None
    mask_mod: Mod = None
    rope: RoPE | None = None
    kind: str = "softmax"
    feature_map: str | Callable | TracedMod | None = None
    normalize: bool = True
    eps: float | None = None

    def __post_init__(self):
        self._set("num_heads", _positive_int("num_heads", self.num_heads, MAX_HEADS))
        self._set("head_dim", _positive_int("head_dim", self.head_dim, MAX_HEAD_DIM))
        kv_heads = (
            self.num_heads if self.num_kv_heads is None else _positive_int("num_kv_heads", self.num_kv_heads, MAX_HEADS)
        )
        if self.num_heads % kv_heads:
            raise SpecError(
                f"num_kv_heads={kv_heads} is invalid: num_heads={self.num_heads} must be a multiple of it "
                f"(allowed: {', '.join(str(d) for d in _divisors(self.num_heads))})"
            )
        self._set("num_kv_heads", kv_heads)
        v_dim = self.head_dim if self.v_head_dim is None else _positive_int("v_head_dim", self.v_head_dim, MAX_HEAD_DIM)
        self._set("v_head_dim", v_dim)
        if self.scale is not None:
            self._set("scale", _finite_float("scale", self.scale))
        if self.causal not in CAUSAL_VALUES or (isinstance(self.causal, int) and not isinstance(self.causal, bool)):
            raise SpecError(f"causal={self.causal!r} is invalid: allowed are False, True, 'bottom_right', 'top_left'")
        if self.window is not None:
            self._set("window", _window(self.window))
        if self.softcap is not None:
            cap = _finite_float("softcap", self.softcap)
            if cap <= 0:
                raise SpecError(f"softcap={self.softcap!r} is invalid: a positive number is allowed (or None)")
            self._set("softcap", cap)
        if not isinstance(self.alibi, bool):
            raise SpecError(f"alibi={self.alibi!r} is invalid: True or False is allowed")
        if self.rope is not None:
            rope = RoPE.from_dict(self.rope) if isinstance(self.rope, dict) else self.rope
            if not isinstance(rope, RoPE):
                raise SpecError(f"rope={self.rope!r} is invalid: an attncc.RoPE, a mapping of its fields or None")
            rope.check_head_dim(self.head_dim)
            self._set("rope", rope)
        for field in ("score_mod", "mask_mod"):
            mod = getattr(self, field)
            if mod is not None and not callable(mod) and not isinstance(mod, TracedMod):
                raise SpecError(f"{field}={mod!r} is invalid: a callable, a TracedMod or None is allowed")
        if self.kind not in KINDS:
            raise SpecError(f"kind={self.kind!r} is invalid: allowed are {', '.join(repr(k) for k in KINDS)}")
        if not isinstance(self.normalize, bool):
            raise SpecError(f"normalize={self.normalize!r} is invalid: True or False is allowed")
        if self.kind == "linear":
            self._check_linear()
        else:
            for field, default in (("feature_map", None), ("normalize", True), ("eps", None)):
                if getattr(self, field) != default:
                    raise SpecError(
                        f"{field}={getattr(self, field)!r} is invalid for kind='softmax': it needs kind='linear'"
                    )

    def _check_linear(self) -> None:
        from attncc.frontend.feature_map import feature_map_name

        if self.causal == "top_left":
            raise SpecError("causal='top_left' is invalid for kind='linear': allowed are False, True, 'bottom_right'")
        unsupported = {"window": None, "softcap": None, "alibi": False, "score_mod": None, "mask_mod": None, "rope": None}
        for field, default in unsupported.items():
            if getattr(self, field) != default:
                raise SpecError(
                    f"{field}={getattr(self, field)!r} is invalid for kind='linear': linear attention takes "
                    "feature_map, normalize, eps, scale and causal (False or bottom-right)"
                )
        self._set("feature_map", "elu+1" if self.feature_map is None else self.feature_map)
        feature_map_name(self.feature_map)
        eps = LINEAR_EPS if self.eps is None else _finite_float("eps", self.eps)
        if eps < 0:
            raise SpecError(f"eps={self.eps!r} is invalid: a number >= 0 is allowed")
        self._set("eps", eps)

    def _set(self, field: str, value) -> None:
        object.__setattr__(self, field, value)  # the dataclass is frozen; normalise fields once

    @property
    def groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def alignment(self) -> str:
        """Where causal masks and windows align when N != M."""
        return "top_left" if self.causal == "top_left" else "bottom_right"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, where: str = "AttentionSpec") -> AttentionSpec:
        """Build from a mapping, naming any unknown field and the allowed ones."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise SpecError(f"{where}: unknown field {unknown[0]!r}; allowed fields: {', '.join(cls.field_names())}")
        if "num_heads" not in values or "head_dim" not in values:
            missing = "num_heads" if "num_heads" not in values else "head_dim"
            raise SpecError(f"{where}: field {missing!r} is required")
        return cls(**values)

    def replace(self, **changes) -> AttentionSpec:
        return dataclasses.replace(self, **changes)


def _window(window) -> tuple[int | None, int | None]:
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise SpecError(f"window={window!r} is invalid: a pair (left, right) of non-negative integers or None")
    sides = []
    for side, value in zip(("left", "right"), window):
        if value is None:
            sides.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise SpecError(
                f"window {side}={value!r} is invalid: a non-negative integer (or None for unbounded) is allowed"
            )
        sides.append(int(value))
    if sides == [None, None]:
        raise SpecError("window=(None, None) is invalid: bound at least one side, or leave window unset")
    return tuple(sides)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
