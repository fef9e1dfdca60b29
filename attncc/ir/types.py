"""Tensor types of the IR: an element type and a shape of sympy dimensions."""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attncc.errors import IRError

# Element types. "T" is the input element type (fp16, bf16 or fp32), bound at call time.
FLOAT_DTYPES = ("T", "f16", "bf16", "f32", "f64")
INT_DTYPES = ("u8", "i8", "i16", "i32", "i64")
DTYPES = FLOAT_DTYPES + INT_DTYPES + ("bool",)

# Dimension symbols of the attention inputs (see DESIGN.md: q [B,H,N,D], k [B,Hkv,M,D], v [B,Hkv,M,Dv]).
B, N, M = sympy.symbols("B N M", integer=True, positive=True)


def as_dim(value) -> sympy.Expr:
    """A dimension: a non-negative integer or an integer sympy expression."""
    dim = sympy.sympify(value)
    if dim.is_integer is False or (dim.is_number and dim < 0):
        raise IRError(f"dimension {value!r} is not a non-negative integer")
    return dim


@dataclass(frozen=True)
class TensorType:
    shape: tuple[sympy.Expr, ...]
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise IRError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        object.__setattr__(self, "shape", tuple(as_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"
