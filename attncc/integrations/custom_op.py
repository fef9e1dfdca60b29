"""Each compiled program as a ``torch.library`` custom op, so torch.compile and FX see one opaque node.

``attncc::program_<hash>(q, k, v, captured[]) -> (o, lse)`` runs the generated
forward. Its autograd formula calls ``attncc::program_<hash>_backward``, which runs
the generated recomputing backward, so the backward is opaque to the compiler too.
Fake implementations give torch.compile the output shapes; every output is
contiguous, in the fake and the real implementation alike. The ops are registered
once per process per generated source (``<hash>`` is its content hash).

Eager calls on plain tensors skip the dispatcher (``ProgramOps.__call__``): the same
forward and backward implementations run under a ``torch.autograd.Function``, which
saves about 0.1 ms per call, a third of a short sequence's time. Anything that
traces or intercepts (torch.compile, export, FX, functorch transforms, dispatch modes,
tensor subclasses) goes through the op.
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
    """The forward and backward custom ops of one generated program, and their eager implementations."""

    name: str
    forward: Callable
    backward: Callable
    forward_impl: Callable
    backward_impl: Callable
    function: Callable  # the generated ``attention(q, k, v, *captured)``

    def __call__(self, q, k, v, captured: list) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(q, k, v, captured)``, without the dispatcher when nothing traces or intercepts the call.

        Without gradients the generated function runs directly (its outputs may be strided
        views, as SDPA's are); with them, ``EagerProgram`` applies the op's own formula.
        """
        if not _plain_eager(q, k, v, captured):
            return self.forward(q, k, v, captured)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *captured)):
            return EagerProgram.apply(self, q, k, v, *captured)
        return self.function(q, k, v, *captured)


def _plain_eager(*tensors) -> bool:
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
        and all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in (*tensors[:3], *tensors[3]))
    )


class EagerProgram(torch.autograd.Function):
    """The op's autograd formula without the dispatcher: same forward, same backward implementation."""

    @staticmethod
    def forward(ctx, ops: ProgramOps, q, k, v, *captured):
        o, lse = ops.forward_impl(q, k, v, list(captured))
        ctx.ops = ops
        ctx.save_for_backward(q, k, v, o, lse, *captured)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse, *captured = ctx.saved_tensors
        trainable = [i for i, needs in enumerate(ctx.needs_input_grad[4:]) if needs]
        grad_q, grad_k, grad_v, grad_trainable = ctx.ops.backward_impl(
            q, k, v, o, lse, grad_o, grad_lse, captured, trainable
        )
        grad_captured = [None] * len(captured)
        for i, grad in zip(trainable, grad_trainable):
            grad_captured[i] = grad
        return None, grad_q, grad_k, grad_v, *grad_captured


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
    run_forward = forward_impl(function)
    run_backward = backward_impl(function, region, [node.op.label for node in graph.captured])
    forward = torch.library.custom_op(f"{NAMESPACE}::{name}", run_forward, mutates_args=(), schema=FORWARD_SCHEMA)
    backward = torch.library.custom_op(
        f"{NAMESPACE}::{name}_backward", run_backward, mutates_args=(), schema=BACKWARD_SCHEMA
    )
    forward.register_fake(_forward_fake)
    backward.register_fake(_backward_fake)
    forward.register_autograd(_autograd_backward(backward), setup_context=_setup_context)
    registered = ProgramOps(name, forward, backward, run_forward, run_backward, function)
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
