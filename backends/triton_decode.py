"""The Triton backend's decoding path: a split-KV kernel for a region's decode schedule (split-kv pass).

One program takes one (sequence, KV head) pair, one split of the keys its rows may see
and one tile of packed rows (the GROUPS query heads of the KV head as rows of one tile);
it streams its keys with an online softmax and writes the split's (o, lse). A second
kernel, ``_merge_splits``, merges the splits as ``attncc.merge_attention_states`` does,
one program per packed row. Each sequence may have its own
length (``M`` of the region's expressions is that length), and K and V may be pages read
in place through a page table. The region's ``_scores`` tile function is reused, with
the packed rows' head and query indices as row vectors.
"""

from __future__ import annotations

from attncc.ir.expr import h

DECODE_KERNEL = '''\
@triton.jit
def _attn_decode(Q, K, V, O_PART, LSE_PART, LENGTHS, TABLE,{pointers}{rope_pointers}
                 stride_qz, stride_qh, stride_qm, stride_qk,
                 stride_kz, stride_kh, stride_kn, stride_kk,
                 stride_vz, stride_vh, stride_vn, stride_vk,
                 stride_tz,{strides}
                 KV_HEADS, N, M_ALL, SPLITS, PAGE_SIZE,
                 PAGED: tl.constexpr, LENGTHS_GIVEN: tl.constexpr,
                 GROUPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """The (o, lse) of one split of the keys for one tile of packed rows of one (sequence, KV head).

    O_PART [B, KV_HEADS, SPLITS, rows, Dv] and LSE_PART [B, KV_HEADS, SPLITS, rows] are contiguous
    float32. Contiguous K: [B, KV_HEADS, M, D] by its strides; paged K: [pages, PAGE_SIZE, KV_HEADS, D]
    (stride_kz per page, stride_kn per token), key j of sequence b in page TABLE[b, j // PAGE_SIZE].
    """
    off_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = off_bh // KV_HEADS
    kv_h = off_bh % KV_HEADS
    rows = GROUPS * N
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rows
    packed = tl.minimum(offs_r, rows - 1)  # rows past the end read a real head and query, then are dropped
    h = (kv_h * GROUPS + packed // N)[:, None]  # the query head and index of each packed row
    offs_m = packed % N
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    M = M_ALL
    if LENGTHS_GIVEN:
        M = tl.load(LENGTHS + b).to(tl.int32)  # this sequence's own length: M of the expressions
    q = tl.load(Q + b.to(tl.int64) * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qk, mask=r_ok[:, None]{d_mask}, other=0.0)
{rotate_q}    # -- the keys any row may see, then this program's split of them, in whole KV tiles
{bounds}
    per_split = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    stop = tl.minimum(start + per_split, hi)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < stop
        if PAGED:
            page = tl.load(TABLE + b.to(tl.int64) * stride_tz + offs_n // PAGE_SIZE, mask=kv_ok, other=0)
            k_rows = page.to(tl.int64) * stride_kz + (offs_n % PAGE_SIZE) * stride_kn + kv_h * stride_kh
            v_rows = page.to(tl.int64) * stride_vz + (offs_n % PAGE_SIZE) * stride_vn + kv_h * stride_vh
        else:
            k_rows = b.to(tl.int64) * stride_kz + kv_h * stride_kh + offs_n * stride_kn
            v_rows = b.to(tl.int64) * stride_vz + kv_h * stride_vh + offs_n * stride_vn
        k = tl.load(K + k_rows[:, None] + offs_d[None, :] * stride_kk, mask=kv_ok[:, None]{d_mask}, other=0.0)
{rotate_k}        qk = _dot(q, tl.trans(k), None, DOT_PRECISION, INTERPRET_BF16)
        s = _scores(qk, b, h, offs_m, offs_n, N, M, {tile_args}True)
        s = tl.where(kv_ok[None, :], s, float("-inf"))  # keys of the next split
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = {exp}(s - m_safe[:, None])
        alpha = {exp}(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_rows[:, None] + offs_dv[None, :] * stride_vk, mask=kv_ok[:, None]{dv_mask}, other=0.0)
        acc = _dot(_round(p, v.dtype, INTERPRET_BF16), v, acc * alpha[:, None], DOT_PRECISION, INTERPRET_BF16)
        m_i = m_ij
    # -- this split's (o, lse); a split without a visible key gives o = 0, lse = -inf
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + {log}(l_safe)){to_natural}, float("-inf"))
    part = (off_bh.to(tl.int64) * SPLITS + split) * rows
    tl.store(LSE_PART + part + offs_r, lse, mask=r_ok)
    o = acc / l_safe[:, None]
    tl.store(O_PART + (part + offs_r[:, None]) * HEAD_DIM_V + offs_dv[None, :], o, mask=r_ok[:, None]{dv_mask})


@triton.jit
def _merge_splits(O_PART, LSE_PART, O, LSE, SPLITS, ROWS,
                  BLOCK_S: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr):
    """(o, lse) of one packed row over the union of the splits' keys, from each split's (o, lse): lse is the
    logsumexp of the splits' lse, o the sum of exp(lse_i - lse) o_i (attncc.merge_attention_states's meaning).
    A split without a visible key (lse = -inf) adds nothing; a row without one in any split gets o = 0,
    lse = -inf. O_PART [B, KV_HEADS, SPLITS, ROWS, Dv] and LSE_PART in, O [B, KV_HEADS, ROWS, Dv] and LSE out."""
    off_bh = tl.program_id(0) // ROWS
    row = tl.program_id(0) % ROWS
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    parts = (off_bh.to(tl.int64) * SPLITS + offs_s) * ROWS + row
    lse = tl.load(LSE_PART + parts, mask=offs_s < SPLITS, other=float("-inf"))
    shift = tl.max(lse, 0)
    shift = tl.where(shift == float("-inf"), 0.0, shift)  # cancels out: only keeps exp() in range
    weights = tl.exp(lse - shift)
    total = tl.sum(weights, 0)
    seen = total > 0.0
    safe_total = tl.where(seen, total, 1.0)
    o_parts = tl.load(O_PART + parts[:, None] * HEAD_DIM_V + offs_dv[None, :],
                      mask=(offs_s[:, None] < SPLITS){dv_mask}, other=0.0)
    o = tl.sum(weights[:, None] * o_parts, 0) / safe_total
    out = off_bh.to(tl.int64) * ROWS + row
    tl.store(O + out * HEAD_DIM_V + offs_dv, o{dv_store_mask})
    tl.store(LSE + out, tl.where(seen, shift + tl.log(safe_total), float("-inf")))'''

DECODE_HOST = '''\
class FlashAttentionDecode:
    """Decoding (the region's decode schedule): when GROUPS x N <= MAX_ROWS, the keys are split across
    programs, WAVES per streaming multiprocessor (at least MIN_KEYS keys each), and merged by (o, lse) (``_merge_splits``).

    ``kv_lengths [B]`` gives each sequence its own M (None: every sequence has M keys); with
    ``page_table [B, pages]``, k and v are pages [num_pages, page_size, Hkv, *] read in place.
    Forward only: ``CompiledAttention.decode`` serves inference.
    """

    MAX_ROWS = {max_rows}
    MIN_KEYS = {min_keys}
    WAVES = {waves}
    BLOCK_R = 16  # packed rows per program (the smallest tile tl.dot takes)

    @classmethod
    def applies(cls, N):
        return GROUPS * N <= cls.MAX_ROWS

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
    def refuse_gradients(tensors):
        """The decoding kernel has no backward: a cache read that needs gradients is an error, not a silent zero."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            from attncc.errors import BackendError  # imported here: the module itself needs only torch and triton

            raise BackendError(
                "the triton backend's decoding kernel computes no gradients, and an input requires grad; "
                "decode under torch.no_grad(), or compile with backend='pytorch' to differentiate through a cache"
            )

    @classmethod
    def apply(cls, q, k, v, kv_lengths, page_table, *captured):
        _check_device(q.device)
        B, H, N, _ = q.shape
        paged = page_table is not None
        kv_heads = k.shape[2] if paged else k.shape[1]
        M = page_table.shape[1] * k.shape[1] if paged else k.shape[2]
        longest = M if kv_lengths is None else int(kv_lengths.max())
        splits = cls.splits(longest, B * kv_heads, cls.workers(q.device))
        rows = GROUPS * N
        o_parts = torch.empty(B, kv_heads, splits, rows, HEAD_DIM_V, dtype=torch.float32, device=q.device)
        lse_parts = torch.empty(B, kv_heads, splits, rows, dtype=torch.float32, device=q.device)
        if paged:  # [pages, page_size, Hkv, D]: a page, a token, a head, an element
            k_strides, v_strides = (k.stride(0), k.stride(2), k.stride(1), k.stride(3)), (v.stride(0), v.stride(2), v.stride(1), v.stride(3))
        else:
            k_strides, v_strides = k.stride(), v.stride()
        lengths = kv_lengths if kv_lengths is not None else q  # a pointer the kernel does not read
        table = page_table if paged else q
        grid = (B * kv_heads, splits, triton.cdiv(rows, cls.BLOCK_R))
        meta = {{key: value for key, value in _meta(q).items() if key != "BLOCK_M"}}
        index_error = _index_error_flag(q.device, captured)
        _attn_decode[grid](
            q, k, v, o_parts, lse_parts, lengths, table, *captured, *index_error,{rope_tables}
            *q.stride(), *k_strides, *v_strides, table.stride(0) if paged else 0, *_strides_and_sizes(captured),
            kv_heads, N, M, splits, k.shape[1] if paged else 1,
            PAGED=paged, LENGTHS_GIVEN=kv_lengths is not None, BLOCK_R=cls.BLOCK_R, **meta,
            num_warps=4, num_stages=NUM_STAGES,
        )
        if CHECKS_INDICES and index_error[0].item():
            raise IndexError("an index into a captured tensor is out of range: below -size or at least size")
        if splits == 1:
            o, lse = o_parts[:, :, 0], lse_parts[:, :, 0]
        else:
            o = torch.empty(B, kv_heads, rows, HEAD_DIM_V, dtype=torch.float32, device=q.device)
            lse = torch.empty(B, kv_heads, rows, dtype=torch.float32, device=q.device)
            _merge_splits[(B * kv_heads * rows,)](
                o_parts, lse_parts, o, lse, splits, rows,
                BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM_V=HEAD_DIM_V, BLOCK_DV=BLOCK_DV, num_warps=4,
            )
        return o.reshape(B, H, N, HEAD_DIM_V).to(q.dtype), lse.reshape(B, H, N)


class FlashAttentionDecodeStep(torch.autograd.Function):
    """attention(q, k, v) at decode shapes: the decoding kernel's forward, and for gradients the region's
    backward kernels (``FlashAttention.backward``), which need only q, k, v, o and lse."""

    @staticmethod
    def forward(ctx, q, k, v, *captured):
        o, lse = FlashAttentionDecode.apply(q, k, v, None, None, *captured)
        ctx.save_for_backward(q, k, v, o, lse, *captured)
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        return FlashAttention.backward(ctx, do, dlse)'''


def decode_bounds(writer) -> list[str]:
    """Lines setting lo, hi: the schedule's visit range of all query rows (q_first = 0, q_last = N - 1)
    with this sequence's M, rounded to whole KV tiles; every key below M when the bounds need a head."""
    schedule = writer.usable_schedule()
    if schedule is None or any(e.has(h) for e in schedule.expressions()[:2]):
        return ["lo, hi = 0, M"]
    return [
        "q_first = 0",
        "q_last = N - 1",
        *writer.bound_lines(schedule, targets="lo, hi, _, _"),
    ]
