"""The Triton backend for linear attention: chunked forward and backward kernels for a ``linear_attention`` region.

The generated module holds:

- ``_phi`` / ``_phi_grad``: the feature map and its derivative (``sympy.diff``), printed by
  ``TritonPrinter``;
- ``_linear_fwd``: one program per (batch, query head) walks the query chunks of
  ``CHUNK`` rows in order; a chunk reads its own keys under the causal mask (all keys in
  the parallel form, whose chunks see no mask) and the state S = sum phi(k) v^T,
  z = sum phi(k) of the keys before them, held in registers; it writes o, the row
  divisors and, from the first head of each group, the final state;
- ``_linear_bwd_dq``: the same walk for dQ; ``_linear_bwd_dkdv``: one program per
  (batch, KV head) walks the chunks backward with the gradient of the state, summing its
  group's query heads;
- ``LinearAttention``, a ``torch.autograd.Function`` that launches them, and
  ``attention(q, k, v, kv=None, k_sum=None) -> (o, kv, k_sum)``.

Query i sits at key position i + M - N; the keys before the first query's (M > N) enter
the state before the first chunk. The parallel form is the same walk with every key in
the state before the first chunk. CPU tensors run the kernels in Triton's interpreter.
"""

from __future__ import annotations

import sympy

import attncc
from attncc.backends.pytorch_linear import linear_region
from attncc.backends.source import CapturedNames, GeneratedSource, SourceWriter
from attncc.backends.triton import TritonPrinter, fold_numbers, padded
from attncc.ir.expr import feature
from attncc.ir.graph import Graph
from attncc.ir.printer import format_node, print_graph, value_names

name = "triton"
devices = ("cuda", "cpu")

KERNELS = '''

@triton.jit
def _load_rows(ptr, rows, cols, n_rows, n_cols, stride_row):
    """A [rows, cols] tile of a row-major [n_rows, n_cols] matrix, float32, zero outside."""
    mask = (rows[:, None] >= 0) & (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _features(ptr, rows, cols, n_rows, n_cols, stride_row):
    """phi of a tile, zero outside the matrix (phi(0) need not be 0)."""
    mask = (rows[:, None] >= 0) & (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, _phi(x), 0.0)


@triton.jit
def _row_grads(DO, O, TOTAL, rows, offs_dv, N, HEAD_DIM_V, NORMALIZE: tl.constexpr):
    """The gradients of a chunk's numerators [CHUNK, BLOCK_DV] and denominators [CHUNK] from dO."""
    grad_o = _load_rows(DO, rows, offs_dv, N, HEAD_DIM_V, HEAD_DIM_V)
    if NORMALIZE:
        o = _load_rows(O, rows, offs_dv, N, HEAD_DIM_V, HEAD_DIM_V)
        total = tl.load(TOTAL + rows, mask=rows < N, other=0.0)
        inverse = tl.where(total == 0.0, 0.0, 1.0 / tl.where(total == 0.0, 1.0, total))
        return grad_o * inverse[:, None], -tl.sum(grad_o * o, 1) * inverse
    return grad_o, tl.sum(grad_o, 1) * 0.0


@triton.jit
def _linear_fwd(Q, K, V, KV0, KSUM0, O, TOTAL, KV1, KSUM1, N, M, H,
                GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr,
                CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, SCALE: tl.constexpr, EPS: tl.constexpr):
    head = tl.program_id(0)  # b * H + h
    kv_head = head // GROUPS  # b * Hkv + h // GROUPS
    Q += head * N * HEAD_DIM
    O += head * N * HEAD_DIM_V
    TOTAL += head * N
    K += kv_head * M * HEAD_DIM
    V += kv_head * M * HEAD_DIM_V
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    state_mask = (offs_d[:, None] < HEAD_DIM) & (offs_dv[None, :] < HEAD_DIM_V)
    state_ptrs = kv_head * HEAD_DIM * HEAD_DIM_V + offs_d[:, None] * HEAD_DIM_V + offs_dv[None, :]
    kv = tl.load(KV0 + state_ptrs, mask=state_mask, other=0.0)
    k_sum = tl.load(KSUM0 + kv_head * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    offset = M - N  # query i sits at key position i + M - N
    lead = M if not CAUSAL else tl.maximum(offset, 0)
    # -- keys before the first query's: into the state
    for start in range(0, lead, CHUNK):
        keys = start + offs_c
        phi_k = _features(K, keys, offs_d, lead, HEAD_DIM, HEAD_DIM)
        v = _load_rows(V, keys, offs_dv, lead, HEAD_DIM_V, HEAD_DIM_V)
        kv += tl.dot(tl.trans(phi_k), v, input_precision="ieee")
        k_sum += tl.sum(phi_k, 0)
    # -- query chunks in order: own keys under the causal mask, then the state of the keys before
    for start in range(0, N, CHUNK):
        rows = start + offs_c
        phi_q = _features(Q, rows, offs_d, N, HEAD_DIM, HEAD_DIM)
        numerator = tl.dot(phi_q, kv, input_precision="ieee")
        denominator = tl.sum(phi_q * k_sum[None, :], 1)
        if CAUSAL:
            keys = rows + offset
            phi_k = _features(K, keys, offs_d, M, HEAD_DIM, HEAD_DIM)
            v = _load_rows(V, keys, offs_dv, M, HEAD_DIM_V, HEAD_DIM_V)
            scores = tl.dot(phi_q, tl.trans(phi_k), input_precision="ieee")
            scores = tl.where(offs_c[None, :] <= offs_c[:, None], scores, 0.0)
            numerator += tl.dot(scores, v, input_precision="ieee")
            denominator += tl.sum(scores, 1)
            kv += tl.dot(tl.trans(phi_k), v, input_precision="ieee")
            k_sum += tl.sum(phi_k, 0)
        numerator *= SCALE
        total = denominator * SCALE + EPS
        if NORMALIZE:
            numerator = tl.where(total[:, None] == 0.0, 0.0, numerator / tl.where(total == 0.0, 1.0, total)[:, None])
        out_mask = (rows[:, None] < N) & (offs_dv[None, :] < HEAD_DIM_V)
        tl.store(O + rows[:, None] * HEAD_DIM_V + offs_dv[None, :], numerator, mask=out_mask)
        tl.store(TOTAL + rows, total, mask=rows < N)
    if head % GROUPS == 0:  # one program per KV head writes its final state
        tl.store(KV1 + state_ptrs, kv, mask=state_mask)
        tl.store(KSUM1 + kv_head * HEAD_DIM + offs_d, k_sum, mask=offs_d < HEAD_DIM)


@triton.jit
def _linear_bwd_dq(Q, K, V, KV0, KSUM0, O, TOTAL, DO, DQ, N, M, H,
                   GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr,
                   CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, SCALE: tl.constexpr, EPS: tl.constexpr):
    head = tl.program_id(0)
    kv_head = head // GROUPS
    Q += head * N * HEAD_DIM
    DQ += head * N * HEAD_DIM
    O += head * N * HEAD_DIM_V
    DO += head * N * HEAD_DIM_V
    TOTAL += head * N
    K += kv_head * M * HEAD_DIM
    V += kv_head * M * HEAD_DIM_V
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    state_mask = (offs_d[:, None] < HEAD_DIM) & (offs_dv[None, :] < HEAD_DIM_V)
    state_ptrs = kv_head * HEAD_DIM * HEAD_DIM_V + offs_d[:, None] * HEAD_DIM_V + offs_dv[None, :]
    kv = tl.load(KV0 + state_ptrs, mask=state_mask, other=0.0)
    k_sum = tl.load(KSUM0 + kv_head * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    offset = M - N
    lead = M if not CAUSAL else tl.maximum(offset, 0)
    for start in range(0, lead, CHUNK):
        keys = start + offs_c
        phi_k = _features(K, keys, offs_d, lead, HEAD_DIM, HEAD_DIM)
        v = _load_rows(V, keys, offs_dv, lead, HEAD_DIM_V, HEAD_DIM_V)
        kv += tl.dot(tl.trans(phi_k), v, input_precision="ieee")
        k_sum += tl.sum(phi_k, 0)
    for start in range(0, N, CHUNK):
        rows = start + offs_c
        grad_num, grad_den = _row_grads(DO, O, TOTAL, rows, offs_dv, N, HEAD_DIM_V, NORMALIZE)
        grad_phi_q = tl.dot(grad_num, tl.trans(kv), input_precision="ieee") + grad_den[:, None] * k_sum[None, :]
        if CAUSAL:
            keys = rows + offset
            phi_k = _features(K, keys, offs_d, M, HEAD_DIM, HEAD_DIM)
            v = _load_rows(V, keys, offs_dv, M, HEAD_DIM_V, HEAD_DIM_V)
            grad_scores = tl.dot(grad_num, tl.trans(v), input_precision="ieee") + grad_den[:, None]
            grad_scores = tl.where(offs_c[None, :] <= offs_c[:, None], grad_scores, 0.0)
            grad_phi_q += tl.dot(grad_scores, phi_k, input_precision="ieee")
            kv += tl.dot(tl.trans(phi_k), v, input_precision="ieee")
            k_sum += tl.sum(phi_k, 0)
        q = _load_rows(Q, rows, offs_d, N, HEAD_DIM, HEAD_DIM)
        dq = SCALE * grad_phi_q * _phi_grad(q)
        tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :], dq,
                 mask=(rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _linear_bwd_dkdv(Q, K, V, O, TOTAL, DO, DKV1, DKSUM1, DK, DV, DKV0, DKSUM0, N, M, H,
                     GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr,
                     CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, SCALE: tl.constexpr, EPS: tl.constexpr):
    kv_head = tl.program_id(0)  # b * Hkv + h // GROUPS
    K += kv_head * M * HEAD_DIM
    DK += kv_head * M * HEAD_DIM
    V += kv_head * M * HEAD_DIM_V
    DV += kv_head * M * HEAD_DIM_V
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    state_mask = (offs_d[:, None] < HEAD_DIM) & (offs_dv[None, :] < HEAD_DIM_V)
    state_ptrs = kv_head * HEAD_DIM * HEAD_DIM_V + offs_d[:, None] * HEAD_DIM_V + offs_dv[None, :]
    # the gradient of the state after the last key
    grad_kv = tl.load(DKV1 + state_ptrs, mask=state_mask, other=0.0)
    grad_k_sum = tl.load(DKSUM1 + kv_head * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    offset = M - N
    lead = M if not CAUSAL else tl.maximum(offset, 0)
    num_chunks = tl.cdiv(N, CHUNK)
    for back in range(0, num_chunks):
        start = (num_chunks - 1 - back) * CHUNK
        rows = start + offs_c
        keys = rows + offset
        if CAUSAL:
            k = _load_rows(K, keys, offs_d, M, HEAD_DIM, HEAD_DIM)
            phi_k = _features(K, keys, offs_d, M, HEAD_DIM, HEAD_DIM)
            v = _load_rows(V, keys, offs_dv, M, HEAD_DIM_V, HEAD_DIM_V)
            # from the queries after each key (the state) ...
            grad_phi_k = tl.dot(v, tl.trans(grad_kv), input_precision="ieee") + grad_k_sum[None, :]
            dv = tl.dot(phi_k, grad_kv, input_precision="ieee")
        chunk_grad_kv = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
        chunk_grad_k_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for g in range(0, GROUPS):
            head = kv_head * GROUPS + g
            phi_q = _features(Q + head * N * HEAD_DIM, rows, offs_d, N, HEAD_DIM, HEAD_DIM)
            grad_num, grad_den = _row_grads(DO + head * N * HEAD_DIM_V, O + head * N * HEAD_DIM_V, TOTAL + head * N,
                                            rows, offs_dv, N, HEAD_DIM_V, NORMALIZE)
            if CAUSAL:
                # ... and from the queries of its own chunk (key t, query s: t <= s)
                visible = offs_c[:, None] <= offs_c[None, :]
                scores_t = tl.where(visible, tl.dot(phi_k, tl.trans(phi_q), input_precision="ieee"), 0.0)
                grad_scores_t = tl.dot(v, tl.trans(grad_num), input_precision="ieee") + grad_den[None, :]
                grad_scores_t = tl.where(visible, grad_scores_t, 0.0)
                grad_phi_k += SCALE * tl.dot(grad_scores_t, phi_q, input_precision="ieee")
                dv += SCALE * tl.dot(scores_t, grad_num, input_precision="ieee")
            chunk_grad_kv += SCALE * tl.dot(tl.trans(phi_q), grad_num, input_precision="ieee")
            chunk_grad_k_sum += SCALE * tl.sum(phi_q * grad_den[:, None], 0)
        if CAUSAL:
            key_mask = (keys[:, None] >= 0) & (keys[:, None] < M)
            tl.store(DK + keys[:, None] * HEAD_DIM + offs_d[None, :], grad_phi_k * _phi_grad(k),
                     mask=key_mask & (offs_d[None, :] < HEAD_DIM))
            tl.store(DV + keys[:, None] * HEAD_DIM_V + offs_dv[None, :], dv,
                     mask=key_mask & (offs_dv[None, :] < HEAD_DIM_V))
        grad_kv += chunk_grad_kv
        grad_k_sum += chunk_grad_k_sum
    # -- keys that only enter the state: every query reads them
    for start in range(0, lead, CHUNK):
        keys = start + offs_c
        k = _load_rows(K, keys, offs_d, lead, HEAD_DIM, HEAD_DIM)
        phi_k = _features(K, keys, offs_d, lead, HEAD_DIM, HEAD_DIM)
        v = _load_rows(V, keys, offs_dv, lead, HEAD_DIM_V, HEAD_DIM_V)
        grad_phi_k = tl.dot(v, tl.trans(grad_kv), input_precision="ieee") + grad_k_sum[None, :]
        key_mask = keys[:, None] < lead
        tl.store(DK + keys[:, None] * HEAD_DIM + offs_d[None, :], grad_phi_k * _phi_grad(k),
                 mask=key_mask & (offs_d[None, :] < HEAD_DIM))
        tl.store(DV + keys[:, None] * HEAD_DIM_V + offs_dv[None, :], tl.dot(phi_k, grad_kv, input_precision="ieee"),
                 mask=key_mask & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(DKV0 + state_ptrs, grad_kv, mask=state_mask)
    tl.store(DKSUM0 + kv_head * HEAD_DIM + offs_d, grad_k_sum, mask=offs_d < HEAD_DIM)


def _constants(q, k, v):
    return dict(GROUPS=q.shape[1] // k.shape[1], HEAD_DIM=q.shape[3], HEAD_DIM_V=v.shape[3], BLOCK_D=BLOCK_D,
                BLOCK_DV=BLOCK_DV, CHUNK=CHUNK, CAUSAL=CAUSAL, NORMALIZE=NORMALIZE, SCALE=SCALE, EPS=EPS)


class LinearAttention(torch.autograd.Function):
    """(q, k, v, kv0, k_sum0) -> (o, kv, k_sum): the state after these keys (float32)."""

    @staticmethod
    def forward(ctx, q, k, v, kv0, k_sum0):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, N, _ = q.shape
        M = k.shape[2]
        o = torch.empty(*q.shape[:3], v.shape[3], device=q.device, dtype=torch.float32)
        total = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        kv1, k_sum1 = torch.empty_like(kv0), torch.empty_like(k_sum0)
        _linear_fwd[(B * H,)](q, k, v, kv0, k_sum0, o, total, kv1, k_sum1, N, M, H, **_constants(q, k, v))
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, kv0, k_sum0, o, total)
        return o, kv1, k_sum1

    @staticmethod
    def backward(ctx, grad_o, grad_kv1, grad_k_sum1):
        q, k, v, kv0, k_sum0, o, total = ctx.saved_tensors
        B, H, N, _ = q.shape
        M = k.shape[2]
        grad_o = torch.zeros_like(o) if grad_o is None else grad_o.contiguous()
        grad_kv1 = torch.zeros_like(kv0) if grad_kv1 is None else grad_kv1.contiguous().float()
        grad_k_sum1 = torch.zeros_like(k_sum0) if grad_k_sum1 is None else grad_k_sum1.contiguous().float()
        dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        dk = torch.empty(k.shape, device=q.device, dtype=torch.float32)
        dv = torch.empty(v.shape, device=q.device, dtype=torch.float32)
        grad_kv0, grad_k_sum0 = torch.empty_like(kv0), torch.empty_like(k_sum0)
        constants = _constants(q, k, v)
        _linear_bwd_dq[(B * H,)](q, k, v, kv0, k_sum0, o, total, grad_o, dq, N, M, H, **constants)
        _linear_bwd_dkdv[(B * k.shape[1],)](q, k, v, o, total, grad_o, grad_kv1, grad_k_sum1, dk, dv, grad_kv0,
                                            grad_k_sum0, N, M, H, **constants)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), grad_kv0, grad_k_sum0


def attention(q, k, v, kv=None, k_sum=None):
    """o [B, H, N, Dv] in q's dtype, and the state after these keys: kv [B, Hkv, D, Dv], k_sum [B, Hkv, D] (float32).

    kv, k_sum: the state of keys before these (both or neither; default none).
    """
    B, Hkv, _, D = k.shape
    if kv is None:
        kv = torch.zeros(B, Hkv, D, v.shape[3], device=q.device, dtype=torch.float32)
        k_sum = torch.zeros(B, Hkv, D, device=q.device, dtype=torch.float32)
    return LinearAttention.apply(q, k, v, kv.float().contiguous(), k_sum.float().contiguous())
'''


def print_feature_map(expr) -> str:
    """phi as Triton code of the float32 tile ``x``; a constant is broadcast to the tile."""
    text = TritonPrinter(CapturedNames(())).doprint(fold_numbers(expr))  # a feature map captures nothing
    return text if expr.has(feature) else f"{text} + tl.zeros_like(x)"


def generate(graph: Graph) -> GeneratedSource:
    """Python source with the Triton kernels and ``attention(q, k, v, kv=None, k_sum=None) -> (o, kv, k_sum)``."""
    node = linear_region(graph)
    op = node.op
    q_type, v_type = graph.input("q").type, graph.input("v").type
    ir_line = format_node(node, value_names(graph))
    w = SourceWriter()
    w.line(f'"""Linear attention generated by attncc {attncc.__version__} (backend: triton, form: {op.form}).')
    w.line()
    w.line("Inputs: q [B, H, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] (fp16, bf16 or fp32), and optionally")
    w.line("the state of earlier keys. Accumulates in float32. Generated from this IR:")
    w.line()
    for row in print_graph(graph).splitlines():
        w.line("    " + row)
    w.line('"""')
    w.line()
    w.line("import torch")
    w.line("import triton")
    w.line("import triton.language as tl")
    w.line()
    w.line(f"# {ir_line}", ir=ir_line)
    w.line(f"SCALE = {float(op.scale)!r}", ir=ir_line)
    w.line(f"EPS = {float(op.eps) if op.normalize else 0.0!r}", ir=ir_line)
    w.line(f"NORMALIZE = {op.normalize}", ir=ir_line)
    w.line(f"CAUSAL = {op.causal}", ir=ir_line)
    w.line(f"CHUNK = {max(16, op.chunk)}  # queries per chunk (tl.dot needs at least 16)", ir=ir_line)
    w.line(f"BLOCK_D, BLOCK_DV = {padded(int(q_type.shape[3]))}, {padded(int(v_type.shape[3]))}")
    w.line()
    w.line()
    w.line("@triton.jit", ir=ir_line)
    w.line("def _phi(x):", ir=ir_line)
    w.line(f'    """The feature map {sympy.sstr(op.phi)}."""')
    w.line(f"    return {print_feature_map(op.phi)}", ir=ir_line)
    w.line()
    w.line()
    w.line("@triton.jit", ir=ir_line)
    w.line("def _phi_grad(x):", ir=ir_line)
    w.line('    """d phi / dx."""')
    w.line(f"    return {print_feature_map(sympy.diff(op.phi, feature))}", ir=ir_line)
    for line in KERNELS.splitlines():
        w.line(line)
    return GeneratedSource(w.text(), "attention", w.line_map, name)
