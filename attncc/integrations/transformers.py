"""Hugging Face transformers: an attention implementation named ``attncc``.

``register()`` adds ``attention_forward`` to transformers' ``AttentionInterface`` and
SDPA's mask format to its ``AttentionMaskInterface`` under one name, so

    attncc.integrations.transformers.register()
    model.set_attn_implementation("attncc")

runs every attention layer of a model through compiled attncc programs.

What a layer receives and what attncc computes from it:

- ``query [B, H, N, D]``, ``key`` / ``value [B, Hkv, M, D]`` (not repeated: GQA is
  attncc's own), ``scaling`` (default ``1/sqrt(D)``) and ``softcap`` (Gemma-2);
- a 4-D boolean mask (True: attend), as SDPA gets it: padding, causal, sliding
  window and packing are all in it; it becomes a mask over a runtime tensor;
- a 4-D float mask (a custom mask, or the eager format): added to the scores
  after soft-capping, as the eager implementation does;
- no mask: the layer is causal (``is_causal``, else ``module.is_causal``) with
  SDPA's top-left alignment when N > 1, and not masked otherwise, exactly when
  transformers skips building SDPA's mask.

Attention dropout, attention sinks (``s_aux``) and ``position_bias`` are not
supported and raise ``AttnccError``; attention weights are not returned.
"""

from __future__ import annotations

import torch

from attncc.errors import AttnccError, InputError
from attncc.integrations.chain import ChainSpec, Step, chain_program, run_chain

NAME = "attncc"
MIN_VERSION = "4.56"

_UNSUPPORTED_KWARGS = {
    "s_aux": "attention sinks (s_aux)",
    "position_bias": "an additive position_bias (T5-style)",
}


def attention_spec(query, key, value, attention_mask, scaling, softcap, is_causal) -> ChainSpec:
    """The chain spec of one call: which program computes it."""
    heads, n, head_dim = query.shape[1], query.shape[2], query.shape[3]
    scale = head_dim**-0.5 if scaling is None else float(scaling)
    shape = dict(num_heads=heads, num_kv_heads=key.shape[1], head_dim=head_dim, v_head_dim=value.shape[3],
                 scale=scale)  # fmt: skip
    if attention_mask is None:
        return ChainSpec(**shape, causal="top_left" if is_causal and n > 1 else False, softcap=softcap)
    if attention_mask.dtype == torch.bool:
        return ChainSpec(**shape, softcap=softcap, masks=((0, True),), tensor_dtypes=(torch.bool,))
    if not attention_mask.is_floating_point():
        raise InputError(
            f"attention_mask has dtype {attention_mask.dtype}: a boolean (True attends) or an additive float "
            "mask is allowed"
        )
    steps = ((Step("softcap", float(softcap)),) if softcap is not None else ()) + (Step("add_tensor", tensor=0),)
    return ChainSpec(**shape, steps=steps, tensor_dtypes=(attention_mask.dtype,))


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      softcap: float | None = None, is_causal: bool | None = None, *, backend: str | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' attention-function signature: returns (output [B, N, H, Dv], None)."""
    from attncc.backends import backend_for_device

    if dropout:
        raise AttnccError(
            f"attention dropout={dropout} is not supported by attncc: set the config's attention_dropout to 0 "
            "or call model.eval()"
        )
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise AttnccError(f"{what} is not supported by the attncc attention implementation")
    if attention_mask is not None:
        if attention_mask.dim() != 4:
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)}: a 4-D mask [batch, heads or 1, "
                "queries, keys] is allowed (register() installs SDPA's mask format)"
            )
        if attention_mask.shape[-1] < key.shape[2]:
            raise InputError(f"attention_mask covers {attention_mask.shape[-1]} keys, the layer has {key.shape[2]}")
        attention_mask = attention_mask[..., : key.shape[2]]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    spec = attention_spec(query, key, value, attention_mask, scaling, softcap, causal)
    program = chain_program(spec, backend or backend_for_device(query.device.type))
    tensors = () if attention_mask is None else (attention_mask,)
    output = run_chain(program, spec, query, key, value, tensors)
    return output.transpose(1, 2).contiguous(), None


def register(backend: str | None = None, name: str = NAME) -> str:
    """Register the ``name`` attention implementation (default backend: the preferred one per device).

    Returns the name, for ``model.set_attn_implementation(name)`` or
    ``from_pretrained(..., attn_implementation=name)``.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise AttnccError(
            f"attncc.integrations.transformers needs transformers>={MIN_VERSION} "
            f"(pip install 'attncc[transformers]'): {error}"
        ) from None
    if backend is not None:
        from attncc.backends import get_backend

        get_backend(backend)

    def attncc_attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend, **kwargs)

    AttentionInterface.register(name, attncc_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


__all__ = ["attention_forward", "attention_spec", "register"]
