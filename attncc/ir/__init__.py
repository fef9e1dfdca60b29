"""The attention IR: types, scalar expressions, ops, graphs, the printer and the verifier."""

from attncc.ir.expr import FloorDiv, b, captured_symbol, h, kv_idx, q_idx, score
from attncc.ir.graph import Graph, GraphBuilder, Node, verify
from attncc.ir.ops import (
    Alibi,
    FlashAttention,
    Input,
    LogSumExp,
    LseOf,
    Mask,
    Matmul,
    Op,
    Output,
    RepeatKV,
    Rope,
    Scale,
    ScoreMod,
    Softmax,
)
from attncc.ir.rope import RoPE
from attncc.ir.types import B, M, N, TensorType

__all__ = [
    "B",
    "M",
    "N",
    "Alibi",
    "FlashAttention",
    "FloorDiv",
    "LseOf",
    "Graph",
    "GraphBuilder",
    "Input",
    "LogSumExp",
    "Mask",
    "Matmul",
    "Node",
    "Op",
    "Output",
    "RepeatKV",
    "RoPE",
    "Rope",
    "Scale",
    "ScoreMod",
    "Softmax",
    "TensorType",
    "b",
    "captured_symbol",
    "h",
    "kv_idx",
    "q_idx",
    "score",
    "verify",
]
