"""FX capture: find the attention in a torch model and run it through attncc.

``capture(model, example_inputs)`` traces the model (``torch.fx.symbolic_trace``, or
``torch.export`` with ``method="export"``), records every value on the example
inputs, and looks for two forms of attention on 4-D ``[batch, heads, length, dim]``
tensors:

- ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale, enable_gqa)``;
- attention written by hand: ``matmul(q, k^T)``, then elementwise steps on the
  scores (multiply or divide by a constant, add a mask or bias tensor, ``masked_fill``,
  ``torch.where``, ``tanh`` / soft-capping, dtype casts), ``softmax`` over the last
  dim, casts and dropout that is off (eval mode or p = 0), and ``matmul(weights, v)``;
  ``k`` and ``v`` may be repeated per head group (Llama's ``repeat_kv``,
  ``repeat_interleave``) and ``k^T`` may be any transposition of ``k``.

Each match becomes a ``ChainAttention`` module (a compiled attncc program; mask
and bias tensors are passed in on every call) called where the attention was. A
pattern is rewritten only when every node between the two matmuls is understood
and feeds nothing else; every softmax, SDPA call and ``nn.MultiheadAttention`` is
listed in the report with what was done or why not. With ``check=True`` the
rewritten model is compared with the original on the example inputs.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils import _pytree as pytree

from attncc.errors import AttnccError, InputError, ValidationError
from attncc.integrations.chain import ChainAttention, ChainSpec, Step

ATTNCC_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tolerances of the end-to-end check (|new - original| <= atol + rtol * |original|). The model's
# own arithmetic differs from attncc's float32 streaming softmax by rounding; a wrong rewrite
# is off by far more.
CHECK_TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float64: (1e-4, 1e-4),
}


# --------------------------------------------------------------------------- canonical op names


def _aten(name: str, overload: str):
    packet = getattr(torch.ops.aten, name, None)
    return getattr(packet, overload, None) if packet is not None else None


def _table(entries: dict) -> dict:
    table = {}
    for name, targets in entries.items():
        for target in targets:
            if target is not None:
                table[target] = name
    return table


_FUNCTIONS = _table({
    "matmul": [torch.matmul, operator.matmul, _aten("matmul", "default")],
    "transpose": [torch.transpose, _aten("transpose", "int")],
    "permute": [torch.permute, _aten("permute", "default")],
    "mul": [operator.mul, torch.mul, _aten("mul", "Tensor"), _aten("mul", "Scalar")],
    "div": [operator.truediv, torch.div, torch.true_divide, _aten("div", "Tensor"), _aten("div", "Scalar")],
    "add": [operator.add, torch.add, _aten("add", "Tensor"), _aten("add", "Scalar")],
    "sub": [operator.sub, torch.sub, _aten("sub", "Tensor"), _aten("sub", "Scalar")],
    "masked_fill": [torch.masked_fill, _aten("masked_fill", "Scalar")],
    "where": [torch.where, _aten("where", "self"), _aten("where", "ScalarOther"), _aten("where", "ScalarSelf"),
              _aten("where", "Scalar")],
    "tanh": [torch.tanh, F.tanh, _aten("tanh", "default")],
    "softmax": [F.softmax, torch.softmax, _aten("softmax", "int"), _aten("_softmax", "default")],
    "dropout": [F.dropout, torch.dropout, _aten("dropout", "default")],
    "cast": [_aten("_to_copy", "default"), _aten("to", "dtype")],
    "identity": [_aten("clone", "default"), _aten("alias", "default"), _aten("contiguous", "default")],
    "sdpa": [F.scaled_dot_product_attention, _aten("scaled_dot_product_attention", "default")],
    "getitem": [operator.getitem],
    "getattr": [getattr],
    "unsqueeze": [torch.unsqueeze, _aten("unsqueeze", "default")],
    "expand": [_aten("expand", "default")],
    "reshape": [torch.reshape, _aten("reshape", "default"), _aten("view", "default"), _aten("_unsafe_view", "default")],
    "repeat_interleave": [torch.repeat_interleave, _aten("repeat_interleave", "self_int")],
    "slice": [_aten("slice", "Tensor")],
})  # fmt: skip

_METHODS = {
    "matmul": "matmul", "transpose": "transpose", "permute": "permute", "mul": "mul", "div": "div",
    "true_divide": "div", "add": "add", "sub": "sub", "masked_fill": "masked_fill", "tanh": "tanh",
    "softmax": "softmax", "to": "cast", "float": "cast", "half": "cast", "bfloat16": "cast", "double": "cast",
    "type_as": "cast", "type": "cast", "contiguous": "identity", "clone": "identity", "unsqueeze": "unsqueeze",
    "expand": "expand", "reshape": "reshape", "view": "reshape", "repeat_interleave": "repeat_interleave",
    "size": "size",
}  # fmt: skip


def _kind(node) -> str | None:
    """The canonical name of what a node computes (one name for torch, Tensor-method and ATen spellings)."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_function":
        if node.target is torch.div and node.kwargs.get("rounding_mode") is not None:
            return None
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def _arg(node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class NoMatch(Exception):
    """The pattern at a node is not one attncc can rewrite; the message says why."""


# --------------------------------------------------------------------------- recorded values


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once and keeps each node's shape and dtype (tensors) or value (numbers, sizes)."""

    def __init__(self, module):
        super().__init__(module)
        self.values: dict[torch.fx.Node, object] = {}

    def run_node(self, node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            self.values[node] = TensorInfo(tuple(result.shape), result.dtype)
        elif isinstance(result, (numbers.Number, torch.Size)) or (
            isinstance(result, tuple) and all(isinstance(x, numbers.Number) for x in result)
        ):
            self.values[node] = result
        return result


# --------------------------------------------------------------------------- the report


@dataclass
class Finding:
    """One attention-like node: what it is, where it is, and what capture did with it."""

    node: str
    form: str
    module: str
    rewritten: bool
    detail: str


@dataclass
class CaptureReport:
    """What capture matched and rewrote, and what it left alone and why."""

    findings: list[Finding] = field(default_factory=list)
    max_error: float | None = None

    @property
    def matched(self) -> list[Finding]:
        return [f for f in self.findings if f.rewritten]

    @property
    def unmatched(self) -> list[Finding]:
        return [f for f in self.findings if not f.rewritten]

    def __str__(self) -> str:
        rows = [[f.node, f.module or "-", f.form, "rewritten" if f.rewritten else "left as is", f.detail]
                for f in self.findings]  # fmt: skip
        lines = [f"attncc capture: {len(self.matched)} attention rewritten, {len(self.unmatched)} left as is"]
        if rows:
            lines.append(tabulate(rows, headers=["node", "module", "form", "result", "details"]))
        if self.max_error is not None:
            lines.append(f"check on the example inputs: max |new - original| = {self.max_error:.3g}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- matching


@dataclass
class Match:
    """A rewritable attention: its inputs, the chain spec, and the nodes it replaces."""

    output: torch.fx.Node
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    tensors: list[torch.fx.Node]
    spec: ChainSpec
    transpose_k: bool = False
    replaced: list[torch.fx.Node] = field(default_factory=list)


class _Matcher:
    def __init__(self, graph_module: torch.fx.GraphModule, values: dict):
        self.module = graph_module
        self.values = values

    # ---- values

    def info(self, node) -> TensorInfo | None:
        value = self.values.get(node) if isinstance(node, torch.fx.Node) else None
        return value if isinstance(value, TensorInfo) else None

    def tensor4(self, node, role: str) -> TensorInfo:
        info = self.info(node)
        if info is None or len(info.shape) != 4:
            shape = "not a tensor" if info is None else f"{len(info.shape)}-D {list(info.shape)}"
            raise NoMatch(f"{role} is {shape}; attncc matches 4-D [batch, heads, length, dim] tensors")
        return info

    def scalar(self, value, sources) -> float:
        """A constant, or a number computed only from the last dim (head dim) of ``sources``."""
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, torch.fx.Node) and self._head_dim_expression(value, sources):
            return float(self.values[value])
        raise NoMatch(f"{_label(value)} is not a constant (nor computed from the head dim only)")

    def _head_dim_expression(self, node, sources) -> bool:
        if isinstance(node, numbers.Number):
            return True
        if not isinstance(node, torch.fx.Node) or not isinstance(self.values.get(node), numbers.Number):
            return False
        kind = _kind(node)
        if kind == "size":
            dim = _arg(node, 1, "dim")
            return node.args[0] in sources and dim in (-1, 3)
        if kind == "getitem" and _kind(node.args[0]) == "getattr":
            shape_of = node.args[0]
            return shape_of.args[1] == "shape" and shape_of.args[0] in sources and node.args[1] in (-1, 3)
        arithmetic = (operator.mul, operator.truediv, operator.pow, operator.add, operator.sub, operator.neg)
        if node.op == "call_function" and node.target in arithmetic:
            return all(self._head_dim_expression(a, sources) for a in node.args)
        return False

    # ---- forms

    def match_sdpa(self, node) -> Match:
        q, k, v = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
        qi, ki, vi = self.tensor4(q, "query"), self.tensor4(k, "key"), self.tensor4(v, "value")
        mask = _arg(node, 3, "attn_mask")
        dropout_p = _arg(node, 4, "dropout_p", 0.0)
        is_causal = _arg(node, 5, "is_causal", False)
        scale = node.kwargs.get("scale")
        enable_gqa = node.kwargs.get("enable_gqa", False)
        if not isinstance(dropout_p, numbers.Number) or dropout_p != 0:
            raise NoMatch(f"dropout_p={_label(dropout_p)}: attncc has no attention dropout (capture in eval mode)")
        if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
            raise NoMatch("is_causal / enable_gqa are not constants")
        if qi.shape[1] != ki.shape[1] and not enable_gqa:
            raise NoMatch(f"query has {qi.shape[1]} heads and key {ki.shape[1]} without enable_gqa")
        steps, masks, tensors = [], [], []
        if mask is not None:
            mask_info = self.mask_tensor(mask, qi, ki, "attn_mask")
            tensors.append(mask)
            if mask_info.dtype == torch.bool:
                masks.append((0, True))
            else:
                steps.append(Step("add_tensor", tensor=0))
        scale = 1 / math.sqrt(qi.shape[3]) if scale is None else self.scalar(scale, {q, k})
        spec = self.chain_spec(qi, ki, vi, scale, "top_left" if is_causal else False, steps, masks, tensors)
        return Match(node, q, k, v, tensors, spec, replaced=[node])

    def match_softmax(self, softmax) -> Match:
        scores = softmax.args[0]
        scores_info = self.tensor4(scores, "the softmax input")
        dim = _arg(softmax, 1, "dim")
        if dim not in (-1, 3):
            raise NoMatch(f"softmax over dim {dim!r}, not the last (keys) dim")
        replaced = [softmax]
        current = softmax
        while True:
            user = self.only_user(current, "the attention weights")
            kind = _kind(user)
            if kind in ("cast", "identity"):
                self.check_cast(user)
            elif kind == "dropout":
                self.check_dropout(user)
            elif kind == "matmul" and user.args[0] is current:
                break
            elif not self.is_inactive_dropout(user):
                raise NoMatch(f"the attention weights flow into {_label(user)}, not into matmul(weights, v)")
            replaced.append(user)
            current = user
        output = user
        replaced.append(output)
        qk, raw_steps, chain_nodes = self.score_chain(scores, scores_info)
        replaced.extend(chain_nodes)
        q, kt, v = qk.args[0], qk.args[1], output.args[1]
        qi = self.tensor4(q, "q (the first operand of q @ k^T)")
        kti = self.tensor4(kt, "k^T (the second operand of q @ k^T)")
        vi = self.tensor4(v, "v (the second operand of weights @ v)")
        k = self.untranspose(kt)
        transpose_k = k is None
        if transpose_k:
            k, ki = kt, TensorInfo((kti.shape[0], kti.shape[1], kti.shape[3], kti.shape[2]), kti.dtype)
        else:
            replaced.append(kt)
            ki = self.info(k)
        sources = {q, kt, k}
        steps, tensors = [], []
        for op, value, tensor in raw_steps:
            value = None if value is None else self.scalar(value, sources)
            if op == "div":
                op, value = "mul", 1 / value
            elif op == "sub":
                op, value = "add", -value
            steps.append(Step(op, value, None if tensor is None else _tensor_index(tensors, tensor)))
        if not transpose_k:
            k, v, ki, vi = self.ungroup(k, v, ki, vi, replaced)
        scale, steps = _fold_scale(steps)
        steps, masks = _trailing_masks(steps)
        spec = self.chain_spec(qi, ki, vi, scale, False, steps, masks, tensors)
        if self.info(output).dtype != qi.dtype:
            raise NoMatch(f"the output is {self.info(output).dtype} while q is {qi.dtype}")
        return Match(output, q, k, v, tensors, spec, transpose_k, replaced)

    def chain_spec(self, qi, ki, vi, scale, causal, steps, masks, tensors) -> ChainSpec:
        if not (qi.dtype == ki.dtype == vi.dtype):
            raise NoMatch(f"q, k, v have dtypes {qi.dtype}, {ki.dtype}, {vi.dtype}; attncc needs one dtype")
        if qi.dtype not in ATTNCC_DTYPES:
            raise NoMatch(f"dtype {qi.dtype}: attncc computes float16, bfloat16 and float32")
        if not (qi.shape[0] == ki.shape[0] == vi.shape[0]):
            raise NoMatch(f"batch sizes differ: q {qi.shape[0]}, k {ki.shape[0]}, v {vi.shape[0]}")
        if ki.shape[1] != vi.shape[1] or qi.shape[1] % ki.shape[1]:
            raise NoMatch(f"q has {qi.shape[1]} heads, k {ki.shape[1]}, v {vi.shape[1]}: not a grouping")
        if ki.shape[2] != vi.shape[2] or qi.shape[3] != ki.shape[3]:
            raise NoMatch(f"shapes do not fit attention: q {list(qi.shape)}, k {list(ki.shape)}, v {list(vi.shape)}")
        dtypes = tuple(self.info(t).dtype for t in tensors)
        return ChainSpec(num_heads=qi.shape[1], num_kv_heads=ki.shape[1], head_dim=qi.shape[3],
                         v_head_dim=vi.shape[3], scale=scale, causal=causal, steps=tuple(steps),
                         masks=tuple(masks), tensor_dtypes=dtypes)  # fmt: skip

    # ---- pieces

    def only_user(self, node, what: str):
        users = [user for user in node.users if not _is_metadata_assert(user)]
        if len(users) != 1:
            names = ", ".join(u.name for u in users) or "nothing"
            raise NoMatch(
                f"{what} ({node.name}) feed {len(users)} nodes ({names}); the attention must be self-contained"
            )
        return users[0]

    def check_cast(self, node) -> None:
        for a in (*node.args[1:], *node.kwargs.values()):
            if isinstance(a, (torch.device, str)) and node.target != "type":
                raise NoMatch(f"{_label(node)} moves a tensor to another device")

    def is_inactive_dropout(self, node) -> bool:
        if node.op != "call_module":
            return False
        module = self.module.get_submodule(node.target)
        if not isinstance(module, torch.nn.modules.dropout._DropoutNd):
            return False
        if module.training and module.p > 0:
            raise NoMatch(f"dropout {node.target} (p={module.p}) is in training mode: attncc has no attention "
                          "dropout; capture the model in eval mode")  # fmt: skip
        return True

    def check_dropout(self, node) -> None:
        p = _arg(node, 1, "p", 0.5)
        training = _arg(
            node, 2, "training" if node.op == "call_function" and node.target is F.dropout else "train", True
        )
        if not isinstance(p, numbers.Number) or not isinstance(training, bool):
            raise NoMatch(f"{_label(node)} has a dropout probability or mode that is not a constant")
        if training and p > 0:
            raise NoMatch(f"dropout with p={p} in training mode: attncc has no attention dropout; capture in eval mode")

    def mask_tensor(self, node, qi: TensorInfo, ki: TensorInfo, what: str) -> TensorInfo:
        info = self.info(node)
        if info is None:
            raise NoMatch(f"{what} {_label(node)} is not a tensor")
        full = (qi.shape[0], qi.shape[1], qi.shape[2], ki.shape[2])
        shape = (1,) * (4 - len(info.shape)) + info.shape
        if len(info.shape) > 4 or any(s not in (1, f) for s, f in zip(shape, full)):
            raise NoMatch(f"{what} {node.name} has shape {list(info.shape)}, not broadcastable to {list(full)}")
        return info

    def score_chain(self, node, scores_info):
        """Walk from the softmax input back to q @ k^T.

        Returns the matmul node, the steps as (op, value, tensor node) innermost
        first, and the nodes walked. An operand of add / mul / where may be the
        scores on either side; both are tried.
        """
        self.only_user(node, "the scores")
        kind = _kind(node)
        if kind == "matmul":
            return node, [], [node]
        if kind in ("cast", "identity"):
            self.check_cast(node)
            return self.extend(self.score_chain(node.args[0], scores_info), node, None)
        if kind == "tanh":
            return self.extend(self.score_chain(node.args[0], scores_info), node, ("tanh", None, None))
        if kind == "masked_fill":
            mask, value = _arg(node, 1, "mask"), _arg(node, 2, "value")
            self.bool_tensor(mask, scores_info, "masked_fill's mask")
            return self.extend(self.score_chain(node.args[0], scores_info), node, ("fill", value, mask))
        if kind in ("mul", "div", "add", "sub", "where"):
            reasons = []
            for score, step in self.operand_choices(node, kind, scores_info):
                try:
                    return self.extend(self.score_chain(score, scores_info), node, step)
                except NoMatch as reason:
                    reasons.append(str(reason))
            raise NoMatch(reasons[0] if reasons else f"{_label(node)} does not apply to the scores")
        raise NoMatch(f"{_label(node)} between q @ k^T and the softmax is not understood")

    @staticmethod
    def extend(walked, node, step):
        qk, steps, nodes = walked
        return qk, steps + ([step] if step else []), nodes + [node]

    def operand_choices(self, node, kind, scores_info):
        """(the scores operand, the step) for each way of reading a binary node or torch.where."""
        if kind == "where":
            condition, a, c = (_arg(node, i, name) for i, name in enumerate(("condition", "input", "other")))
            self.bool_tensor(condition, scores_info, "torch.where's condition")
            choices = [(score, (op, value, condition)) for score, op, value in ((a, "keep", c), (c, "fill", a))
                       if self.is_scores(score, scores_info) and not self.is_tensor(value)]  # fmt: skip
            if not choices:
                raise NoMatch(f"{_label(node)} does not select between the scores and a constant")
            return choices
        if node.kwargs.get("alpha", 1) != 1:
            raise NoMatch(f"{_label(node)} has alpha={node.kwargs['alpha']}")
        a = node.args[0]
        c = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        choices = []
        for score, other in [(a, c)] if kind in ("div", "sub") else [(a, c), (c, a)]:
            if not self.is_scores(score, scores_info):
                continue
            if self.is_tensor(other):
                if kind in ("mul", "div"):
                    continue
                self.float_tensor(other, scores_info, "the added tensor")
                choices.append((score, ("add_tensor" if kind == "add" else "sub_tensor", None, other)))
            elif kind == "div":
                choices.append((score, ("div", other, None)))
            else:
                choices.append((score, ("mul" if kind == "mul" else kind, other, None)))
        if not choices:
            raise NoMatch(f"{_label(node)} does not add to or scale the scores by a constant or a broadcast tensor")
        return choices

    def is_tensor(self, value) -> bool:
        return isinstance(value, torch.fx.Node) and self.info(value) is not None

    def is_scores(self, node, scores_info) -> bool:
        info = self.info(node)
        return info is not None and info.shape == scores_info.shape and info.dtype.is_floating_point

    def bool_tensor(self, node, scores_info, what):
        info = self.info(node)
        if info is None or info.dtype != torch.bool:
            raise NoMatch(f"{what} {_label(node)} is not a boolean tensor")
        self.broadcastable(node, info, scores_info, what)

    def float_tensor(self, node, scores_info, what):
        info = self.info(node)
        if info is None or not info.dtype.is_floating_point:
            raise NoMatch(f"{what} {_label(node)} is not a floating-point tensor")
        self.broadcastable(node, info, scores_info, what)

    def broadcastable(self, node, info, scores_info, what):
        shape = (1,) * (4 - len(info.shape)) + info.shape
        if len(info.shape) > 4 or any(s not in (1, f) for s, f in zip(shape, scores_info.shape)):
            raise NoMatch(f"{what} {node.name} has shape {list(info.shape)}, which does not broadcast to the "
                          f"scores {list(scores_info.shape)}")  # fmt: skip

    def untranspose(self, kt):
        """The k whose last two dims ``kt`` swaps, if ``kt`` is such a transposition, else None."""
        kind = _kind(kt)
        source = kt.args[0] if kt.args else None
        if self.info(source) is None or len(self.info(source).shape) != 4:
            return None
        if kind == "transpose":
            dims = {_arg(kt, 1, "dim0") % 4, _arg(kt, 2, "dim1") % 4}
            return source if dims == {2, 3} else None
        if kind == "permute":
            dims = kt.args[1:] if len(kt.args) > 2 else _arg(kt, 1, "dims")
            return source if [d % 4 for d in dims] == [0, 1, 3, 2] else None
        if kind == "getattr" and kt.args[1] == "mT":
            return source
        return None

    def ungroup(self, k, v, ki, vi, replaced):
        """k and v without a repeat per head group, when both are repeated by the same factor."""
        k_base, k_groups, k_nodes = self.unrepeat(k)
        v_base, v_groups, v_nodes = self.unrepeat(v)
        if k_groups == v_groups > 1:
            replaced.extend(k_nodes + v_nodes)
            return k_base, v_base, self.info(k_base), self.info(v_base)
        return k, v, ki, vi

    def unrepeat(self, node):
        """(x, groups, nodes) if ``node`` repeats each head of x ``groups`` times in a row, else (node, 1, [])."""
        info = self.info(node)
        kind = _kind(node)
        if kind == "repeat_interleave":
            source, repeats, dim = node.args[0], _arg(node, 1, "repeats"), _arg(node, 2, "dim")
            source_info = self.info(source)
            if isinstance(repeats, int) and dim in (1, -3) and source_info is not None and len(source_info.shape) == 4:
                return source, repeats, [node]
            return node, 1, []
        if kind != "reshape":
            return node, 1, []
        nodes = [node]
        expanded = self.skip_identities(node.args[0], nodes)
        expanded_info = self.info(expanded)
        if _kind(expanded) != "expand" or expanded_info is None or len(expanded_info.shape) != 5:
            return node, 1, []
        nodes.append(expanded)
        unsqueezed = self.skip_identities(expanded.args[0], nodes)
        nodes.append(unsqueezed)
        source = self.unsqueezed_source(unsqueezed)
        source_info = self.info(source)
        if source is None or source_info is None or len(source_info.shape) != 4:
            return node, 1, []
        b, h, s, d = source_info.shape
        groups = expanded_info.shape[2]
        if expanded_info.shape != (b, h, groups, s, d) or info.shape != (b, h * groups, s, d):
            return node, 1, []
        return source, groups, nodes

    def skip_identities(self, node, nodes):
        while _kind(node) in ("identity", "slice") and self.is_identity(node):
            nodes.append(node)
            node = node.args[0]
        return node

    def is_identity(self, node) -> bool:
        if _kind(node) == "identity":
            return True
        source = self.info(node.args[0])
        return source is not None and self.info(node) is not None and self.info(node).shape == source.shape

    def unsqueezed_source(self, node):
        """x if ``node`` is x with a new dim 2 (``x.unsqueeze(2)``, ``x[:, :, None]``), else None."""
        kind = _kind(node)
        if kind == "unsqueeze" and _arg(node, 1, "dim") in (2, -3):
            return self.skip_identities(node.args[0], [])
        if kind == "getitem" and isinstance(node.args[1], tuple):
            key = node.args[1]
            plain = all(k is None or k is Ellipsis or k == slice(None) for k in key)
            source = node.args[0]
            source_info, info = self.info(source), self.info(node)
            if plain and source_info is not None and info is not None and len(source_info.shape) == 4:
                expected = source_info.shape[:2] + (1,) + source_info.shape[2:]
                if info.shape == expected and key.count(None) == 1:
                    return source
        return None


def _fold_scale(steps: list[Step]) -> tuple[float, list[Step]]:
    """The product of the leading constant factors (the softmax scale) and the remaining steps."""
    scale = 1.0
    while steps and steps[0].op == "mul":
        scale *= steps[0].value
        steps = steps[1:]
    return scale, steps


def _trailing_masks(steps: list[Step]) -> tuple[list[Step], list[tuple[int, bool]]]:
    """Trailing fills with -inf are masks: where(t, -inf, s) hides t, where(t, s, -inf) keeps t."""
    masks = []
    while steps and steps[-1].op in ("fill", "keep") and steps[-1].value == -math.inf:
        masks.append((steps[-1].tensor, steps[-1].op == "keep"))
        steps = steps[:-1]
    return steps, masks[::-1]


def _tensor_index(tensors: list, node) -> int:
    if node not in tensors:
        tensors.append(node)
    return tensors.index(node)


def _label(value) -> str:
    if isinstance(value, torch.fx.Node):
        if value.op == "call_function":
            target = getattr(value.target, "__name__", str(value.target))
            return f"{value.name} ({target})"
        if value.op in ("call_method", "call_module"):
            return f"{value.name} ({value.op} {value.target})"
        return value.name
    return repr(value)


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


# --------------------------------------------------------------------------- rewriting


def _rewrite(graph_module: torch.fx.GraphModule, match: Match, index: int, backend: str) -> None:
    graph = graph_module.graph
    name = f"attncc_attention_{index}"
    graph_module.add_submodule(name, ChainAttention(match.spec, backend=backend))
    with graph.inserting_before(match.output):
        k = match.k
        if match.transpose_k:
            k = graph.call_function(torch.transpose, (match.k, -2, -1))
        attention = graph.call_module(name, (match.q, k, match.v, *match.tensors))
    attention.meta = dict(match.output.meta)
    match.output.replace_all_uses_with(attention)
    _erase_unused(graph, set(match.replaced))


_PURE_KINDS = {"getattr", "getitem", "size", "transpose", "permute", "reshape", "unsqueeze", "expand", "slice",
               "identity", "cast", "repeat_interleave"}  # fmt: skip
_PURE_OPERATORS = {operator.mul, operator.truediv, operator.floordiv, operator.add, operator.sub, operator.pow}


def _erase_unused(graph: torch.fx.Graph, replaced: set) -> None:
    """Erase the replaced nodes left unused, then the inputs they leave unused that only read shapes or views."""
    pending, erased = list(replaced), set()
    while pending:
        node = pending.pop()
        if node in erased or any(not _is_metadata_assert(user) for user in node.users):
            continue
        pure = _kind(node) in _PURE_KINDS or (node.op == "call_function" and node.target in _PURE_OPERATORS)
        if node in replaced or pure:
            for check in list(node.users):
                graph.erase_node(check)
            pending.extend(node.all_input_nodes)
            graph.erase_node(node)
            erased.add(node)


_METADATA_ASSERTS = {target for target in (_aten("_assert_tensor_metadata", "default"),) if target is not None}


def _is_metadata_assert(node) -> bool:
    """torch.export's checks of a tensor's dtype and shape: they read a node without using its value."""
    return node.op == "call_function" and node.target in _METADATA_ASSERTS


def _trace(model, example_inputs: tuple, method: str) -> torch.fx.GraphModule:
    if method == "fx":
        if isinstance(model, torch.fx.GraphModule):
            return torch.fx.GraphModule(model, model.graph)
        try:
            return torch.fx.symbolic_trace(model)
        except Exception as error:  # fx raises TraceError, TypeError, ... from the model's own code
            raise AttnccError(
                f"torch.fx could not trace {type(model).__name__}: {type(error).__name__}: {error}; "
                "try capture(..., method='export')"
            ) from error
    if method == "export":
        try:
            return torch.export.export(model, example_inputs).module()
        except Exception as error:  # export reports unsupported model code with many exception types
            raise AttnccError(
                f"torch.export could not export {type(model).__name__}: {type(error).__name__}: {error}"
            ) from error
    raise InputError(f"method={method!r} is invalid: 'fx' or 'export' is allowed")


def _max_error(original, rewritten) -> float:
    """The largest difference between the float outputs; ValidationError beyond CHECK_TOLERANCE.

    Elements that are NaN in the original are skipped: attncc gives 0 for a row with no
    visible key where a hand-written softmax gives NaN.
    """
    worst = 0.0
    for a, b in zip(pytree.tree_leaves(original), pytree.tree_leaves(rewritten)):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point() or not a.numel():
            continue
        dtype = a.dtype
        atol, rtol = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.float32])
        a, b = a.double(), b.double()
        compared = ~torch.isnan(a)
        error = torch.where(compared, (b - a).abs(), 0.0).nan_to_num(nan=math.inf)
        if bool((error > atol + rtol * a.abs().nan_to_num(0.0)).any()):
            raise ValidationError(
                f"the rewritten model differs from the original by up to {float(error.max()):.3g} on the example "
                f"inputs (allowed: {atol} + {rtol} * |original| for {dtype} outputs); please report this model"
            )
        worst = max(worst, float(error.max()))
    return worst


def capture(model: torch.nn.Module, example_inputs, *, backend: str = "pytorch", method: str = "fx",
            check: bool = True, verbose: bool = False) -> torch.fx.GraphModule:  # fmt: skip
    """Trace ``model``, rewrite the attention attncc understands, and return the rewritten GraphModule.

    ``example_inputs``: a tensor or a tuple of positional arguments. The returned
    module has ``attncc_report`` (a ``CaptureReport``: what was rewritten, what was
    not and why); ``verbose`` prints it. ``check`` runs both models on the example
    inputs and raises ``ValidationError`` if they differ beyond rounding. Capture
    models in eval mode: attention dropout that is active is left as is.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model is a {type(model).__name__}: a torch.nn.Module is allowed")
    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    graph_module = _trace(model, example_inputs, method)
    recorder = _Recorder(graph_module)
    with torch.no_grad():
        recorder.run(*pytree.tree_leaves(example_inputs) if method == "export" else example_inputs)
    matcher = _Matcher(graph_module, recorder.values)
    report = CaptureReport()
    matches = []
    for node in list(graph_module.graph.nodes):
        form = {"softmax": "hand-written", "sdpa": "scaled_dot_product_attention"}.get(_kind(node))
        if node.op == "call_module" and isinstance(
            graph_module.get_submodule(node.target), torch.nn.MultiheadAttention
        ):
            report.findings.append(Finding(node.name, "nn.MultiheadAttention", node.target, False,
                                           "nn.MultiheadAttention is a leaf module in FX; not rewritten"))  # fmt: skip
            continue
        if form is None:
            continue
        try:
            match = matcher.match_sdpa(node) if form != "hand-written" else matcher.match_softmax(node)
        except NoMatch as reason:
            report.findings.append(Finding(node.name, form, _module_path(node), False, str(reason)))
            continue
        matches.append(match)
        report.findings.append(Finding(node.name, form, _module_path(node), True, match.spec.describe()))
    for index, match in enumerate(matches):
        _rewrite(graph_module, match, index, backend)
    graph_module.graph.lint()
    graph_module.recompile()
    if check and matches:
        with torch.no_grad():
            report.max_error = _max_error(model(*example_inputs), graph_module(*example_inputs))
    graph_module.attncc_report = report
    if verbose:
        print(report)
    return graph_module


__all__ = ["CaptureReport", "Finding", "capture"]
