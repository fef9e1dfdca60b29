"""The PyTorch backend for linear attention: streaming source for a ``linear_attention`` region.

The generated module applies the feature map (printed from its sympy expression, and its
derivative by ``sympy.diff`` for the backward) to one step of ``ROWS`` queries and keys at a
time, so no [N, M] matrix and no feature-mapped copy of q or k is ever stored:

- ``parallel`` (not causal): the state phi(K)^T [V 1] is summed step by step, then every
  query step reads it;
- ``chunked`` (causal): each step is cut into chunks of ``CHUNK`` queries; a chunk reads its
  own keys under the causal mask and the state of the keys before it (the state before the
  step plus the exclusive prefix sum of the step's chunk states), all chunks of a step at once.

``LinearAttention`` is a ``torch.autograd.Function``: the backward recomputes the feature
maps and states step by step (dQ walking forward, dK/dV walking backward with the gradient
of the state), so training stores only q, k, v, o and the row sums.
"""

from __future__ import annotations

import re

import sympy

import attncc
from attncc.backends.pytorch import print_expr
from attncc.backends.source import CapturedNames, GeneratedSource, SourceWriter
from attncc.errors import BackendError
from attncc.ir import ops
from attncc.ir.expr import feature, score
from attncc.ir.graph import Graph
from attncc.ir.printer import format_node, print_graph, value_names

name = "pytorch"
devices = ("cpu", "cuda", "mps", "xpu")

# Queries per Python step; a multiple of every chunk size the pipelines choose.
ROWS_PER_STEP = 2048


def print_feature_map(expr) -> str:
    """phi as torch code of the tensor ``x`` (printed with the score printer, whose tensor symbol is ``score``)."""
    return re.sub(r"\bscore\b", "x", print_expr(expr.xreplace({feature: score}), CapturedNames(())))


def linear_region(graph: Graph):
    """The graph's one linear_attention region, read by q, k, v and output as ``o``."""
    regions = graph.nodes_of(ops.LinearAttention)
    if len(regions) != 1 or graph.output.inputs != (regions[0],):
        raise BackendError("linear attention backends compile one linear_attention region (run the linearize pass)")
    return regions[0]


COMMON = '''

def _augmented(v):
    """[V 1]: values with a column of ones, so one product gives numerator and denominator."""
    return torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], dim=-1)


def _grouped(x, groups):
    """[B, H, L, X] -> [B, Hkv, GROUPS, L, X]: query head h = kv * GROUPS + g reads KV head kv."""
    return x.unflatten(1, (-1, groups))


def _finish(out, dtype):
    """o = numerator / (denominator + EPS) (0 where that is 0), or the numerator; and the divisor."""
    numerator, total = out[..., :-1], out[..., -1] + EPS
    if not NORMALIZE:
        return numerator.to(dtype), total
    safe = torch.where(total == 0, 1.0, total)
    return torch.where((total == 0).unsqueeze(-1), 0.0, numerator / safe.unsqueeze(-1)).to(dtype), total


def _grad_out(grad_o, o, total):
    """The gradient of [numerator, denominator] from that of o."""
    grad_o = grad_o.float()
    if not NORMALIZE:
        return torch.cat([grad_o, torch.zeros_like(grad_o[..., :1])], dim=-1)
    inverse = torch.where(total == 0, 0.0, 1 / torch.where(total == 0, 1.0, total)).unsqueeze(-1)
    grad_total = -(grad_o * o.float()).sum(-1, keepdim=True) * inverse
    return torch.cat([grad_o * inverse, grad_total], dim=-1)


def _steps(start, stop):
    return [(s, min(stop, s + ROWS)) for s in range(start, stop, ROWS)]


def _prefix_state(k, v, state, lo, hi):
    """state + phi(k_j)^T [v_j 1] over keys [lo, hi)."""
    for s0, s1 in _steps(lo, hi):
        state = state + phi(k[:, :, s0:s1].float()).transpose(-1, -2) @ _augmented(v[:, :, s0:s1])
    return state


def _prefix_grads(k, v, grad_state, lo, hi, dk, dv):
    """Gradients of the keys [lo, hi) that only enter the state, given the state's gradient."""
    for s0, s1 in _steps(lo, hi):
        k_step = k[:, :, s0:s1].float()
        values = _augmented(v[:, :, s0:s1])
        dk[:, :, s0:s1] = (values @ grad_state.transpose(-1, -2)) * phi_grad(k_step)
        dv[:, :, s0:s1] = (phi(k_step) @ grad_state)[..., :-1]


def _read_state(q, state, groups):
    """SCALE * phi(q) . state for queries that see only the state: [B, Hkv, G, L, Dv + 1]."""
    return SCALE * _grouped(phi(q.float()), groups) @ state.unsqueeze(2)
'''

PARALLEL = """

def _forward(q, k, v, state):
    B, H, N, _ = q.shape
    groups = H // k.shape[1]
    state = _prefix_state(k, v, state, 0, k.shape[2])
    o = q.new_empty(B, H, N, v.shape[3])
    total = q.new_empty(B, H, N, dtype=torch.float32)
    for s0, s1 in _steps(0, N):
        out = _read_state(q[:, :, s0:s1], state, groups).flatten(1, 2)
        o[:, :, s0:s1], total[:, :, s0:s1] = _finish(out, q.dtype)
    return o, total, state


def _backward(q, k, v, state, o, total, grad_o, grad_state):
    B, H, N, _ = q.shape
    groups = H // k.shape[1]
    final = _prefix_state(k, v, state, 0, k.shape[2])
    dq = torch.empty_like(q, dtype=torch.float32)
    grad_state = grad_state.clone()
    for s0, s1 in _steps(0, N):
        q_step = _grouped(q[:, :, s0:s1].float(), groups)
        grad = _grouped(_grad_out(grad_o[:, :, s0:s1], o[:, :, s0:s1], total[:, :, s0:s1]), groups)
        dq[:, :, s0:s1] = (SCALE * grad @ final.unsqueeze(2).transpose(-1, -2) * phi_grad(q_step)).flatten(1, 2)
        grad_state += SCALE * (phi(q_step).transpose(-1, -2) @ grad).sum(2)
    dk = torch.empty_like(k, dtype=torch.float32)
    dv = torch.empty_like(v, dtype=torch.float32)
    _prefix_grads(k, v, grad_state, 0, k.shape[2], dk, dv)
    return dq, dk, dv, grad_state
"""

CHUNKED = '''

def _chunks(x):
    """[..., L, X] -> [..., L / CHUNK, CHUNK, X], zero-padded to whole chunks."""
    pad = -x.shape[-2] % CHUNK
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.unflatten(-2, (-1, CHUNK))


def _exclusive_sum(x, reverse=False):
    """Along the chunk axis (2): the sum of the chunks before (after) each, itself excluded."""
    if reverse:
        x = x.flip(2)
    total = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1].cumsum(2)], dim=2)
    return total.flip(2) if reverse else total


def _step_inputs(q, k, v, s0, s1, offset, groups):
    """One step's feature maps and values, in chunks: q [B, Hkv, G, c, C, D], k [B, Hkv, c, C, D], [V 1]."""
    q_step = _chunks(_grouped(q[:, :, s0:s1].float(), groups))
    k_step = _chunks(k[:, :, s0 + offset : s1 + offset].float())
    return q_step, k_step, _chunks(_augmented(v[:, :, s0 + offset : s1 + offset]))


def _forward(q, k, v, state):
    B, H, N, _ = q.shape
    M = k.shape[2]
    groups = H // k.shape[1]
    offset = M - N  # query i sits at key position i + M - N
    lead, first = max(offset, 0), max(-offset, 0)
    state = _prefix_state(k, v, state, 0, lead)
    o = q.new_empty(B, H, N, v.shape[3])
    total = q.new_empty(B, H, N, dtype=torch.float32)
    for s0, s1 in _steps(0, first):  # queries before the first key: the state only
        o[:, :, s0:s1], total[:, :, s0:s1] = _finish(_read_state(q[:, :, s0:s1], state, groups).flatten(1, 2), q.dtype)
    for s0, s1 in _steps(first, N):
        q_step, k_step, values = _step_inputs(q, k, v, s0, s1, offset, groups)
        phi_q, phi_k = phi(q_step), phi(k_step) * _valid(k_step, s1 - s0)
        chunk_states = phi_k.transpose(-1, -2) @ values  # [B, Hkv, c, D, Dv + 1]
        before = state.unsqueeze(2) + _exclusive_sum(chunk_states)
        scores = (phi_q @ phi_k.unsqueeze(2).transpose(-1, -2)).tril_()
        out = SCALE * (scores @ values.unsqueeze(2) + phi_q @ before.unsqueeze(2))
        out = out.flatten(3, 4)[..., : s1 - s0, :].flatten(1, 2)
        o[:, :, s0:s1], total[:, :, s0:s1] = _finish(out, q.dtype)
        state = state + chunk_states.sum(2)
    return o, total, state


def _valid(x, length):
    """1 for the step's real rows, 0 for the padding of the last chunk (phi(0) need not be 0)."""
    rows = torch.arange(x.shape[-3] * CHUNK, device=x.device).view(-1, CHUNK, 1)
    return (rows < length).to(x.dtype)


def _backward(q, k, v, state, o, total, grad_o, grad_state):
    B, H, N, _ = q.shape
    M = k.shape[2]
    groups = H // k.shape[1]
    offset = M - N
    lead, first = max(offset, 0), max(-offset, 0)
    dq = torch.empty_like(q, dtype=torch.float32)
    dk = torch.empty_like(k, dtype=torch.float32)
    dv = torch.empty_like(v, dtype=torch.float32)

    def grads(s0, s1):
        grad = _grad_out(grad_o[:, :, s0:s1], o[:, :, s0:s1], total[:, :, s0:s1])
        return _chunks(_grouped(grad, groups))

    # dQ, walking forward with the state of the keys before each chunk.
    state = _prefix_state(k, v, state, 0, lead)
    for s0, s1 in _steps(0, first):
        grad = _grouped(_grad_out(grad_o[:, :, s0:s1], o[:, :, s0:s1], total[:, :, s0:s1]), groups)
        q_step = _grouped(q[:, :, s0:s1].float(), groups)
        dq[:, :, s0:s1] = (SCALE * grad @ state.unsqueeze(2).transpose(-1, -2) * phi_grad(q_step)).flatten(1, 2)
    for s0, s1 in _steps(first, N):
        q_step, k_step, values = _step_inputs(q, k, v, s0, s1, offset, groups)
        phi_k = phi(k_step) * _valid(k_step, s1 - s0)
        grad = grads(s0, s1)
        chunk_states = phi_k.transpose(-1, -2) @ values
        before = state.unsqueeze(2) + _exclusive_sum(chunk_states)
        grad_scores = (grad @ values.unsqueeze(2).transpose(-1, -2)).tril_()
        grad_phi_q = SCALE * (grad_scores @ phi_k.unsqueeze(2) + grad @ before.unsqueeze(2).transpose(-1, -2))
        dq_step = grad_phi_q * phi_grad(q_step)
        dq[:, :, s0:s1] = dq_step.flatten(3, 4)[..., : s1 - s0, :].flatten(1, 2)
        state = state + chunk_states.sum(2)

    # dK and dV, walking backward with the gradient of the state after each chunk.
    grad_state = grad_state.clone()
    for s0, s1 in reversed(_steps(first, N)):
        q_step, k_step, values = _step_inputs(q, k, v, s0, s1, offset, groups)
        valid = _valid(k_step, s1 - s0)
        phi_q, phi_k = phi(q_step), phi(k_step) * valid
        grad = grads(s0, s1)
        chunk_grads = SCALE * (phi_q.transpose(-1, -2) @ grad).sum(2)  # [B, Hkv, c, D, Dv + 1]
        after = grad_state.unsqueeze(2) + _exclusive_sum(chunk_grads, reverse=True)
        scores_t = (phi_k.unsqueeze(2) @ phi_q.transpose(-1, -2)).triu_()  # key t, query s: t <= s
        grad_scores_t = (values.unsqueeze(2) @ grad.transpose(-1, -2)).triu_()
        grad_phi_k = SCALE * (grad_scores_t @ phi_q).sum(2) + values @ after.transpose(-1, -2)
        grad_values = SCALE * (scores_t @ grad).sum(2) + phi_k @ after
        keys = slice(s0 + offset, s1 + offset)
        dk[:, :, keys] = (grad_phi_k * phi_grad(k_step)).flatten(2, 3)[:, :, : s1 - s0]
        dv[:, :, keys] = grad_values.flatten(2, 3)[:, :, : s1 - s0, :-1]
        grad_state += chunk_grads.sum(2)
    for s0, s1 in _steps(0, first):
        q_step = _grouped(q[:, :, s0:s1].float(), groups)
        grad = _grouped(_grad_out(grad_o[:, :, s0:s1], o[:, :, s0:s1], total[:, :, s0:s1]), groups)
        grad_state += SCALE * (phi(q_step).transpose(-1, -2) @ grad).sum(2)
    _prefix_grads(k, v, grad_state, 0, lead, dk, dv)
    return dq, dk, dv, grad_state
'''

AUTOGRAD = '''

class LinearAttention(torch.autograd.Function):
    """(q, k, v, state [B, Hkv, D, Dv + 1]) -> (o, state after these keys); state = [sum phi(k) v^T, sum phi(k)]."""

    @staticmethod
    def forward(ctx, q, k, v, state):
        o, total, final = _forward(q, k, v, state)
        ctx.save_for_backward(q, k, v, state, o, total)
        return o, final

    @staticmethod
    def backward(ctx, grad_o, grad_final):
        q, k, v, state, o, total = ctx.saved_tensors
        grad_o = torch.zeros_like(o) if grad_o is None else grad_o
        grad_final = torch.zeros_like(state) if grad_final is None else grad_final
        dq, dk, dv, grad_state = _backward(q, k, v, state, o, total, grad_o, grad_final)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), grad_state


def attention(q, k, v, kv=None, k_sum=None):
    """o [B, H, N, Dv] in q's dtype, and the state after these keys: kv [B, Hkv, D, Dv], k_sum [B, Hkv, D] (float32).

    kv, k_sum: the state of keys before these (both or neither; default none).
    """
    B, Hkv, _, D = k.shape
    if kv is None:
        state = q.new_zeros(B, Hkv, D, v.shape[3] + 1, dtype=torch.float32)
    else:
        state = torch.cat([kv.float(), k_sum.float().unsqueeze(-1)], dim=-1)
    o, final = LinearAttention.apply(q, k, v, state)
    return o, final[..., :-1], final[..., -1]
'''


def generate(graph: Graph) -> GeneratedSource:
    """Python source defining ``attention(q, k, v, kv=None, k_sum=None) -> (o, kv, k_sum)``."""
    node = linear_region(graph)
    op = node.op
    if op.groups != graph.input("q").type.shape[1] // graph.input("k").type.shape[1]:
        raise BackendError(f"linear_attention groups {op.groups} do not match the heads of q and k")
    ir_line = format_node(node, value_names(graph))
    w = SourceWriter()
    w.line(f'"""Linear attention generated by attncc {attncc.__version__} (backend: pytorch, form: {op.form}).')
    w.line()
    w.line("Inputs: q [B, H, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] (fp16, bf16 or fp32), and optionally")
    w.line("the state of earlier keys. Accumulates in float32. Generated from this IR:")
    w.line()
    for row in print_graph(graph).splitlines():
        w.line("    " + row)
    w.line('"""')
    w.line()
    w.line("import torch")
    w.line()
    w.line(f"# {ir_line}", ir=ir_line)
    w.line(f"SCALE = {float(op.scale)!r}", ir=ir_line)
    w.line(f"EPS = {float(op.eps) if op.normalize else 0.0!r}", ir=ir_line)
    w.line(f"NORMALIZE = {op.normalize}", ir=ir_line)
    if op.form == "chunked":
        w.line(f"CHUNK = {op.chunk}  # queries per chunk; each reads its own keys under the causal mask", ir=ir_line)
        rows = max(op.chunk, ROWS_PER_STEP // op.chunk * op.chunk)
    else:
        rows = ROWS_PER_STEP
    w.line(f"ROWS = {rows}  # queries (and keys) per step", ir=ir_line)
    w.line()
    w.line()
    w.line("def phi(x):", ir=ir_line)
    w.line(f'    """The feature map {sympy.sstr(op.phi)}."""')
    w.line(f"    return {print_feature_map(op.phi)}", ir=ir_line)
    w.line()
    w.line()
    w.line("def phi_grad(x):", ir=ir_line)
    w.line('    """d phi / dx."""')
    derivative = sympy.diff(op.phi, feature)
    w.line(f"    return {print_feature_map(derivative)} + torch.zeros_like(x)", ir=ir_line)
    body = COMMON + (CHUNKED if op.form == "chunked" else PARALLEL) + AUTOGRAD
    for line in body.splitlines():
        w.line(line)
    return GeneratedSource(w.text(), "attention", w.line_map, name)
