"""Numerical checking against the float64 reference: tolerances, example inputs, reports.

Shared by ``attncc.validate`` (a compiled program against its unoptimized graph)
and the PassManager's translation validation (a graph before and after a pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tabulate import tabulate

from attncc.errors import InputError
from attncc.ir.expr import bare_index_uses
from attncc.ir.graph import Graph

# Error allowed against the float64 reference, per input dtype: |out - ref| <= atol + rtol * |ref|.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
LSE_TOLERANCE = (1e-5, 1e-5)


def lse_tolerance(dtype, rope: bool) -> tuple[float, float]:
    """lse's tolerance: float32's, or with RoPE in fp16 / bf16 the input dtype's, since a kernel may round
    the turned q and k to the input dtype before q . k (the triton backend does, as tensor cores take it)."""
    return TOLERANCES[dtype] if rope and dtype != torch.float32 else LSE_TOLERANCE


TORCH_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}


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


def graph_index_uses(graph: Graph) -> set[tuple[str, int, str]]:
    """(tensor, dim, symbol) for captured tensors indexed by a bare index symbol anywhere in the graph."""
    uses = set()
    for node in graph.nodes:
        for attribute in node.op.attributes().values():
            if hasattr(attribute, "atoms"):
                uses |= bare_index_uses(attribute)
    return uses


def example_captured(captured_meta: dict, generator, device) -> dict:
    """Captured tensors to check with: their values, else random floats or bools of the declared shape."""
    values = {}
    for name, meta in captured_meta.items():
        if meta.value is not None:
            values[name] = meta.value.to(device)
        elif meta.shape is None:
            raise InputError(f"validation needs a value or a shape for captured tensor {name!r}")
        elif meta.dtype == "bool":
            values[name] = (torch.rand(meta.shape, generator=generator) < 0.2).to(device)
        elif meta.is_float:
            values[name] = torch.randn(meta.shape, generator=generator).to(device, TORCH_DTYPES[meta.dtype])
        else:
            raise InputError(f"validation cannot invent integer values for captured tensor {name!r}; give it values")
    return values


def example_positions(names, generator) -> dict:
    """RoPE position tensors to check with: random int64 positions, [2, 64] (a check clips B, N and M to them)."""
    return {name: torch.randint(-64, 4096, (2, 64), generator=generator) for name in names}


def clip_lengths(index_uses, captured: dict, batch: int, n: int, m: int) -> tuple[int, int, int]:
    """Shrink B, N, M so that every captured tensor indexed by b, q_idx or kv_idx is long enough."""
    limits = {"b": batch, "q_idx": n, "kv_idx": m}
    for name, dim, symbol in index_uses:
        if symbol in limits:
            limits[symbol] = min(limits[symbol], captured[name].shape[dim])
    return limits["b"], limits["q_idx"], limits["kv_idx"]


def random_qkv(graph: Graph, batch: int, n: int, m: int, dtype, generator, device="cpu"):
    """Random q, k, v for a graph's input shapes (heads and head dims are fixed in the IR)."""
    shapes = {}
    for node in graph.inputs:
        if node.op.role in ("query", "key", "value"):
            _, heads, _, dim = node.type.shape
            length = n if node.op.role == "query" else m
            shapes[node.op.role] = (batch, int(heads), length, int(dim))
    return tuple(torch.randn(shapes[role], generator=generator).to(device, dtype) for role in ("query", "key", "value"))
