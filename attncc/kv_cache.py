"""KV caches for decoding: a static cache of preallocated rows and a paged cache with a page allocator.

Both hold per-sequence lengths, so one batch serves requests of different lengths:
sequence ``b`` holds keys ``0 .. lengths[b] - 1`` and its queries sit at its last
positions (query ``i`` of ``N`` at ``lengths[b] - N + i``). A compiled program reads a
cache with ``attn.decode(q, cache)``, which means, for every sequence, attention over
its own keys alone (``M = lengths[b]``); masks and score mods see logical positions.

- ``StaticKVCache``: ``k [B, Hkv, max_len, D]``, ``v [B, Hkv, max_len, Dv]``.
- ``PagedKVCache``: pages ``k_pages [num_pages, page_size, Hkv, D]`` (the NHD layout),
  a page table ``[B, max_pages]`` int32 mapping sequence ``b``'s logical page ``p`` to
  a physical page, and an allocator (``reserve``, ``append``, ``erase``) in the manner of
  torch's experimental ``PagedAttention``. Key ``j`` of sequence ``b`` lives at
  ``k_pages[page_table[b, j // page_size], j % page_size]``.

Storage starts zeroed, so the keys beyond a sequence's length that a kernel may load
(and then mask) are finite.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from attncc.errors import InputError


def _positive(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise InputError(f"{field}={value!r} is invalid: a positive integer is allowed")
    return int(value)


class _KVCache:
    """What both caches share: sizes, per-sequence lengths, and checks of appended keys and values."""

    def __init__(self, batch_size, num_kv_heads, head_dim, v_head_dim, dtype, device):
        self.batch_size = _positive("batch_size", batch_size)
        self.num_kv_heads = _positive("num_kv_heads", num_kv_heads)
        self.head_dim = _positive("head_dim", head_dim)
        self.v_head_dim = self.head_dim if v_head_dim is None else _positive("v_head_dim", v_head_dim)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InputError(f"dtype={dtype!r} is invalid: torch.float16, torch.bfloat16 or torch.float32 are allowed")
        self.dtype = dtype
        self.device = torch.device(device or "cpu")
        self.lengths = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)

    def indices(self, sequences=None) -> list[int]:
        """Checked sequence indices: ``None`` (all), one index, or a list or tensor of distinct indices."""
        if sequences is None:
            return list(range(self.batch_size))
        if isinstance(sequences, numbers.Integral) and not isinstance(sequences, bool):
            sequences = [sequences]
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        if not isinstance(sequences, Sequence) or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and 0 <= s < self.batch_size for s in sequences
        ):
            raise InputError(
                f"sequences={sequences!r} is invalid: sequence indices in [0, {self.batch_size}) are allowed"
            )
        if not sequences:
            raise InputError("sequences=[] is invalid: at least one sequence index is allowed")
        if len(set(sequences)) != len(sequences):
            raise InputError(f"sequences={sequences!r} names a sequence twice: each at most once is allowed")
        return [int(s) for s in sequences]

    def _check_new(self, k, v, count: int) -> None:
        for label, t, dim in (("k", k, self.head_dim), ("v", v, self.v_head_dim)):
            expected = (count, self.num_kv_heads, "n", dim)
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(f"{label} is {shape}: a tensor {expected} is allowed")
            if t.shape[0] != count or t.shape[1] != self.num_kv_heads or t.shape[3] != dim:
                raise InputError(f"{label} has shape {tuple(t.shape)}: {expected} is allowed")
            if not t.is_floating_point():
                raise InputError(f"{label} has dtype {t.dtype}: a float tensor is allowed")
        if k.shape[2] != v.shape[2]:
            raise InputError(f"k has {k.shape[2]} keys and v has {v.shape[2]} values: they must be equal")

    def __len__(self) -> int:
        """The longest sequence's length."""
        return int(self.lengths.max())


class StaticKVCache(_KVCache):
    """Preallocated rows: ``k [B, Hkv, max_len, D]``, ``v [B, Hkv, max_len, Dv]``, ``lengths [B]`` int32."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, v_head_dim: int | None = None,
                 *, dtype=torch.float32, device=None):  # fmt: skip
        super().__init__(batch_size, num_kv_heads, head_dim, v_head_dim, dtype, device)
        self.max_len = _positive("max_len", max_len)
        factory = {"dtype": dtype, "device": self.device}
        self.k = torch.zeros(self.batch_size, self.num_kv_heads, self.max_len, self.head_dim, **factory)
        self.v = torch.zeros(self.batch_size, self.num_kv_heads, self.max_len, self.v_head_dim, **factory)

    def append(self, k: torch.Tensor, v: torch.Tensor, sequences=None) -> None:
        """Write ``k, v [len(sequences), Hkv, n, *]`` after each named sequence's keys (default: every sequence)."""
        rows = self.indices(sequences)
        self._check_new(k, v, len(rows))
        index = torch.tensor(rows, device=self.device)
        start = self.lengths[index].long()
        if int(start.max()) + k.shape[2] > self.max_len:
            raise InputError(
                f"appending {k.shape[2]} keys to sequences of up to {int(start.max())} overflows max_len={self.max_len}"
            )
        positions = start.view(-1, 1) + torch.arange(k.shape[2], device=self.device)
        self.k[index.view(-1, 1), :, positions] = k.transpose(1, 2).to(self.dtype)
        self.v[index.view(-1, 1), :, positions] = v.transpose(1, 2).to(self.dtype)
        self.lengths[index] += k.shape[2]

    def reset(self, sequences=None) -> None:
        """Empty the named sequences (default: all)."""
        self.lengths[torch.tensor(self.indices(sequences), device=self.device, dtype=torch.long)] = 0


class PagedKVCache(_KVCache):
    """Pages shared by all sequences and a page table per sequence, with an allocator.

    ``k_pages [num_pages, page_size, Hkv, D]``, ``v_pages [num_pages, page_size, Hkv, Dv]``,
    ``page_table [batch_size, max_pages]`` int32, ``lengths [batch_size]`` int32.
    ``max_pages`` defaults to ``num_pages`` (one sequence may use every page).
    """

    def __init__(self, num_pages: int, page_size: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int | None = None, *, max_pages: int | None = None, dtype=torch.float32,
                 device=None):  # fmt: skip
        super().__init__(batch_size, num_kv_heads, head_dim, v_head_dim, dtype, device)
        self.num_pages = _positive("num_pages", num_pages)
        self.page_size = _positive("page_size", page_size)
        self.max_pages = self.num_pages if max_pages is None else _positive("max_pages", max_pages)
        factory = {"dtype": dtype, "device": self.device}
        shape = (self.num_pages, self.page_size, self.num_kv_heads)
        self.k_pages = torch.zeros(*shape, self.head_dim, **factory)
        self.v_pages = torch.zeros(*shape, self.v_head_dim, **factory)
        self.page_table = torch.zeros(self.batch_size, self.max_pages, dtype=torch.int32, device=self.device)
        self._free = list(range(self.num_pages - 1, -1, -1))  # popped from the end: low pages first
        self._owned: list[list[int]] = [[] for _ in range(self.batch_size)]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def reserve(self, sequence: int, length: int) -> None:
        """Assign pages so that ``sequence`` can hold ``length`` keys (its keys so far stay where they are)."""
        if isinstance(sequence, bool) or not isinstance(sequence, numbers.Integral):
            raise InputError(f"sequence={sequence!r} is invalid: one sequence index is allowed")
        (sequence,) = self.indices(sequence)
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
            raise InputError(f"length={length!r} is invalid: a non-negative integer is allowed")
        needed = -(-int(length) // self.page_size)
        if needed > self.max_pages:
            raise InputError(
                f"length={length} needs {needed} pages of {self.page_size}: at most max_pages={self.max_pages} "
                "per sequence are allowed"
            )
        owned = self._owned[sequence]
        if needed - len(owned) > len(self._free):
            raise InputError(
                f"sequence {sequence} needs {needed - len(owned)} more pages for length={length}; "
                f"{len(self._free)} of {self.num_pages} are free: erase finished sequences or allocate more pages"
            )
        while len(owned) < needed:
            page = self._free.pop()
            self.page_table[sequence, len(owned)] = page
            owned.append(page)

    def append(self, k: torch.Tensor, v: torch.Tensor, sequences=None) -> None:
        """Write ``k, v [len(sequences), Hkv, n, *]`` after each named sequence's keys, reserving pages as needed."""
        rows = self.indices(sequences)
        self._check_new(k, v, len(rows))
        count = k.shape[2]
        for row in rows:
            self.reserve(row, int(self.lengths[row]) + count)
        index = torch.tensor(rows, device=self.device)
        positions = self.lengths[index].long().view(-1, 1) + torch.arange(count, device=self.device)
        pages = self.page_table[index.view(-1, 1), positions // self.page_size].long()
        offsets = positions % self.page_size
        self.k_pages[pages, offsets] = k.transpose(1, 2).to(self.dtype)
        self.v_pages[pages, offsets] = v.transpose(1, 2).to(self.dtype)
        self.lengths[index] += count

    def erase(self, sequences=None) -> None:
        """Free the named sequences' pages (default: all) and empty them."""
        for row in self.indices(sequences):
            self._free.extend(reversed(self._owned[row]))
            self._owned[row] = []
            self.page_table[row] = 0
            self.lengths[row] = 0

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous copies ``k [B, Hkv, max(lengths), D]``, ``v``: the logical view of the pages (for checks)."""
        longest = len(self)
        positions = torch.arange(longest, device=self.device)
        pages = self.page_table[:, positions // self.page_size].long()
        k = self.k_pages[pages, positions % self.page_size].permute(0, 2, 1, 3)
        v = self.v_pages[pages, positions % self.page_size].permute(0, 2, 1, 3)
        return k, v


__all__ = ["PagedKVCache", "StaticKVCache"]
