"""The PyTorch backend's decoding path: source for a region's decode schedule (split-kv pass).

The query heads of a KV group are the rows of one tile and the visited keys are split
into parts that run as one batched matmul; the parts' (o, lse) merge exactly as
``attncc.merge_attention_states`` merges them (``MERGE_PARTS``, printed into the module).
Each sequence may have its own length (a KV cache):
the region's expressions then read ``M`` as that length, so the batch means what each
sequence alone would. Paged caches are read through their page table.
"""

from __future__ import annotations

import sympy

from attncc.backends.source import decode_key_bounds
from attncc.ir.expr import b, kv_idx
from attncc.ir.types import M

# The split merge of the generated decoding classes: attncc.merge_attention_states's meaning, printed
# into the generated module so that it runs without attncc.
MERGE_PARTS = '''\
    @staticmethod
    def merge(o_parts, lse_parts):
        """(o, lse) over the union of the parts' keys from each part's (o, lse) along dim 2: lse is the
        logsumexp of the parts' lse, o the sum of exp(lse_i - lse) o_i; a part without a visible key
        (lse = -inf) adds nothing, a row without one in any part gets o = 0, lse = -inf."""
        shift = lse_parts.detach().amax(dim=2, keepdim=True)  # cancels out: only keeps exp() in range
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        weights = torch.exp(lse_parts - shift)
        total = weights.sum(dim=2, keepdim=True)
        seen = total > 0
        safe_total = torch.where(seen, total, 1.0)
        lse = torch.where(seen, shift + torch.log(safe_total), float("-inf")).squeeze(2)
        weights = (weights / safe_total).unsqueeze(-1)
        return (weights * torch.where(weights > 0, o_parts, 0.0)).sum(dim=2), lse'''

DECODE_TEMPLATE = '''\
class {cls}Decode:
    """Decoding for {cls}: few query rows against many keys (its ``decode`` schedule).

    The GROUPS query heads of a KV head are the rows of one tile (GROUPS x N <= MAX_ROWS);
    the keys the rows may see are split into parts of at least MIN_KEYS keys, enough for
    WAVES parts per worker, computed as one batched matmul and merged by their (o, lse) (``merge``).
    ``kv_lengths [B]`` gives each sequence its own M (None: every sequence has M keys);
    with ``page_table [B, pages]``, k and v are pages [num_pages, page_size, Hkv, *].
    """

    MAX_ROWS = {max_rows}
    BLOCK_M = {block_m}  # packed query rows per tile when a call has more rows than a decode step
    MIN_KEYS = {min_keys}
    WAVES = {waves}
    GROUPS = {groups}
    BLOCK_BYTES = 1 << 26  # float32 K and V of a block of keys that is copied (pages, another dtype{rotated_doc})
    ROTATES_KEYS = {rotates_keys}
    native = None  # set by attncc when it loads this module: the region's CPU decoding kernel (docs/decode.md)
{rope_members}
    @classmethod
    def applies(cls, N):
        return cls.GROUPS * N <= cls.MAX_ROWS

    @staticmethod
    def workers(device):
        """Programs that run at once: streaming multiprocessors on a GPU, threads on a CPU."""
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).multi_processor_count
        return torch.get_num_threads()

    @classmethod
    def splits(cls, keys, batch_heads, workers):
        """Parts of the keys: about WAVES per worker, none shorter than MIN_KEYS, a power of two."""
        wanted = max(1, min(-(-cls.WAVES * workers // batch_heads), keys // cls.MIN_KEYS))
        return 1 << (wanted.bit_length() - 1)

    @staticmethod
    def scores(q_rows, k_parts, b, h, q_idx, kv_idx, N, {length}, masked{captured_params}):
        """Scores [B, Hkv, parts, keys, rows] in {units} units; unless no key can be hidden (``masked`` false),
        -inf where the mask or the sequence's length hides a key. Keys by rows: k @ q^T streams K at a
        higher rate than q @ k^T for a few rows on CPUs."""
{score_lines}
    @staticmethod
    def bounds(q_first, q_last, b, h, N, {length}{captured_params}):
        """Keys [lo, hi) may be visible to queries q_first..q_last of some sequence; [full_lo, full_hi) to all."""
{bounds_lines}
    @classmethod
    def part(cls, q_rows, k_parts, v_parts, c0, b, h, q_idx, N, {length}, masked{captured_params}):
        """(o, lse) [B, Hkv, parts, rows, *] of each part of keys c0 .. c0 + parts x keys."""
        count, size = k_parts.shape[2], k_parts.shape[3]
        kv_idx = (c0 + torch.arange(count * size, device=q_rows.device)).view(1, 1, count, size, 1)
        s = cls.scores(q_rows, k_parts, b, h, q_idx, kv_idx, N, {length}, masked{captured_params})
        # the shift cancels out of o and lse: no gradient flows through it, and s may be updated in place
        row_max = s.detach().amax(dim=-2, keepdim=True)
        safe_max = torch.where(row_max == float("-inf"), 0.0, row_max)
        p = s.sub_(safe_max).{exp}_()
        total = p.sum(dim=-2)
        o = torch.matmul(p.transpose(-1, -2), v_parts) / torch.where(total == 0, 1.0, total).unsqueeze(-1)
        return o, (safe_max.squeeze(-2) + torch.{log}(total)){to_natural}

    @classmethod
    def apply(cls, q, k, v, kv_lengths, page_table{captured_params}):
        if cls.native is not None and cls.native.takes(q, k, v, page_table):
            return cls.native(q, k, v, kv_lengths, page_table)
        B, H, N, D = q.shape
        kv_heads, Dv = (k.shape[2] if page_table is not None else k.shape[1]), v.shape[-1]
        M = page_table.shape[1] * k.shape[1] if page_table is not None else k.shape[2]
{captured_to_float}        {length} = torch.full((B,), M, device=q.device) if kv_lengths is None else kv_lengths.long()
        b = torch.arange(B, device=q.device).view(-1, 1, 1, 1, 1)
        # blocks of copied keys may share memory unless autograd keeps them
        reuse = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v{captured_args})))
{rotate_queries}        q_rows = {queries}.reshape(B, kv_heads, 1, cls.GROUPS * N, D).float(){prescale}
        o, lse = [], []
        # query tiles of BLOCK_M packed rows bound the scores by BLOCK_M x M (long prompts into a cache)
        for r0, r1, q_first, q_last in _row_tiles(N, cls.GROUPS, cls.BLOCK_M):
            packed = torch.arange(r0, r1, device=q.device)
            h = torch.arange(kv_heads, device=q.device).view(1, -1, 1, 1, 1) * cls.GROUPS + (packed // N).view(1, 1, 1, 1, -1)
            q_idx = (packed % N).view(1, 1, 1, 1, -1)
            o_tile, lse_tile = cls.rows(q_rows[:, :, :, r0:r1], k, v, page_table, b, h, q_idx, q_first, q_last, N, M, {length}, reuse{captured_args})
            o.append(o_tile)
            lse.append(lse_tile)
        o, lse = (torch.cat(o, dim=2), torch.cat(lse, dim=2)) if len(o) > 1 else (o[0], lse[0])
        return o.view(B, H, N, Dv).to(q.dtype), lse.view(B, H, N)

    @classmethod
    def rows(cls, q_rows, k, v, page_table, b, h, q_idx, q_first, q_last, N, M, {length}, reuse{captured_params}):
        """(o, lse) of one tile of packed rows: its visited keys in blocks, each split into parts, merged."""
        B, kv_heads, rows, Dv = q_rows.shape[0], q_rows.shape[1], q_rows.shape[3], v.shape[-1]
        lo, hi, full_lo, full_hi = cls.bounds(q_first, q_last, b, h, N, {length}{captured_args})
        lo, hi = max(_lowest(lo), 0), min(_highest(hi), M)
        if hi <= lo:
            return (torch.zeros(B, kv_heads, rows, Dv, device=q_rows.device),
                    torch.full((B, kv_heads, rows), float("-inf"), device=q_rows.device))
        masked = not (_highest(full_lo) <= lo and hi <= _lowest(torch.minimum(torch.as_tensor(full_hi), {length}[b])))
        workers = cls.workers(q_rows.device)
        o_parts, lse_parts = [], []
        for k_block, v_block, c0 in cls.key_blocks(k, v, page_table, lo, hi, b, N, {length}, reuse{captured_args}):
            keys = k_block.shape[2]
            size = -(-keys // cls.splits(keys, B * kv_heads, workers))
            whole = keys // size * size
            for start, stop in ((0, whole), (whole, keys)):  # equal parts in one batched matmul, then the rest
                if stop > start:
                    k_parts = k_block[:, :, start:stop].unflatten(2, (-1, min(size, stop - start)))
                    v_parts = v_block[:, :, start:stop].unflatten(2, (-1, min(size, stop - start)))
                    o, lse = cls.part(q_rows, k_parts, v_parts, c0 + start, b, h, q_idx, N, {length}, masked{captured_args})
                    o_parts.append(o)
                    lse_parts.append(lse)
        o_parts, lse_parts = torch.cat(o_parts, dim=2), torch.cat(lse_parts, dim=2)
        if o_parts.shape[2] == 1:  # one part: nothing to merge
            return o_parts[:, :, 0], lse_parts[:, :, 0]
        return cls.merge(o_parts, lse_parts)

    @classmethod
    def key_blocks(cls, k, v, page_table, lo, hi, b, N, {length}, reuse{captured_params}):
        """Keys lo..hi - 1 as blocks (k [B, Hkv, keys, D], v [B, Hkv, keys, Dv] in float32{rotated_doc}, first key).

        A float32 contiguous cache{unrotated} is one view of the cache. Otherwise each block is a copy of at most
        BLOCK_BYTES of K and V together: whole pages read through the page table and laid out as each head's
        keys in a row (matmul's fast layout; in the NHD pages one head's keys lie Hkv x D apart), keys in another
        dtype converted{rotated_doc}. Nothing the size of the cache is ever copied, and with ``reuse`` (no gradient
        will need a block once the next is read) every block is copied into the first one's memory.
        """
        paged = page_table is not None
        if not paged and k.dtype == torch.float32 and not cls.ROTATES_KEYS:
            yield k[:, :, lo:hi], v[:, :, lo:hi], lo
            return
        B, kv_heads = (page_table.shape[0], k.shape[2]) if paged else k.shape[:2]
        page_size = k.shape[1] if paged else 1
        key_bytes = 4 * B * kv_heads * (k.shape[-1] + v.shape[-1])
        step = max(1, cls.BLOCK_BYTES // (key_bytes * page_size)) * page_size
        buffers = ({{}}, {{}}) if reuse else (None, None)
        for c0 in range(lo - lo % page_size, hi, step):
            first, c1 = max(c0, lo), min(c0 + step, hi)
            pages = page_table[:, c0 // page_size : -(-c1 // page_size)].flatten().long() if paged else None
            k_block, v_block = (cls.read(x, pages, first - c0, c1 - c0, c0, B, step, buffer) for x, buffer in zip((k, v), buffers))
{rotate_keys}            yield k_block, v_block, first

    @staticmethod
    def read(x, pages, start, stop, c0, B, step, buffers):
        """Keys c0 + start .. c0 + stop - 1 as float32 [B, Hkv, keys, *], each head's keys in a row, in one copy from
        the whole pages ``pages`` of x [num_pages, page_size, Hkv, *] (then ``c0`` is a page's first key) or from the
        rows of x [B, Hkv, M, *]. ``buffers`` (a dict, or None for new tensors) keeps memory for blocks of up to
        ``step`` keys, which the next call reuses."""
        if pages is None:
            source = x[:, :, c0 + start : c0 + stop]
        else:
            if buffers is None:
                gathered = x[pages]
            else:
                if "pages" not in buffers:
                    buffers["pages"] = x.new_empty(B * (step // x.shape[1]), *x.shape[1:])
                gathered = torch.index_select(x, 0, pages, out=buffers["pages"][: len(pages)])
            source = gathered.unflatten(0, (B, -1)).permute(0, 3, 1, 2, 4).flatten(2, 3)[:, :, start:stop]
        if buffers is None:
            return torch.empty(source.shape, device=x.device).copy_(source)
        if "rows" not in buffers:
            buffers["rows"] = torch.empty(B, source.shape[1], step, source.shape[3], device=x.device)
        return buffers["rows"][:, :, : source.shape[2]].copy_(source)

{merge}
'''


ROPE_MEMBERS = '''\
    # RoPE {rope}: per column, the signed frequency and the partner column (attncc.ir.rope.RoPE.column_tables)
    ROPE_FREQ = {freq}
    ROPE_PAIR = {pair}

    @staticmethod
    def query_position(b, q_idx, N, {length}{captured_params}):
        """The RoPE position of query q_idx of sequence b: {q_position}, with M its own length."""
        return {q_expr}

    @staticmethod
    def key_position(b, kv_idx, N, {length}{captured_params}):
        """The RoPE position of key kv_idx of sequence b: {kv_position}, with M its own length."""
        return {kv_expr}
'''


LENGTHS = "kv-len"  # the per-sequence lengths in expressions: no identifier, so no captured tensor's label


def decode_source(node, cls: str, names, print_expr, split_linear, is_tensor) -> str:
    """Source of the ``{cls}Decode`` class for a region with a decode schedule.

    ``M`` in the region's expressions becomes the sequence's length ``kv_len[b]``, and
    keys at or beyond it are masked.
    """
    op = node.op
    length = "kv_len"
    captured = [names[operand.op.label] for operand in node.inputs[3:]]
    per_sequence = {M: sympy.IndexedBase(LENGTHS, integer=True)[b]}
    printed = {**names.identifiers, LENGTHS: length}

    def print_expr(expr, print_with=print_expr):
        return print_with(expr, printed)

    score = op.score.xreplace(per_sequence)
    keep = sympy.And(kv_idx < per_sequence[M], op.mask.xreplace(per_sequence))
    coefficient, rest = split_linear(score)
    if coefficient is not None:
        lines = ["s = torch.matmul(k_parts, q_rows.transpose(-1, -2))"]
        if rest != 0:
            lines.append(f"s = s + {print_expr(rest)}")
    else:
        lines = ["score = torch.matmul(k_parts, q_rows.transpose(-1, -2))"]
        if is_tensor(score):
            lines.append(f"s = torch.broadcast_to({print_expr(score)}, score.shape).float()")
        else:
            lines.append(f"s = torch.full_like(score, {print_expr(score)})")
    lines.append("if masked:")
    lines.append(f'    s = s.masked_fill(~{print_expr(keep)}, float("-inf"))')
    lines.append("return s")
    bounds = ["return " + ", ".join(print_expr(e.xreplace(per_sequence)) for e in decode_key_bounds(op))]
    captured_params = "".join(f", {c}" for c in captured)
    casts = "".join(f"        {c} = _compute_dtype({c})\n" for c in captured)
    rope = {
        "rotate_queries": "",
        "queries": "q",
        "rotate_keys": "",
        "rope_members": "",
        "rotated_doc": "",
        "unrotated": "",
    }
    if op.rope is not None:  # queries turned once; keys turned as each block of them is read
        freq, pair = op.rope.column_tables(int(node.inputs[0].type.shape[3]))
        position_args = f"N, {length}{captured_params}"
        members = ROPE_MEMBERS.format(
            rope=op.rope,
            freq=tuple(freq),
            pair=tuple(pair),
            length=length,
            captured_params=captured_params,
            q_position=op.q_position,
            kv_position=op.kv_position,
            q_expr=print_expr(op.q_position.xreplace(per_sequence)),
            kv_expr=print_expr(op.kv_position.xreplace(per_sequence)),
        )
        rope = {
            "rotate_queries": "        q_turned = _rotate(q, _positions(lambda b, q_idx: cls.query_position("
            f"b, q_idx, {position_args}), q), cls.ROPE_FREQ, cls.ROPE_PAIR)\n",
            "queries": "q_turned",
            "rotate_keys": "            k_block = _rotate(k_block, _positions(lambda b, kv_idx: cls.key_position("
            f"b, first + kv_idx, {position_args}), k_block), cls.ROPE_FREQ, cls.ROPE_PAIR)\n",
            "rope_members": "\n" + members,
            "rotated_doc": ", keys turned by RoPE",
            "unrotated": " without RoPE",
        }
    return DECODE_TEMPLATE.format(
        rotates_keys=op.rope is not None,
        **rope,
        cls=cls,
        max_rows=op.decode.max_rows,
        min_keys=op.decode.min_keys,
        waves=op.decode.waves,
        groups=op.groups,
        merge=MERGE_PARTS,
        block_m=op.block_m or 1 << 30,
        length=length,
        captured_params=captured_params,
        captured_args=captured_params,
        captured_to_float=casts,
        units="base-2" if op.exp2 else "natural",
        score_lines="".join(f"        {line}\n" for line in lines),
        bounds_lines="".join(f"        {line}\n" for line in bounds),
        prescale=f" * {coefficient!r}" if coefficient is not None else "",
        exp="exp2" if op.exp2 else "exp",
        log="log2" if op.exp2 else "log",
        to_natural=" * LN2" if op.exp2 else "",
    )
