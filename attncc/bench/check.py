"""Every implementation checked against float64 attention (output and, for backward cases, gradients) before timing.

The check runs the case's spec at a small size (``VALIDATION_LENGTH``, batch 1) so that the dense
float64 reference fits anywhere; an error is allowed up to ``ATOL_UNITS * u * max|ref| + RTOL_UNITS * u
* |ref|`` with ``u`` the unit roundoff of the input dtype (``UNIT_ROUNDOFF``), since kernels round
probabilities and score gradients to the input dtype before their matmuls, as FlashAttention does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from attncc.bench.cases import BenchCase, keep_mask, score_function

VALIDATION_LENGTH = 1536  # longer than a 1024 window, so that the sliding window hides keys
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11, torch.float32: 2.0**-20}
ATOL_UNITS, RTOL_UNITS = 16, 2


def validation_case(case: BenchCase) -> BenchCase:
    """The case at batch 1 and at most ``VALIDATION_LENGTH`` queries and keys."""
    return replace(case, name=f"{case.name} (check)", batch=1, n=min(case.n, VALIDATION_LENGTH),
                   m=min(case.m, VALIDATION_LENGTH))  # fmt: skip


def reference_attention(case: BenchCase, q, k, v) -> torch.Tensor:
    """The case's attention in float64, densely, differentiable; rows without a visible key give 0."""
    spec = case.spec
    q, k, v = q.double(), k.double(), v.double()
    groups = spec.num_heads // spec.num_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = spec.scale if spec.scale is not None else 1 / math.sqrt(spec.head_dim)
    scores = q @ k.transpose(-1, -2) * scale
    score_fn = score_function(case, q.device)
    if score_fn is not None:
        scores = score_fn(scores)
    keep = keep_mask(case, q.device)
    if keep is None:
        return torch.softmax(scores, dim=-1) @ v
    seen = keep.any(dim=-1, keepdim=True)
    # masked rows get finite scores before the softmax, so that no NaN reaches the gradients
    scores = torch.where(keep, scores, -math.inf).where(seen, 0.0)
    probs = torch.softmax(scores, dim=-1).where(seen, 0.0)
    return probs @ v


def error_ratio(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> float:
    """The worst |actual - ref| over the error allowed for ``dtype``; at most 1 passes, NaN never does."""
    unit = UNIT_ROUNDOFF[dtype]
    actual, reference = actual.detach(), reference.detach().double()
    allowed = ATOL_UNITS * unit * reference.abs().max() + RTOL_UNITS * unit * reference.abs()
    error = (actual.double() - reference).abs()
    if error.numel() == 0:
        return 0.0
    return float(torch.nan_to_num(error / allowed.clamp_min(torch.finfo(torch.float64).tiny), nan=math.inf).max())


def check_implementation(case: BenchCase, setup: Callable, device, make_inputs: Callable) -> str:
    """``ok (worst ratio)`` or ``FAIL (what, ratio)``: the implementation at the case's validation size."""
    small = validation_case(case)
    leaves = [t.requires_grad_(case.backward) for t in make_inputs(small, device, seed=1)]
    output = setup(small, device).bind(*leaves)()
    reference_leaves = [t.detach().double().requires_grad_(case.backward) for t in leaves]
    reference = reference_attention(small, *reference_leaves)
    ratios = {"o": error_ratio(output, reference, small.dtype)}
    if case.backward:
        grad_o = torch.randn(output.shape, generator=torch.Generator().manual_seed(2)).to(device, output.dtype)
        grads = torch.autograd.grad(output, leaves, grad_o)
        reference_grads = torch.autograd.grad(reference, reference_leaves, grad_o.double())
        for name, grad, expected in zip(("dq", "dk", "dv"), grads, reference_grads):
            ratios[name] = error_ratio(grad, expected, small.dtype)
    worst = max(ratios, key=ratios.get)
    if not all(ratio <= 1 for ratio in ratios.values()):
        return f"FAIL ({worst} error {ratios[worst]:.2f}x allowed)"
    return f"ok ({ratios[worst]:.2f})"
