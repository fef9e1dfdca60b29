"""Mods that compute with a captured tensor's fixed dimensions, unrolled at trace time.

``(w[h] * feats[q_idx]).sum()`` or ``torch.dot(a[q_idx], b[kv_idx])`` index a captured
tensor in fewer dimensions than it has: the rest have the sizes the tensor has when the
mod is traced. Such a slice becomes a numpy array of element expressions
(``feats[q_idx, 0]``, ``feats[q_idx, 1]``, ...); element-wise operations apply per
element, with numpy's broadcasting, and reductions (``sum``, ``mean``, ``prod``,
``amax``, ``amin``, ``max``, ``min``, ``any``, ``all``, ``logsumexp``, ``dot``,
``inner``, ``matmul``) fold the elements into one expression. At most ``MAX_UNROLLED``
elements are unrolled per slice; a mod must end with one element.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import sympy

from attncc.frontend import builder
from attncc.frontend.builder import CapturedTensor, ExpressionError

MAX_UNROLLED = 128

REDUCTIONS = ("sum", "mean", "prod", "amax", "amin", "max", "min", "any", "all", "logsumexp")
PRODUCTS = ("dot", "inner", "matmul", "vdot")


def is_slice(value) -> bool:
    """A value with dimensions left: an unrolled array, or a captured tensor not indexed down to one element."""
    return isinstance(value, np.ndarray) or (isinstance(value, CapturedTensor) and len(value.indices) < value.ndim)


def as_array(value, shape_of) -> np.ndarray:
    """``value`` as an object array of expressions; ``shape_of(view)`` gives a captured slice's remaining shape."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, CapturedTensor):
        shape = tuple(shape_of(value))
        size = math.prod(shape)
        if size > MAX_UNROLLED:
            raise ExpressionError(
                f"captured tensor {value.name!r} is used with {len(value.indices)} of its {value.ndim} indices, "
                f"leaving shape {shape} ({size} elements): a mod may compute over a captured tensor's remaining "
                f"dims (element-wise, then sum, dot, ...) up to {MAX_UNROLLED} elements, unrolled at trace time; "
                f"index every dim, e.g. {value.name}[{', '.join(['q_idx'] + ['0'] * (value.ndim - 1))}]"
            )
        elements = np.empty(shape, dtype=object)
        for position in np.ndindex(*shape):
            elements[position] = builder.index(value, position)
        return elements
    scalar = np.empty((), dtype=object)
    scalar[()] = value
    return scalar


def _result(array: np.ndarray):
    return array[()] if array.ndim == 0 else array


def elementwise(impl, args: tuple, kwargs: dict, shape_of):
    """``impl`` (a function of single elements) applied per element, broadcasting its array arguments."""
    positions = [i for i, a in enumerate(args) if isinstance(a, (np.ndarray, CapturedTensor, sympy.Basic))]
    arrays = [as_array(args[i], shape_of) for i in positions]

    def one(*elements):
        call = list(args)
        for i, element in zip(positions, elements):
            call[i] = element
        return impl(*call, **kwargs)

    try:
        broadcast = np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        shapes = ", ".join(str(a.shape) for a in arrays)
        raise ExpressionError(f"shapes {shapes} of unrolled captured slices do not broadcast") from None
    if math.prod(broadcast) > MAX_UNROLLED:
        raise ExpressionError(f"broadcasting gives shape {broadcast}, over the {MAX_UNROLLED} elements unrolled")
    return _result(np.asarray(np.frompyfunc(one, len(arrays), 1)(*arrays), dtype=object))


def _fold(name: str, vector) -> object:
    if name in ("sum", "mean"):
        total = functools.reduce(lambda a, c: builder.binary("+", a, c), vector)
        return builder.binary("/", total, len(vector)) if name == "mean" else total
    if name == "prod":
        return functools.reduce(lambda a, c: builder.binary("*", a, c), vector)
    if name in ("amax", "max", "amin", "min"):
        return functools.reduce(lambda a, c: builder.call("maximum" if "max" in name else "minimum", a, c), vector)
    if name in ("any", "all"):
        return functools.reduce(lambda a, c: builder.binary("|" if name == "any" else "&", a, c), vector)
    if name == "logsumexp":
        peak = _fold("amax", vector)
        total = _fold("sum", [builder.call("exp", builder.binary("-", x, peak)) for x in vector])
        return builder.binary("+", peak, builder.call("log", total))
    raise AssertionError(name)


def reduce(name: str, value, shape_of, dim=None, keepdim: bool = False):
    """A reduction of an unrolled slice over ``dim`` (None: all of it)."""
    array = as_array(value, shape_of)
    if name in ("max", "min") and dim is not None:
        raise ExpressionError(f"{name}(x, dim) also returns indices; use amax / amin over a dim")
    if keepdim:
        raise ExpressionError(f"{name} with keepdim=True is not supported; a mod computes one element")
    if array.ndim == 0:
        return array[()]
    dims = range(array.ndim) if dim is None else (dim,) if isinstance(dim, int) else tuple(dim)
    try:
        dims = sorted({d % array.ndim for d in dims}, reverse=True)
    except TypeError:
        raise ExpressionError(
            f"{name}'s dim={dim!r} is invalid: an integer or a tuple of integers is allowed"
        ) from None
    for d in dims:
        array = np.apply_along_axis(lambda vector: np.array([_fold(name, list(vector))], dtype=object), d, array)
        array = np.squeeze(array, axis=d) if array.shape[d] == 1 else array
    return _result(np.asarray(array, dtype=object))


def product(name: str, a, c, shape_of):
    """``dot`` / ``inner`` / ``vdot`` of two vectors, ``matmul`` of vectors and matrices, over unrolled slices."""
    left, right = as_array(a, shape_of), as_array(c, shape_of)
    if name != "matmul" and (left.ndim != 1 or right.ndim != 1):
        raise ExpressionError(f"{name} takes two 1-D slices, got shapes {left.shape} and {right.shape}")
    if left.ndim == 0 or right.ndim == 0 or left.shape[-1] != right.shape[0 if right.ndim == 1 else -2]:
        raise ExpressionError(f"{name} of shapes {left.shape} and {right.shape} does not match")
    numbers = np.frompyfunc(lambda x: builder.as_number(x, name), 1, 1)
    return _result(np.asarray(np.matmul(numbers(left), numbers(right)), dtype=object))
