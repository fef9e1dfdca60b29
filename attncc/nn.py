"""``attncc.nn.Attention``: a multi-head attention module (projections, GQA, RoPE, KV cache) around a compiled program.

``Attention(embed_dim, num_heads, ...)(x)`` maps ``x [B, N, embed_dim]`` to the same
shape: q/k/v projections, optional rotary embeddings, the attention an
``AttentionSpec`` describes (compiled by attncc), and the output projection. With a
``KVCache`` it decodes: each call appends its keys and values and attends to all of
them, and ``causal`` is aligned to the bottom right, so query ``i`` of a call sees
the cache plus its own prefix. With an ``attncc.StaticKVCache`` or ``attncc.PagedKVCache``
the sequences of a batch may have different lengths: each call appends after each
sequence's own keys and decodes with the program's decoding path (``CompiledAttention.decode``).
RoPE is the program's own (``AttentionSpec(rope=attncc.RoPE(theta=rope_base))``): caches hold
unturned keys, turned by their positions as they are read, and queries sit after each sequence's keys.
"""

from __future__ import annotations

import numbers

import torch

from attncc.api import CompiledAttention, compile
from attncc.distributed import LAYOUTS, context_parallel_attention, shard_positions
from attncc.errors import InputError, SpecError
from attncc.ir.rope import RoPE
from attncc.kv_cache import PagedKVCache, StaticKVCache
from attncc.spec import AttentionSpec


class KVCache:
    """The keys and values an ``Attention`` has seen: ``k [B, Hkv, M, D]``, ``v [B, Hkv, M, Dv]``.

    One cache per layer. ``update`` appends and returns everything so far; ``reset`` empties it.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            if k.shape[0] != self.k.shape[0]:
                raise InputError(f"the KV cache holds batch size {self.k.shape[0]}, the input has {k.shape[0]}")
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reset(self) -> None:
        self.k = self.v = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding (RoFormer, in the half-split layout of GPT-NeoX and Llama) of ``x [B, H, N, D]``."""
    dim = x.shape[-1]
    inverse_frequency = base ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inverse_frequency
    angles = torch.cat([angles, angles], dim=-1)
    x32 = x.float()
    return (x32 * angles.cos() + rotate_half(x32) * angles.sin()).to(x.dtype)


class Attention(torch.nn.Module):
    """Multi-head self-attention whose core is a compiled attncc program.

    ``num_kv_heads`` < ``num_heads`` gives grouped-query attention; ``head_dim``
    defaults to ``embed_dim // num_heads``. ``causal``, ``window``, ``softcap``,
    ``scale``, ``alibi``, ``score_mod`` and ``mask_mod`` are AttentionSpec fields
    (bottom-right alignment). ``rope=True`` rotates q and k by their positions
    (``rope_base``; rotate-half pairs) inside the compiled program; positions continue after the cache. ``forward(x, cache=None, sequences=None)``:
    with a static or paged cache, row ``b`` of x continues cache sequence ``sequences[b]``
    (default: every sequence, in order).

    With ``context_parallel_group`` (a ``torch.distributed`` process group), ``x`` is this
    rank's shard of the sequence (``attncc.distributed.shard(x, group, layout, dim=1)``
    with ``context_parallel_layout``) and so is the output: attention runs over the whole
    sequence across the group, RoPE rotates by global positions.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, causal: bool | str = True, window=None,
                 softcap: float | None = None, scale: float | None = None, alibi: bool = False,
                 score_mod=None, mask_mod=None, rope: bool = False, rope_base: float = 10000.0,
                 backend: str = "pytorch", context_parallel_group=None, context_parallel_layout: str = "zigzag",
                 device=None, dtype=None):  # fmt: skip
        super().__init__()
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, numbers.Integral) or embed_dim <= 0:
            raise SpecError(f"embed_dim={embed_dim!r} is invalid: a positive integer is allowed")
        if head_dim is None:
            if not isinstance(num_heads, numbers.Integral) or num_heads <= 0 or embed_dim % num_heads:
                raise SpecError(
                    f"embed_dim={embed_dim} is not a multiple of num_heads={num_heads!r}: pass head_dim explicitly"
                )
            head_dim = embed_dim // num_heads
        if rope and head_dim % 2:
            raise SpecError(f"rope=True needs an even head_dim; head_dim={head_dim}")
        # RoPE is fused into the program (keys cached unturned, turned as read), except under context
        # parallelism, whose sharded programs take no rope: there the module turns q and k at global positions
        fused_rope = RoPE(theta=rope_base) if rope and context_parallel_group is None else None
        spec = AttentionSpec(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=scale,
                             causal=causal, window=window, softcap=softcap, alibi=alibi, score_mod=score_mod,
                             mask_mod=mask_mod, rope=fused_rope)  # fmt: skip
        self.embed_dim = embed_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.rope = rope
        self.rope_base = float(rope_base)
        if context_parallel_layout not in LAYOUTS:
            raise SpecError(
                f"context_parallel_layout={context_parallel_layout!r} is invalid: allowed are "
                f"{', '.join(map(repr, LAYOUTS))}"
            )
        self.context_parallel_group = context_parallel_group
        self.context_parallel_layout = context_parallel_layout
        factory = {"device": device, "dtype": dtype}
        self.q_proj = torch.nn.Linear(embed_dim, self.num_heads * head_dim, bias=bias, **factory)
        self.k_proj = torch.nn.Linear(embed_dim, self.num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = torch.nn.Linear(embed_dim, self.num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = torch.nn.Linear(self.num_heads * head_dim, embed_dim, bias=bias, **factory)
        self.attention: CompiledAttention = compile(spec, backend=backend)

    @property
    def spec(self) -> AttentionSpec:
        return self.attention.spec

    def forward(self, x: torch.Tensor, cache: KVCache | StaticKVCache | PagedKVCache | None = None,
                sequences=None) -> torch.Tensor:  # fmt: skip
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"x is {shape}: a tensor [batch, length, {self.embed_dim}] is allowed")
        batch, length, _ = x.shape
        parallel = self.context_parallel_group is not None
        if parallel and cache is not None:
            raise InputError("a KV cache cannot be used with context_parallel_group: decode without the group")
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if isinstance(cache, (StaticKVCache, PagedKVCache)):
            # the program puts each sequence's new queries after its own keys (M - N + i, M its length)
            cache.append(k, v, sequences)
            o = self.attention.decode(q, cache, sequences=sequences)
        else:
            if sequences is not None:
                raise InputError("sequences is only allowed with an attncc.StaticKVCache or attncc.PagedKVCache")
            if self.rope and parallel:
                positions = shard_positions(length, self.context_parallel_group, self.context_parallel_layout)
                q = rotary(q, positions.to(x.device), self.rope_base)
                k = rotary(k, positions.to(x.device), self.rope_base)
            if cache is not None:
                k, v = cache.update(k, v)
            if parallel:
                o = context_parallel_attention(q, k, v, spec=self.spec, group=self.context_parallel_group,
                                               layout=self.context_parallel_layout,
                                               backend=self.attention.backend)  # fmt: skip
            else:
                o = self.attention(q, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"rope={self.rope}" + (f", rope_base={self.rope_base:g}" if self.rope else "")


__all__ = ["Attention", "KVCache", "rotary"]
