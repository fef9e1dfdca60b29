"""Attention whose scores pass through elementwise steps that read runtime tensors (masks, biases).

Frontends that find attention inside torch programs (FX capture, the transformers
hook) describe what happens between ``scale * q @ k^T`` and the softmax as a
``ChainSpec``: a list of ``Step`` s (multiply, add, tanh, soft-cap, add a tensor,
fill where a boolean tensor is set) and the boolean tensors that mask elements.
The tensors are graph values, not constants: each becomes a captured tensor of
the compiled program, indexed ``t[b, h, q_idx, kv_idx]`` after it is broadcast to
``[B, H, N, M]`` (a view, no copy), and is passed in on every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attncc.api import CompiledAttention, compile
from attncc.errors import InputError
from attncc.spec import AttentionSpec

STEP_OPS = ("mul", "add", "tanh", "softcap", "add_tensor", "sub_tensor", "fill", "keep")


@dataclass(frozen=True)
class Step:
    """One elementwise operation on the score ``s``.

    ``mul`` s * value; ``add`` s + value; ``tanh``; ``softcap`` value * tanh(s / value);
    ``add_tensor`` / ``sub_tensor`` s +/- t; ``fill`` where(t, value, s) (masked_fill);
    ``keep`` where(t, s, value). ``t`` is runtime tensor number ``tensor``.
    """

    op: str
    value: float | None = None
    tensor: int | None = None

    def __post_init__(self):
        if self.op not in STEP_OPS:
            raise ValueError(f"step op {self.op!r} is not one of {', '.join(STEP_OPS)}")

    def describe(self) -> str:
        template = {
            "mul": "* {value}",
            "add": "+ {value}",
            "tanh": "tanh",
            "softcap": "softcap {value}",
            "add_tensor": "+ {t}",
            "sub_tensor": "- {t}",
            "fill": "fill {value} where {t}",
            "keep": "keep where {t} else {value}",
        }[self.op]
        value = "" if self.value is None else f"{self.value:g}"
        return template.format(value=value, t=f"t{self.tensor}")


@dataclass(frozen=True)
class ChainSpec:
    """An AttentionSpec whose score_mod and mask_mod read runtime tensors.

    ``masks``: (tensor, keep_when) pairs; element (b, h, i, j) is visible only where
    ``t[b, h, i, j] == keep_when`` for each. ``tensor_dtypes`` fixes the dtype of each
    runtime tensor (the program is compiled for them).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    causal: bool | str = False
    softcap: float | None = None
    steps: tuple[Step, ...] = ()
    masks: tuple[tuple[int, bool], ...] = ()
    tensor_dtypes: tuple[torch.dtype, ...] = ()

    def tensor_names(self) -> list[str]:
        return [f"t{i}" for i in range(len(self.tensor_dtypes))]

    def attention_spec(self) -> AttentionSpec:
        placeholders = {
            name: torch.zeros((1, 1, 1, 1), dtype=runtime_dtype(dtype))
            for name, dtype in zip(self.tensor_names(), self.tensor_dtypes)
        }
        return AttentionSpec(
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            v_head_dim=self.v_head_dim, scale=self.scale, causal=self.causal, softcap=self.softcap,
            score_mod=ChainScoreMod(self.steps, placeholders) if self.steps else None,
            mask_mod=ChainMaskMod(self.masks, placeholders) if self.masks else None,
        )  # fmt: skip

    def describe(self) -> str:
        parts = [f"heads={self.num_heads}/{self.num_kv_heads}", f"head_dim={self.head_dim}", f"scale={self.scale:.6g}"]
        if self.causal:
            parts.append(f"causal={'top_left' if self.causal == 'top_left' else 'bottom_right'}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        if self.steps:
            parts.append("score: " + ", ".join(step.describe() for step in self.steps))
        if self.masks:
            parts.append("mask: " + " & ".join(f"{'' if keep else '~'}t{i}" for i, keep in self.masks))
        return " ".join(parts)


class ChainScoreMod:
    """score_mod applying the steps in order; traced once by attncc, never run per element."""

    def __init__(self, steps: tuple[Step, ...], tensors: dict[str, torch.Tensor]):
        self.steps = steps
        self.tensors = tensors

    def __call__(self, score, b, h, q_idx, kv_idx):
        for step in self.steps:
            t = None if step.tensor is None else self.tensors[f"t{step.tensor}"][b, h, q_idx, kv_idx]
            if step.op == "mul":
                score = score * step.value
            elif step.op == "add":
                score = score + step.value
            elif step.op == "tanh":
                score = torch.tanh(score)
            elif step.op == "softcap":
                score = step.value * torch.tanh(score / step.value)
            elif step.op == "add_tensor":
                score = score + t
            elif step.op == "sub_tensor":
                score = score - t
            elif step.op == "fill":
                score = torch.where(t, floor_finite(step.value), score)
            else:
                score = torch.where(t, score, floor_finite(step.value))
        return score


class ChainMaskMod:
    """mask_mod: the element is visible where every mask tensor equals its keep value."""

    def __init__(self, masks: tuple[tuple[int, bool], ...], tensors: dict[str, torch.Tensor]):
        self.masks = masks
        self.tensors = tensors

    def __call__(self, b, h, q_idx, kv_idx):
        keep = None
        for index, keep_when in self.masks:
            t = self.tensors[f"t{index}"][b, h, q_idx, kv_idx]
            term = t if keep_when else ~t
            keep = term if keep is None else keep & term
        return keep


_PROGRAMS: dict[tuple[ChainSpec, str], CompiledAttention] = {}


def chain_program(spec: ChainSpec, backend: str = "pytorch") -> CompiledAttention:
    """The compiled program of a chain spec, compiled once per process."""
    program = _PROGRAMS.get((spec, backend))
    if program is None:
        program = compile(spec.attention_spec(), backend=backend)
        _PROGRAMS[(spec, backend)] = program
    return program


def broadcast_tensor(t: torch.Tensor, name: str, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """``t`` viewed as ``[B, H, N, M]`` by broadcasting (no copy); InputError if it does not broadcast."""
    if t.dim() > 4:
        raise InputError(f"tensor {name} has shape {tuple(t.shape)}: at most 4 dims broadcastable to {shape}")
    try:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(shape)
    except RuntimeError:
        raise InputError(
            f"tensor {name} has shape {tuple(t.shape)}, which does not broadcast to [B, H, N, M] = {list(shape)}"
        ) from None


def runtime_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float tensors reach the program as float32: scores are float32, and so is arithmetic on them."""
    return torch.float32 if dtype.is_floating_point else dtype


# The most negative finite score a chain passes on. Masks written as torch.finfo(dtype).min must
# stay finite: the program keeps scores in base-2 units (s / ln 2), where float32's lowest would
# overflow to -inf and turn a row whose every key is masked from the uniform average the model
# computes into zeros. Far below any real score, it still absorbs the score added to it.
LOWEST = -(2.0**100)


def floor_finite(value: float) -> float:
    return value if value == -math.inf else max(value, LOWEST)


def runtime_tensor(t: torch.Tensor) -> torch.Tensor:
    """A runtime tensor as the program reads it: float32 (finite values floored at LOWEST), other dtypes as is."""
    if not t.is_floating_point():
        return t
    t = t.float()
    return torch.where(t == -math.inf, t, t.clamp(min=LOWEST))


def run_chain(program: CompiledAttention, spec: ChainSpec, q, k, v, tensors) -> torch.Tensor:
    """``o`` of the chain program on q, k, v and the runtime tensors (in spec order)."""
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    values = {name: broadcast_tensor(runtime_tensor(t), name, shape) for name, t in zip(spec.tensor_names(), tensors)}
    return program(q, k, v, **values)


class ChainAttention(torch.nn.Module):
    """``o = attention(q, k, v, *tensors)`` for one chain spec, as a module (what FX capture inserts)."""

    def __init__(self, spec: ChainSpec, backend: str = "pytorch"):
        super().__init__()
        self.spec = spec
        self.program = chain_program(spec, backend)

    def forward(self, q, k, v, *tensors):
        return run_chain(self.program, self.spec, q, k, v, tensors)

    def extra_repr(self) -> str:
        return self.spec.describe()
