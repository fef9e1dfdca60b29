"""Each compiled program as a ``torch.library`` custom op, so torch.compile and FX see one opaque node.

``attncc::program_<hash>(q, k, v, captured[]) -> (o, lse)`` runs the generated
forward. Its autograd formula calls ``attncc::program_<hash>_backward``, which runs
the generated recomputing backward, so the backward is opaque to the compiler too.
Fake implementations give torch.compile the output shapes; every output is
contiguous, in the fake and the real implementation alike. The ops are registered
once per process per generated source (``<hash>`` is its content hash).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch._C import DispatchKey

from attncc.errors import BackendError
from attncc.ir import ops
from attncc.ir.graph import Graph

NAMESPACE = "attncc"

FORWARD_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor[] captured) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor grad_o, Tensor grad_lse, Tensor[] captured, "
    "int[] trainable) -> (Tensor, Tensor, Tensor, Tensor[])"
)


@dataclass(frozen=True)
class ProgramOps:
    """The forward and backward custom ops of one generated program."""

    name: str
    forward: Callable
    backward: Callable


_REGISTERED: dict[str, ProgramOps] = {}


def program_ops(key: str, function: Callable, graph: Graph) -> ProgramOps:
    """The custom ops of the generated ``function`` (``attention(q, k, v, *captured)``), registered on first use.

    ``key`` is the content hash of the generated source; ``graph`` the optimized IR
    it was generated from, which says whether the region's backward can be called directly.
    """
    known = _REGISTERED.get(key)
    if known is not None:
        return known
    name = f"program_{key}"
    region = direct_region(function, graph)
    forward = torch.library.custom_op(
        f"{NAMESPACE}::{name}", forward_impl(function), mutates_args=(), schema=FORWARD_SCHEMA
    )
    backward = torch.library.custom_op(
        f"{NAMESPACE}::{name}_backward",
        backward_impl(function, region, [node.op.label for node in graph.captured]),
        mutates_args=(),
        schema=BACKWARD_SCHEMA,
    )
    forward.register_fake(_forward_fake)
    backward.register_fake(_backward_fake)
    forward.register_autograd(_autograd_backward(backward), setup_context=_setup_context)
    registered = ProgramOps(name, forward, backward)
    _REGISTERED[key] = registered
    return registered


def direct_region(function: Callable, graph: Graph):
    """The generated ``FlashAttention`` class if the program is that one region applied to its inputs, else None.

    Then the op's backward calls the region's recomputing backward directly; any other
    program is differentiated by recomputing its forward under autograd.
    """
    regions = graph.nodes_of(ops.FlashAttention)
    if len(regions) != 1:
        return None
    region = regions[0]
    expected = (graph.input("q"), graph.input("k"), graph.input("v"), *graph.captured)
    outputs = graph.output.inputs
    if region.inputs != expected or len(outputs) != 2 or outputs[0] is not region:
        return None
    if not (isinstance(outputs[1].op, ops.LseOf) and outputs[1].inputs == (region,)):
        return None
    return function.__globals__.get("FlashAttention")


def forward_impl(function: Callable) -> Callable:
    def forward(q, k, v, captured):
        o, lse = function(q, k, v, *captured)
        return o.contiguous(), lse.contiguous()

    return forward


def _forward_fake(q, k, v, captured):
    batch, heads, n, _ = q.shape
    return q.new_empty(batch, heads, n, v.shape[3]), q.new_empty(batch, heads, n, dtype=torch.float32)


class RegionContext:
    """Stands in for an autograd ctx when the op calls the generated region's backward itself."""

    def __init__(self, saved_tensors: tuple, needs_input_grad: tuple):
        self.saved_tensors = saved_tensors
        self.needs_input_grad = needs_input_grad


@contextmanager
def autograd_dispatch():
    """Let autograd record inside an op's implementation, which runs below the autograd dispatch keys.

    The generated backward differentiates each tile's score expression with
    ``torch.autograd.grad``; a custom op's implementation is called with the autograd
    keys excluded, so they are re-included for its duration (autocast stays excluded).
    """
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (DispatchKey.AutogradFunctionality, DispatchKey.AutogradOther, DispatchKey.AutogradNestedTensor):
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield


def backward_impl(function: Callable, region, captured_names: list[str]) -> Callable:
    def backward(q, k, v, o, lse, grad_o, grad_lse, captured, trainable):
        with autograd_dispatch():
            return _backward(q, k, v, o, lse, grad_o, grad_lse, captured, trainable)

    def _backward(q, k, v, o, lse, grad_o, grad_lse, captured, trainable):
        if region is not None:
            needs = (True, True, True, *(i in trainable for i in range(len(captured))))
            context = RegionContext((q, k, v, o, lse, *captured), needs)
            grad_q, grad_k, grad_v, *grad_captured = region.backward(context, grad_o, grad_lse)
            missing = [captured_names[i] for i in trainable if grad_captured[i] is None]
            if missing:
                raise BackendError(
                    f"this program's backward computes no gradient for captured tensor {missing[0]!r}, which "
                    "requires grad; compile with backend='pytorch' to train it (or detach it)"
                )
            grad_captured = [grad_captured[i] for i in trainable]
        else:
            grad_q, grad_k, grad_v, *grad_captured = _recompute_backward(
                function, q, k, v, grad_o, grad_lse, captured, trainable
            )
        grads = (grad_q, grad_k, grad_v)
        return (*(g.contiguous() for g in grads), [g.contiguous() for g in grad_captured])

    return backward


def _recompute_backward(function, q, k, v, grad_o, grad_lse, captured, trainable):
    """Run the generated forward again under autograd and differentiate it."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    inputs = [t.detach().requires_grad_() if i in trainable else t for i, t in enumerate(captured)]
    o, lse = function(*leaves, *inputs)
    leaves += [inputs[i] for i in trainable]
    grads = torch.autograd.grad((o, lse), leaves, (grad_o, grad_lse), allow_unused=True)
    return [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]


def _backward_fake(q, k, v, o, lse, grad_o, grad_lse, captured, trainable):
    grads = tuple(t.new_empty(t.shape) for t in (q, k, v))
    return (*grads, [captured[i].new_empty(captured[i].shape) for i in trainable])


def _setup_context(ctx, inputs, output):
    q, k, v, captured = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, *captured)
    ctx.captured_count = len(captured)


def _autograd_backward(backward_op: Callable) -> Callable:
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse, *captured = ctx.saved_tensors
        needs_captured = ctx.needs_input_grad[3]
        trainable = [i for i in range(ctx.captured_count) if needs_captured[i]]
        grad_o = torch.zeros_like(o) if grad_o is None else grad_o
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad_q, grad_k, grad_v, grad_trainable = backward_op(q, k, v, o, lse, grad_o, grad_lse, captured, trainable)
        grad_captured = [None] * ctx.captured_count
        for i, grad in zip(trainable, grad_trainable):
            grad_captured[i] = grad
        return grad_q, grad_k, grad_v, grad_captured

    return backward
