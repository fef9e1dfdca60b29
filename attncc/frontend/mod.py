"""A score or mask modification as an IR expression, with the tensors it captures."""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from attncc.ir.expr import kind

TORCH_DTYPE_NAMES = {
    "torch.bool": "bool",
    "torch.uint8": "u8",
    "torch.int8": "i8",
    "torch.int16": "i16",
    "torch.int32": "i32",
    "torch.int64": "i64",
    "torch.float16": "f16",
    "torch.bfloat16": "bf16",
    "torch.float32": "f32",
    "torch.float64": "f64",
}


def ir_dtype(torch_dtype) -> str | None:
    """The IR dtype name of a torch dtype, or None if captured tensors cannot have it."""
    return TORCH_DTYPE_NAMES.get(str(torch_dtype))


@dataclass(frozen=True)
class Captured:
    """A tensor a mod reads: its IR dtype, its rank and, when known, its value.

    ``value`` is None for a tensor declared in a spec file without values: the
    compiled program then takes it as a call argument; ``shape`` is its declared
    shape, if any (validate fills such tensors at random).
    """

    name: str
    dtype: str
    ndim: int
    value: object = field(default=None, compare=False, repr=False)
    shape: tuple[int, ...] | None = field(default=None, compare=False)

    @property
    def is_float(self) -> bool:
        return self.dtype in ("f16", "bf16", "f32", "f64")


@dataclass(frozen=True)
class TracedMod:
    """``expr`` is a number (score_mod) or a predicate (mask_mod) over the IR's symbols."""

    expr: sympy.Basic
    captured: tuple[Captured, ...] = ()
    source: str = ""

    @property
    def kind(self) -> str:
        return kind(self.expr)

    def captured_by_name(self) -> dict[str, Captured]:
        return {c.name: c for c in self.captured}
