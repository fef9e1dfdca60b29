"""Rotary position embedding (RoPE): its parameters, validated, and the frequencies they mean.

Column pairs ``(x[a], x[c])`` of the first ``rotary_dim`` columns of q and k turn by the
angle ``position * inv_freq[i]``: ``(x[a] cos - x[c] sin, x[c] cos + x[a] sin)``. With
rotate-half pairs (Llama, GPT-NeoX) pair ``i`` is ``(i, i + rotary_dim / 2)``; with
interleaved pairs (GPT-J) it is ``(2i, 2i + 1)``. Columns past ``rotary_dim`` pass
through. ``inv_freq[i] = theta ** (-2i / rotary_dim)``, then scaled as transformers'
``rope_parameters`` say (``ROPE_INIT_FUNCTIONS``): ``linear`` divides every frequency
by ``factor``; ``llama3`` divides the low frequencies by ``factor``, keeps the high ones
and interpolates between them.
"""

from __future__ import annotations

import math
import numbers
import types
from dataclasses import dataclass

from attncc.errors import SpecError

SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
FIELDS = ("theta", "rotary_dim", "interleaved", "scaling")
FLOAT32_MAX = 3.4028234663852886e38


def _real(where: str, value, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SpecError(f"{where}={value!r} is invalid: a finite positive number is allowed")
    if positive and value <= 0:
        raise SpecError(f"{where}={value!r} is invalid: a finite positive number is allowed")
    return float(value)


def _scaling(scaling) -> types.MappingProxyType:
    if not isinstance(scaling, dict) and not isinstance(scaling, types.MappingProxyType):
        raise SpecError(
            f"rope scaling={scaling!r} is invalid: None or a mapping with 'rope_type' "
            f"({', '.join(SCALING_KEYS)}) and its parameters is allowed"
        )
    rope_type = scaling.get("rope_type")
    if not isinstance(rope_type, str) or rope_type not in SCALING_KEYS:
        raise SpecError(
            f"rope scaling rope_type={rope_type!r} is invalid: allowed are {', '.join(map(repr, SCALING_KEYS))}"
        )
    keys = SCALING_KEYS[rope_type]
    unknown = sorted(set(scaling) - {"rope_type", *keys}, key=str)
    if unknown:
        raise SpecError(
            f"rope scaling: unknown key {unknown[0]!r} for rope_type {rope_type!r}; allowed keys: rope_type, "
            + ", ".join(keys)
        )
    missing = [key for key in keys if key not in scaling]
    if missing:
        raise SpecError(f"rope scaling: rope_type {rope_type!r} needs the key {missing[0]!r} (keys: {', '.join(keys)})")
    values = {"rope_type": rope_type}
    for key in keys:
        values[key] = _real(f"rope scaling {key}", scaling[key])
    if rope_type == "llama3" and values["high_freq_factor"] <= values["low_freq_factor"]:
        raise SpecError(
            f"rope scaling high_freq_factor={values['high_freq_factor']!r} is invalid: it must exceed "
            f"low_freq_factor={values['low_freq_factor']!r}"
        )
    return types.MappingProxyType(values)


@dataclass(frozen=True)
class RoPE:
    """Rotary position embedding of q and k (see the module docstring).

    ``theta``: the base (10000 in Llama 2, 500000 in Llama 3). ``rotary_dim``: how
    many leading columns rotate, even (None: the whole head). ``interleaved``: GPT-J's
    pairs (2i, 2i + 1) instead of rotate-half's (i, i + rotary_dim / 2). ``scaling``:
    None, ``{"rope_type": "linear", "factor": f}`` or ``{"rope_type": "llama3",
    "factor": ..., "low_freq_factor": ..., "high_freq_factor": ...,
    "original_max_position_embeddings": ...}``, as in transformers' ``rope_parameters``.
    """

    theta: float = 10000.0
    rotary_dim: int | None = None
    interleaved: bool = False
    scaling: types.MappingProxyType | None = None

    def __post_init__(self):
        object.__setattr__(self, "theta", _real("rope theta", self.theta))
        if self.rotary_dim is not None:
            dim = self.rotary_dim
            if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0 or dim % 2:
                raise SpecError(f"rope rotary_dim={dim!r} is invalid: a positive even integer (or None) is allowed")
            object.__setattr__(self, "rotary_dim", int(dim))
        if not isinstance(self.interleaved, bool):
            raise SpecError(f"rope interleaved={self.interleaved!r} is invalid: True or False is allowed")
        if self.scaling is not None:
            object.__setattr__(self, "scaling", _scaling(self.scaling))

    def __reduce__(self):
        """Copies and pickles rebuild through the constructor (a mappingproxy does not pickle)."""
        scaling = dict(self.scaling) if self.scaling is not None else None
        return RoPE, (self.theta, self.rotary_dim, self.interleaved, scaling)

    def __hash__(self):
        scaling = tuple(self.scaling.items()) if self.scaling is not None else None
        return hash((self.theta, self.rotary_dim, self.interleaved, scaling))

    def __str__(self) -> str:
        parts = [f"theta = {self.theta:g}"]
        if self.rotary_dim is not None:
            parts.append(f"rotary_dim = {self.rotary_dim}")
        if self.interleaved:
            parts.append("interleaved = true")
        if self.scaling is not None:
            parts.append("scaling = {" + ", ".join(f"{k} = {v}" for k, v in self.scaling.items()) + "}")
        return "{" + ", ".join(parts) + "}"

    @classmethod
    def from_dict(cls, values, where: str = "rope") -> RoPE:
        """Build from a mapping (a spec file's ``[attention.rope]`` table), naming unknown keys."""
        if not isinstance(values, dict):
            raise SpecError(f"{where}={values!r} is invalid: a table with keys {', '.join(FIELDS)} is allowed")
        unknown = sorted(set(values) - set(FIELDS), key=str)
        if unknown:
            raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(FIELDS)}")
        try:
            return cls(**values)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}") from None

    def rotated_columns(self, head_dim: int) -> int:
        """How many leading columns of a head of ``head_dim`` rotate; SpecError if rotary_dim does not fit."""
        dim = head_dim if self.rotary_dim is None else self.rotary_dim
        if dim > head_dim or dim % 2:
            raise SpecError(
                f"rope rotary_dim={dim} is invalid for head_dim={head_dim}: an even number of at most head_dim "
                "is allowed"
            )
        return dim

    def check_head_dim(self, head_dim: int) -> None:
        """SpecError unless rotary_dim fits ``head_dim`` and every frequency is a finite float32."""
        largest = max(self.inverse_frequencies(head_dim), default=0.0)
        if largest > FLOAT32_MAX:
            raise SpecError(
                f"rope {self} gives the frequency {largest:.3g}, beyond float32's range (the kernels compute "
                "angles in float32): a theta and a scaling factor that keep frequencies below 3.4e38 are allowed"
            )

    def inverse_frequencies(self, head_dim: int) -> list[float]:
        """``inv_freq[i]`` of pair i (float64), after scaling: ``ROPE_INIT_FUNCTIONS``' meaning."""
        dim = self.rotated_columns(head_dim)
        inv_freq = [self.theta ** (-(2 * i) / dim) for i in range(dim // 2)]
        scaling = self.scaling or {"rope_type": None}
        if scaling["rope_type"] == "linear":
            return [f / scaling["factor"] for f in inv_freq]
        if scaling["rope_type"] == "llama3":
            factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            context = scaling["original_max_position_embeddings"]
            scaled = []
            for f in inv_freq:
                wavelength = 2 * math.pi / f
                if wavelength < context / high:
                    scaled.append(f)
                elif wavelength > context / low:
                    scaled.append(f / factor)
                else:
                    smooth = (context / wavelength - low) / (high - low)
                    scaled.append((1 - smooth) * f / factor + smooth * f)
            return scaled
        return inv_freq

    def column_tables(self, head_dim: int) -> tuple[list[float], list[int]]:
        """Per column d: the signed frequency and the partner column, so that rotated x[d] =
        x[d] cos(pos * freq[d]) + x[partner[d]] sin(pos * freq[d]). Columns that pass through
        have frequency 0 and are their own partner."""
        dim = self.rotated_columns(head_dim)
        inv_freq = self.inverse_frequencies(head_dim)
        freq, partner = [0.0] * head_dim, list(range(head_dim))
        for i, f in enumerate(inv_freq):
            first, second = (2 * i, 2 * i + 1) if self.interleaved else (i, i + dim // 2)
            freq[first], partner[first] = -f, second
            freq[second], partner[second] = f, first
        return freq, partner
