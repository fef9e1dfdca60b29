"""Combine attention over disjoint key sets: partial results (o_i, lse_i) merge exactly into (o, lse).

Attention over a union of disjoint key sets is the lse-weighted sum of the attention over each
set: ``lse = logsumexp_i lse_i`` and ``o = sum_i exp(lse_i - lse) * o_i``. Split-KV decoding,
shared-prefix (cascade) attention and context parallelism all end with this merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attncc.errors import InputError


def merge_attention_states(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention results over disjoint key sets into the result over their union.

    ``outputs[i]`` is ``[..., N, Dv]`` (any float dtype) and ``lses[i]`` the matching natural-log
    logsumexp ``[..., N]`` of part ``i``'s visible scores. A part that sees no key (``lse = -inf``,
    its ``o`` is ignored) contributes nothing; a row that sees no key in any part gives ``o = 0``
    and ``lse = -inf``, never NaN. Differentiable in every output and lse. Returns ``(o, lse)``:
    ``o`` in the dtype of ``outputs[0]``, ``lse`` in float32.
    """
    outputs, lses = list(outputs), list(lses)
    _check_states(outputs, lses)
    lse_parts = torch.stack([lse.float() for lse in lses])
    # The shift cancels out of the result, so it carries no gradient; it only keeps exp() in range.
    shift = lse_parts.amax(dim=0).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(lse_parts - shift)
    total = weights.sum(dim=0)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, shift + torch.log(safe_total), torch.full_like(total, float("-inf")))
    weights = weights / safe_total
    o = sum(w.unsqueeze(-1) * torch.where(w.unsqueeze(-1) > 0, part.float(), 0.0) for w, part in zip(weights, outputs))
    return o.to(outputs[0].dtype), lse


def _check_states(outputs: list, lses: list) -> None:
    if not outputs or len(outputs) != len(lses):
        raise InputError(
            f"merge_attention_states got {len(outputs)} outputs and {len(lses)} lses: "
            "one lse per output, at least one part, is allowed"
        )
    for field, tensors in (("outputs", outputs), ("lses", lses)):
        for i, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise InputError(f"merge_attention_states: {field}[{i}] is {type(tensor).__name__}: a float tensor is allowed")
    shape, lse_shape = outputs[0].shape, outputs[0].shape[:-1]
    for i, (o, lse) in enumerate(zip(outputs, lses)):
        if o.shape != shape:
            raise InputError(f"merge_attention_states: outputs[{i}] has shape {tuple(o.shape)}: all outputs must have shape {tuple(shape)}")
        if lse.shape != lse_shape:
            raise InputError(
                f"merge_attention_states: lses[{i}] has shape {tuple(lse.shape)}: {tuple(lse_shape)} "
                "(the outputs' shape without the last dimension) is allowed"
            )
        if o.device != outputs[0].device or lse.device != outputs[0].device:
            raise InputError(f"merge_attention_states: part {i} is on another device than part 0: one device is allowed")
