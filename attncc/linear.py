"""Linear attention: compile ``AttentionSpec(kind="linear")`` to an O(N) program, and the functional form.

The meaning is the quadratic graph of ``attncc.frontend.lower.lower_linear``; the
``linearize`` pass reassociates it (see ``passes/linearize.py``). A program carries a
state between calls, the summary of the keys it has seen: ``kv = sum phi(k) v^T``
[B, Hkv, D, Dv] and ``k_sum = sum phi(k)`` [B, Hkv, D], in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import sympy
import torch

from attncc.api import InputTypeError, check_inputs
from attncc.cache import Generated, content_key, generator_fingerprint, load_generated
from attncc.errors import InputError, SpecError
from attncc.frontend.feature_map import feature_map_expr
from attncc.frontend.lower import lower_linear
from attncc.interpreter import run_reference
from attncc.ir.graph import Graph
from attncc.spec import LINEAR_EPS, AttentionSpec
from attncc.validation import TOLERANCES, ValidationReport, random_qkv, within_tolerance


class LinearAttentionState(NamedTuple):
    """What a linear attention program remembers of the keys it has seen (float32)."""

    kv: torch.Tensor  # [B, Hkv, D, Dv]: sum_j phi(k_j) v_j^T
    k_sum: torch.Tensor  # [B, Hkv, D]: sum_j phi(k_j)


def compile_linear(
    spec: AttentionSpec,
    backend: str = "pytorch",
    *,
    pipeline=None,
    validate_each: bool = False,
    print_after_all: bool = False,
    print_after: tuple[str, ...] = (),
) -> CompiledLinearAttention:
    """Compile a ``kind="linear"`` spec (``attncc.compile`` calls this); options as ``attncc.compile``."""
    from attncc import passes
    from attncc.backends import get_linear_backend

    if not isinstance(spec, AttentionSpec) or spec.kind != "linear":
        raise SpecError(f"spec={spec!r} is invalid: an attncc.AttentionSpec with kind='linear' is allowed")
    target = get_linear_backend(backend)
    unoptimized = lower_linear(spec, feature_map_expr(spec.feature_map))
    manager = passes.PassManager(
        passes.pipeline(pipeline or passes.LINEAR_PIPELINES[backend]),
        print_after_all=print_after_all,
        print_after=tuple(print_after),
        validate_each=validate_each,
    )
    graph = manager.run(unoptimized)
    key = content_key(str(graph), f"{target.__name__}", generator_fingerprint(target))
    generated = load_generated(key, lambda: target.generate(graph).source)
    return CompiledLinearAttention(spec, unoptimized, graph, manager.records, backend, generated)


class CompiledLinearAttention(torch.nn.Module):
    """A compiled linear attention program: ``o = attn(q, k, v)``.

    ``forward(q, k, v, initial_state=None, return_state=False)``: ``initial_state`` (a
    ``LinearAttentionState`` or a pair ``(kv, k_sum)``) summarises keys before ``k``,
    visible to every query; ``return_state`` also returns the state after ``k``, so a
    sequence fed in pieces (decoding one token at a time) gives the outputs of one call.
    Differentiable in q, k, v and the state.
    """

    def __init__(self, spec, unoptimized_graph: Graph, graph: Graph, pass_records, backend: str, generated: Generated):
        super().__init__()
        self.spec = spec
        self.unoptimized_graph = unoptimized_graph
        self.graph = graph
        self.pass_records = list(pass_records)
        self.backend = backend
        self.generated = generated
        self._function = generated.module.attention

    @property
    def path(self) -> Path | None:
        """The cache entry the program was imported from; None if it was compiled in memory."""
        return self.generated.path

    @property
    def source(self) -> str:
        """The generated source that runs (verified against its cache entry's checksum)."""
        return self.generated.source

    def explain(self, sizes: dict | None = None) -> str:
        """The passes that ran, the cost before and after each (default B=1, N=M=4096), and the final IR."""
        from attncc.api import explain_program

        return explain_program(self, sizes)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"backend={self.backend!r}, num_heads={s.num_heads}, num_kv_heads={s.num_kv_heads}, "
            f"head_dim={s.head_dim}, v_head_dim={s.v_head_dim}, feature_map={s.feature_map!r}, "
            f"causal={s.causal}, normalize={s.normalize}"
        )

    def forward(self, q, k, v, initial_state=None, return_state: bool = False):
        check_inputs(self.spec, q, k, v)
        kv, k_sum = check_state(initial_state, k, v)
        o, kv, k_sum = self._function(q, k, v, kv, k_sum)
        return (o, LinearAttentionState(kv, k_sum)) if return_state else o


def check_state(state, k, v) -> tuple:
    """(kv, k_sum) of a state for these keys, or (None, None); InputError naming what does not fit."""
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise InputTypeError(
            f"initial_state={type(state).__name__} is invalid: a LinearAttentionState (kv, k_sum) is allowed"
        )
    batch, kv_heads, _, dim = k.shape
    expected = {"kv": (batch, kv_heads, dim, v.shape[3]), "k_sum": (batch, kv_heads, dim)}
    for label, tensor in zip(expected, state):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise InputTypeError(f"initial_state.{label} is {type(tensor).__name__}: a float tensor is allowed")
        if tuple(tensor.shape) != expected[label]:
            raise InputError(
                f"initial_state.{label} has shape {tuple(tensor.shape)}; these inputs need {expected[label]} "
                "([B, Hkv, D, Dv] and [B, Hkv, D])"
            )
        if tensor.device != k.device:
            raise InputError(f"initial_state.{label} is on {tensor.device}, the inputs on {k.device}; move it")
    return tuple(state)


_PROGRAMS: dict[tuple, CompiledLinearAttention] = {}
_MAX_PROGRAMS = 64


def linear_attention(
    q,
    k,
    v,
    *,
    feature_map="elu+1",
    causal: bool = False,
    normalize: bool = True,
    eps: float = LINEAR_EPS,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str | None = None,
    return_state: bool = False,
    initial_state=None,
):
    """Linear attention of q [B, H, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] in O(N + M).

    o_i = sum_j a_ij v_j / (sum_j a_ij + eps) (without the division unless ``normalize``),
    a_ij = scale * phi(q_i) . phi(k_j) over the keys j visible to query i: all, or with
    ``causal`` those with j <= i + M - N; scale defaults to 1/sqrt(D). ``feature_map``:
    "elu+1", "relu", "identity" or an element-wise callable phi(x), traced once.
    ``enable_gqa``: Hkv may divide H (query head h reads KV head h // (H / Hkv)).
    ``initial_state`` / ``return_state``: see ``CompiledLinearAttention``. Compiled
    programs are cached per configuration.
    """
    from attncc.backends import backend_for_device

    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InputError(f"{label} must be a 4-D tensor [batch, heads, length, head_dim], got {_describe(t)}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads and not enable_gqa:
        raise InputError(
            f"q has {heads} heads and k {kv_heads}: pass enable_gqa=True for grouped-query attention "
            "(Hkv must divide H)"
        )
    if heads % kv_heads:
        raise InputError(f"q has {heads} heads, k has {kv_heads}: the KV heads must divide the query heads")
    backend = backend_for_device(q.device.type) if backend is None else backend
    phi = feature_map_expr(feature_map)
    key = (heads, kv_heads, q.shape[3], v.shape[3], scale, causal, normalize, eps, sympy.srepr(phi), backend)
    attn = _PROGRAMS.get(key)
    if attn is None:
        spec = AttentionSpec(
            num_heads=heads, num_kv_heads=kv_heads, head_dim=q.shape[3], v_head_dim=v.shape[3], scale=scale,
            causal=causal, kind="linear", feature_map=feature_map, normalize=normalize, eps=eps,
        )  # fmt: skip
        attn = compile_linear(spec, backend=backend)
        if len(_PROGRAMS) >= _MAX_PROGRAMS:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[key] = attn
    return attn(q, k, v, initial_state=initial_state, return_state=return_state)


def validate_linear(spec, backend, dtypes, shapes, seed: int, device, verbose: bool) -> ValidationReport:
    """``attncc.validate`` for linear attention: o against the quadratic graph in float64."""
    attn = compile_linear(spec, backend=backend)
    generator = torch.Generator().manual_seed(seed)
    report = ValidationReport()
    for batch, n, m in shapes:
        for dtype in dtypes:
            q, k, v = random_qkv(attn.unoptimized_graph, batch, n, m, dtype, generator, device)
            o = attn(q, k, v)
            reference = run_reference(attn.unoptimized_graph, q, k, v)["o"]
            ok, error, ratio = within_tolerance(o, reference, *TOLERANCES[dtype])
            report.rows.append({
                "dtype": str(dtype).removeprefix("torch."), "B": batch, "N": n, "M": m, "o_error": error,
                "lse_error": 0.0, "ratio": ratio, "ok": ok and o.dtype == dtype,
            })  # fmt: skip
    if verbose:
        print(report.table())
    return report


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


__all__ = [
    "CompiledLinearAttention",
    "LinearAttentionState",
    "compile_linear",
    "linear_attention",
    "validate_linear",
]
