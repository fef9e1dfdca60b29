"""Named sparse attention patterns, as FlexAttention-style mask_mods.

Each function returns a ``mask_mod(b, h, q_idx, kv_idx)`` to pass as
``AttentionSpec(mask_mod=...)``, ``flex_attention(..., mask_mod=...)`` or
``create_block_mask``. Patterns that need data (document ids, global tokens, random
blocks) close over tensors, which become runtime inputs of the compiled program.
Positions are plain indices (top-left): combine with ``AttentionSpec(causal=...)``
for bottom-right alignment when N != M.

Patterns that build tensors cap their sizes, so that a parameter from a spec file
cannot ask for more memory or time than a real model would: at most ``MAX_POSITIONS``
(2**24) positions, and BigBird at most ``MAX_BIGBIRD_BLOCKS`` blocks per side (its
random-block table is blocks x blocks).
"""

from __future__ import annotations

import reprlib

import torch

from attncc.errors import SpecError

__all__ = [
    "bigbird", "causal", "chunked", "document", "fixed", "longformer", "prefix_lm", "sliding_window", "strided",
]  # fmt: skip


MAX_POSITIONS = 1 << 24
MAX_BIGBIRD_BLOCKS = 4096


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{name}={value!r} is invalid: a positive integer is allowed")
    return value


def _non_negative(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"{name}={value!r} is invalid: a non-negative integer is allowed")
    return value


def _positions(name: str, value) -> int:
    value = _positive(name, value)
    if value > MAX_POSITIONS:
        raise SpecError(f"{name}={value} is invalid: at most {MAX_POSITIONS} (2**24) positions are allowed")
    return value


def _int64s(name: str, values) -> torch.Tensor:
    """``values`` as a 1-D int64 tensor, or a SpecError naming ``name`` (not torch's overflow message)."""
    try:
        tensor = torch.as_tensor(values)
    except (OverflowError, RuntimeError, TypeError, ValueError):
        raise SpecError(f"{name}={reprlib.repr(values)} is invalid: a list of 64-bit integers is allowed") from None
    if tensor.dim() > 1 or (tensor.numel() and (tensor.is_floating_point() or tensor.dtype == torch.bool)):
        raise SpecError(f"{name}={reprlib.repr(values)} is invalid: a flat list of integers is allowed")
    return tensor.to(torch.int64).reshape(-1)


def _named(fn, name: str):
    fn.__name__ = fn.__qualname__ = name
    return fn


def causal():
    """Query i sees keys j <= i."""
    return _named(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, "causal()")


def sliding_window(left: int, right: int = 0):
    """Query i sees keys i - left .. i + right (right=0: causal sliding window, as Mistral)."""
    left, right = _non_negative("left", left), _non_negative("right", right)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

    return _named(mask_mod, f"sliding_window({left}, {right})")


def prefix_lm(prefix_length: int):
    """Prefix-LM: the first ``prefix_length`` keys are seen by all queries, the rest causally."""
    prefix = _non_negative("prefix_length", prefix_length)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (kv_idx <= q_idx)

    return _named(mask_mod, f"prefix_lm({prefix})")


def chunked(chunk_size: int, causal: bool = True):
    """Chunked local attention (Llama 4): queries see keys of their own chunk of ``chunk_size``."""
    size = _positive("chunk_size", chunk_size)

    def mask_mod(b, h, q_idx, kv_idx):
        same = q_idx // size == kv_idx // size
        return same & (kv_idx <= q_idx) if causal else same

    return _named(mask_mod, f"chunked({size}, causal={causal})")


def _document_ids(lengths, offsets) -> torch.Tensor:
    if (lengths is None) == (offsets is None):
        raise SpecError("document() takes lengths or offsets, exactly one of them")
    if offsets is not None:
        offsets = _int64s("offsets", offsets)
        if offsets.numel() < 2 or offsets[0] != 0 or bool((offsets.diff() <= 0).any()):
            raise SpecError(f"offsets={offsets.tolist()} is invalid: increasing positions starting at 0")
        lengths = offsets.diff()
    lengths = _int64s("lengths", lengths)
    if lengths.numel() == 0 or bool((lengths <= 0).any()):
        raise SpecError(f"lengths={lengths.tolist()} is invalid: a non-empty list of positive lengths")
    # Each length is checked before the sum, which could otherwise wrap around in int64.
    if int(lengths.max()) > MAX_POSITIONS or int(lengths.sum()) > MAX_POSITIONS:
        raise SpecError(
            f"lengths={reprlib.repr(lengths.tolist())} is invalid: the documents may hold at most {MAX_POSITIONS} "
            "(2**24) positions in all"
        )
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths)


def document(lengths=None, offsets=None, causal: bool = False):
    """Packed documents: a query sees keys of its own document; ``lengths`` or ``offsets`` (with a final end)."""
    doc = _document_ids(lengths, offsets)

    def mask_mod(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return same & (kv_idx <= q_idx) if causal else same

    return _named(mask_mod, f"document({doc.max().item() + 1} documents, causal={causal})")


def longformer(window: int, global_tokens, seq_len: int):
    """Longformer: a sliding window of ``window`` keys on each side, plus global tokens that see and are seen by all."""
    window, seq_len = _non_negative("window", window), _positions("seq_len", seq_len)
    indices = _int64s("global_tokens", global_tokens)
    is_global = torch.zeros(seq_len, dtype=torch.bool)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= seq_len):
        raise SpecError(f"global_tokens={indices.tolist()} is invalid: positions in 0..{seq_len - 1}")
    is_global[indices] = True

    def mask_mod(b, h, q_idx, kv_idx):
        return (abs(q_idx - kv_idx) <= window) | is_global[q_idx] | is_global[kv_idx]

    return _named(mask_mod, f"longformer({window}, {indices.numel()} global)")


def bigbird(block_size: int, seq_len: int, window_blocks: int = 1, global_blocks: int = 1, random_blocks: int = 2,
            seed: int = 0):  # fmt: skip
    """BigBird (Zaheer et al.): blocks see their ``window_blocks`` neighbours on each side, the first
    ``global_blocks`` blocks see and are seen by all, and each block row sees ``random_blocks`` random
    blocks, drawn with ``seed``."""
    size, seq_len = _positive("block_size", block_size), _positions("seq_len", seq_len)
    window_blocks = _non_negative("window_blocks", window_blocks)
    global_blocks, random_blocks = _non_negative("global_blocks", global_blocks), _non_negative("random_blocks", random_blocks)
    count = -(-seq_len // size)
    if count > MAX_BIGBIRD_BLOCKS:
        raise SpecError(
            f"block_size={size}, seq_len={seq_len} is invalid: {count} blocks; at most {MAX_BIGBIRD_BLOCKS} are "
            f"allowed (block_size >= {-(-seq_len // MAX_BIGBIRD_BLOCKS)} for this seq_len)"
        )
    generator = torch.Generator().manual_seed(seed)
    random_table = torch.zeros(count, count, dtype=torch.bool)
    for row in range(count):
        chosen = torch.randperm(count, generator=generator)[: min(random_blocks, count)]
        random_table[row, chosen] = True

    def mask_mod(b, h, q_idx, kv_idx):
        q_block, kv_block = q_idx // size, kv_idx // size
        near = abs(q_block - kv_block) <= window_blocks
        is_global = (q_block < global_blocks) | (kv_block < global_blocks)
        return near | is_global | random_table[q_block, kv_block]

    return _named(mask_mod, f"bigbird({size}, seed={seed})")


def fixed(block: int, summary: int):
    """Child et al.'s fixed pattern (causal): a query sees its own block and the last ``summary`` keys of every block."""
    block, summary = _positive("block", block), _positive("summary", summary)
    if summary > block:
        raise SpecError(f"summary={summary} is invalid: at most block={block}")

    def mask_mod(b, h, q_idx, kv_idx):
        own_block = q_idx // block == kv_idx // block
        summary_column = kv_idx % block >= block - summary
        return (own_block | summary_column) & (kv_idx <= q_idx)

    return _named(mask_mod, f"fixed({block}, {summary})")


def strided(stride: int):
    """Child et al.'s strided pattern (causal): the previous ``stride`` keys, and every ``stride``-th key before."""
    stride = _positive("stride", stride)

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx < stride) | ((q_idx - kv_idx) % stride == 0)) & (kv_idx <= q_idx)

    return _named(mask_mod, f"strided({stride})")
