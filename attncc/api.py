"""The public entry points: compile a spec into a CompiledAttention module, and validate it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tabulate import tabulate

from attncc.cache import cached_source, content_key, load_module
from attncc.errors import InputError, SpecError
from attncc.frontend.lower import lower, merged_captured, trace_mods
from attncc.frontend.mod import Captured, ir_dtype
from attncc.interpreter import run_reference
from attncc.ir.expr import bare_index_uses
from attncc.ir.graph import Graph
from attncc.spec import AttentionSpec

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SIZE_OF_SYMBOL = {"b": 0, "h": 1, "q_idx": 2, "kv_idx": 2}


class InputTypeError(InputError, TypeError):
    """A call-time argument has the wrong type (not a tensor, integer dtype, ...)."""


def compile(spec: AttentionSpec, backend: str = "pytorch") -> CompiledAttention:  # noqa: A001
    """Compile a spec into a module computing ``o`` (and ``lse``) from ``q, k, v``."""
    from attncc.backends import get_backend

    if not isinstance(spec, AttentionSpec):
        raise SpecError(f"spec={spec!r} is invalid: an attncc.AttentionSpec is allowed (see attncc.load_spec)")
    target = get_backend(backend)
    score_mod, mask_mod = trace_mods(spec)
    graph = lower(spec, (score_mod, mask_mod))
    key = content_key(str(graph), target.name)
    generated = None

    def generate():
        nonlocal generated
        generated = target.generate(graph)
        return generated.source

    path = cached_source(key, ".py", generate)
    module = load_module(path)
    return CompiledAttention(spec, graph, target.name, path, module.attention, merged_captured(score_mod, mask_mod))


class CompiledAttention(torch.nn.Module):
    """A compiled attention program as a module: ``o = attn(q, k, v)``.

    ``forward(q, k, v, return_lse=False, **captured)``: captured tensors of the mods
    are held as buffers (under ``.captured``) and can be replaced per call by name.
    """

    def __init__(self, spec, graph: Graph, backend: str, path, function, captured: dict[str, Captured]):
        super().__init__()
        self.spec = spec
        self.graph = graph
        self.backend = backend
        self.path = path
        self._function = function
        self._captured_meta = dict(captured)
        self.captured = torch.nn.Module()
        for name, info in captured.items():
            if info.value is not None:
                self.captured.register_buffer(name, info.value, persistent=False)
        self._index_uses = set()
        for node in graph.nodes:
            for expression in (getattr(node.op, "expr", None), getattr(node.op, "predicate", None)):
                if expression is not None:
                    self._index_uses |= bare_index_uses(expression)

    @property
    def source(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def explain(self) -> str:
        """What was compiled: the spec, the IR the backend received, and where its source lives."""
        lines = [
            f"spec: {self.spec}",
            f"backend: {self.backend}",
            "passes: none (the backend receives the unoptimized graph)",
            f"source: {self.path}",
            "IR:",
            str(self.graph),
        ]
        return "\n".join(lines)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"backend={self.backend!r}, num_heads={s.num_heads}, num_kv_heads={s.num_kv_heads}, "
            f"head_dim={s.head_dim}, v_head_dim={s.v_head_dim}"
        )

    def captured_values(self, overrides: dict, device) -> list[torch.Tensor]:
        unknown = sorted(set(overrides) - set(self._captured_meta))
        if unknown:
            allowed = ", ".join(self._captured_meta) or "none"
            raise InputError(f"unknown captured tensor {unknown[0]!r}; this program captures: {allowed}")
        values = []
        for name, meta in self._captured_meta.items():
            value = overrides.get(name, getattr(self.captured, name, None))
            if value is None:
                raise InputError(f"captured tensor {name!r} has no value: pass it as attn(q, k, v, {name}=tensor)")
            if not isinstance(value, torch.Tensor):
                raise InputTypeError(
                    f"captured tensor {name}={type(value).__name__} is invalid: a torch.Tensor is allowed"
                )
            if ir_dtype(value.dtype) != meta.dtype or value.dim() != meta.ndim:
                raise InputError(
                    f"captured tensor {name!r} is {value.dtype} with {value.dim()} dims; the program was "
                    f"compiled for {meta.dtype} with {meta.ndim} dims (recompile for another dtype)"
                )
            if value.device != device:
                raise InputError(f"captured tensor {name!r} is on {value.device}, the inputs on {device}; move it")
            values.append(value)
        return values

    def forward(self, q, k, v, return_lse: bool = False, **captured):
        check_inputs(self.spec, q, k, v)
        values = self.captured_values(captured, q.device)
        by_name = dict(zip(self._captured_meta, values))
        sizes = {"b": q.shape[0], "h": q.shape[1], "q_idx": q.shape[2], "kv_idx": k.shape[2]}
        for name, dim, symbol in sorted(self._index_uses):
            if by_name[name].shape[dim] < sizes[symbol]:
                raise InputError(
                    f"captured tensor {name!r} has {by_name[name].shape[dim]} entries along dim {dim}, but is indexed "
                    f"by {symbol} up to {sizes[symbol] - 1}"
                )
        o, lse = self._function(q, k, v, *values)
        return (o, lse) if return_lse else o


def check_inputs(spec: AttentionSpec, q, k, v) -> None:
    """Raise InputError naming the argument unless q, k, v fit the spec."""
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{label} is a {type(t).__name__}: a torch.Tensor is allowed")
        if t.dim() != 4:
            raise InputError(
                f"{label} has shape {tuple(t.shape)}: a 4-D tensor [batch, heads, length, head_dim] is allowed"
            )
        if t.dtype not in INPUT_DTYPES:
            raise InputTypeError(f"{label} has dtype {t.dtype}: float16, bfloat16 or float32 are allowed")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputTypeError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}: they must be equal")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v are on {q.device}, {k.device}, {v.device}: they must be on one device")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise InputError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    expected = (("q", q, 1, spec.num_heads, "num_heads"), ("k", k, 1, spec.num_kv_heads, "num_kv_heads"),
                ("v", v, 1, spec.num_kv_heads, "num_kv_heads"), ("q", q, 3, spec.head_dim, "head_dim"),
                ("k", k, 3, spec.head_dim, "head_dim"), ("v", v, 3, spec.v_head_dim, "v_head_dim"))  # fmt: skip
    for label, t, dim, size, field_name in expected:
        if t.shape[dim] != size:
            axis = "heads" if dim == 1 else "head dim"
            raise InputError(
                f"{label} has {t.shape[dim]} {axis} (shape {tuple(t.shape)}); the spec's {field_name} is {size}"
            )
    if k.shape[2] != v.shape[2]:
        raise InputError(f"k has {k.shape[2]} keys and v has {v.shape[2]} values: they must be equal")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise InputError(f"sequence lengths must be positive: q has {q.shape[2]}, k has {k.shape[2]}")


# Error allowed against the float64 reference, per input dtype: |out - ref| <= atol + rtol * |ref|.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
LSE_TOLERANCE = (1e-5, 1e-5)


def within_tolerance(actual, reference, atol: float, rtol: float) -> tuple[bool, float, float]:
    """(ok, max abs error, worst error / allowed error); infinities must match exactly, NaN never passes."""
    actual, reference = actual.double(), reference.double()
    if torch.isnan(actual).any():
        return False, math.nan, math.inf
    same_inf = torch.isinf(reference) & (actual == reference)
    error = torch.where(same_inf, 0.0, (actual - reference).abs())
    error = torch.nan_to_num(error, nan=math.inf)
    allowed = atol + rtol * torch.where(torch.isinf(reference), 0.0, reference.abs())
    if error.numel() == 0:
        return True, 0.0, 0.0
    ratio = float((error / allowed).max())
    return ratio <= 1.0, float(error.max()), ratio


@dataclass
class ValidationReport:
    rows: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(row["ok"] for row in self.rows)

    def table(self) -> str:
        headers = ["dtype", "B", "N", "M", "max |o - ref|", "max |lse - ref|", "worst / allowed", "result"]
        body = [
            [r["dtype"], r["B"], r["N"], r["M"], f"{r['o_error']:.2e}", f"{r['lse_error']:.2e}",
             f"{r['ratio']:.2f}", "ok" if r["ok"] else "FAIL"]
            for r in self.rows
        ]  # fmt: skip
        return tabulate(body, headers=headers)

    def __str__(self) -> str:
        return self.table()


DEFAULT_SHAPES = ((2, 37, 53), (1, 64, 29))


def validate(spec, backend: str = "pytorch", dtypes=INPUT_DTYPES, shapes=DEFAULT_SHAPES, seed: int = 0,
             device="cpu", verbose: bool = True) -> ValidationReport:  # fmt: skip
    """Compile ``spec`` and compare it with the reference interpreter on fresh random inputs.

    ``shapes`` are (B, N, M) triples, clipped to what the captured tensors allow.
    Prints a table when ``verbose``; returns the report (``report.ok``). An element
    passes when |out - ref| <= atol + rtol * |ref| (``TOLERANCES`` per dtype); the
    table's "worst / allowed" is the largest ratio of the two, at most 1 to pass.
    """
    attn = compile(spec, backend=backend).to(device)
    generator = torch.Generator().manual_seed(seed)
    captured = _validation_captured(attn, generator, device)
    report = ValidationReport()
    for batch, n, m in shapes:
        batch, n, m = _clip_shape(attn, captured, batch, n, m)
        for dtype in dtypes:
            s = spec
            q = torch.randn(batch, s.num_heads, n, s.head_dim, generator=generator).to(device, dtype)
            k = torch.randn(batch, s.num_kv_heads, m, s.head_dim, generator=generator).to(device, dtype)
            v = torch.randn(batch, s.num_kv_heads, m, s.v_head_dim, generator=generator).to(device, dtype)
            o, lse = attn(q, k, v, return_lse=True, **captured)
            reference = run_reference(attn.graph, q, k, v, captured)
            atol, rtol = TOLERANCES[dtype]
            o_ok, o_error, o_ratio = within_tolerance(o, reference["o"], atol, rtol)
            lse_ok, lse_error, lse_ratio = within_tolerance(lse, reference["lse"], *LSE_TOLERANCE)
            report.rows.append({
                "dtype": str(dtype).removeprefix("torch."), "B": batch, "N": n, "M": m, "o_error": o_error,
                "lse_error": lse_error, "ratio": max(o_ratio, lse_ratio), "ok": o_ok and lse_ok and o.dtype == dtype,
            })  # fmt: skip
    if verbose:
        print(report.table())
    return report


def _validation_captured(attn: CompiledAttention, generator, device) -> dict:
    """The captured tensors to validate with: their values, else random floats or bools."""
    values = {}
    for name, meta in attn._captured_meta.items():
        value = getattr(attn.captured, name, None)
        if value is not None:
            values[name] = value
            continue
        declared = meta.shape
        if declared is None:
            raise InputError(f"validate needs a value or a shape for captured tensor {name!r}")
        if meta.dtype == "bool":
            values[name] = (torch.rand(declared, generator=generator) < 0.2).to(device)
        elif meta.is_float:
            values[name] = torch.randn(declared, generator=generator).to(device, _TORCH_DTYPES[meta.dtype])
        else:
            raise InputError(f"validate cannot invent integer values for captured tensor {name!r}; give it values")
    return values


_TORCH_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}


def _clip_shape(attn: CompiledAttention, captured: dict, batch: int, n: int, m: int) -> tuple[int, int, int]:
    limits = {"b": batch, "q_idx": n, "kv_idx": m}
    for name, dim, symbol in attn._index_uses:
        if symbol in limits:
            limits[symbol] = min(limits[symbol], captured[name].shape[dim])
    return limits["b"], limits["q_idx"], limits["kv_idx"]


def reference_outputs(attn: CompiledAttention, q, k, v, **captured) -> dict:
    """The float64 reference of a compiled module's unoptimized graph on these inputs."""
    values = dict(zip(attn._captured_meta, attn.captured_values(captured, q.device)))
    return run_reference(attn.graph, q, k, v, values)


__all__ = ["CompiledAttention", "ValidationReport", "check_inputs", "compile", "validate"]
