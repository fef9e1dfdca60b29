"""``attncc.flex_attention`` inside ``torch.compile``: the mods become a constant plan, their tensors graph inputs.

Dynamo cannot trace attncc's mod tracer (torch.fx and sympy). Under torch.compile,
``flex_attention`` therefore asks for a *plan* of its mods, which Dynamo computes with
the real mod objects while it traces (``torch.compiler.assume_constant_result``): the
mods are traced as in eager mode, and the plan records where each captured tensor,
each Python value and each function the trace may depend on sits, as a path from the
mod (closure cell, global, default, attribute, item). The traced code then walks those
paths itself, so Dynamo lifts the captured tensors as graph inputs (their values and
gradients stay live) and guards the Python values and functions (a new window size or
another mask recompiles). One custom op, ``attncc::flex_attention``, takes the plan's
key and runs the program for the planned mods and the shapes it is called with,
compiling it (once, through the program cache) at first use.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import types
from dataclasses import replace
from typing import NamedTuple

import torch

from attncc.errors import InputError, ModError
from attncc.frontend.mod import Captured, TracedMod
from attncc.frontend.trace import code_names, expression_key, trace_mask_mod, trace_score_mod
from attncc.kernel_options import KernelOptions, parse_kernel_options

FORWARD_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor[] captured, str plan, float? scale) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor grad_o, Tensor grad_lse, Tensor[] captured, "
    "int[] trainable, str plan, float? scale) -> (Tensor, Tensor, Tensor, Tensor[])"
)
BLOCK_MASK_SCHEMA = (
    "(Tensor[] captured, str plan, int? B, int? H, SymInt Q_LEN, SymInt KV_LEN, int block_q, int block_kv, "
    "bool separate_full_blocks, Device device) -> (Tensor, Tensor, Tensor, Tensor)"
)

# How far the plan looks for what a mod reads: as deep as the tracer names captured tensors.
MAX_DEPTH = 4
MAX_OBJECTS = 5000
_SCALARS = (bool, int, float, complex, str, type(None))


class Plan(NamedTuple):
    """What the traced code needs of its mods; every field is a constant Dynamo can hold.

    ``key`` names the planned mods, backend and kernel options (``_PLANNED``);
    ``tensors`` the path of each captured tensor, in the order the op takes them;
    ``values`` a (path, value) pair per Python value the trace may have read; ``functions``
    the path of each function the mods reach, whose code Dynamo then guards.
    """

    key: str
    tensors: tuple
    values: tuple
    functions: tuple


class PlannedMods(NamedTuple):
    """The traced mods of a plan (captured values dropped: the op passes them), with backend and options."""

    score: TracedMod | None
    mask: TracedMod | None
    backend: str
    options: KernelOptions

    @property
    def captured_names(self) -> list[str]:
        names = [c.name for mod in (self.score, self.mask) if mod for c in mod.captured]
        return list(dict.fromkeys(names))


_PLANNED: dict[str, PlannedMods] = {}
_THIS_MODULE = sys.modules[__name__]


def flex_attention(query, key, value, score_mod, mask_mod, scale, kernel_options, backend):
    """``(o, lse)`` of ``attncc.flex_attention`` in code that torch.compile traces (inputs already checked)."""
    plan, captured = planned_inputs(score_mod, mask_mod, kernel_options, backend, query.device.type)
    return FLEX_ATTENTION(query, key, value, captured, plan, scale)


def block_lists(mask_mod, B, H, Q_LEN, KV_LEN, device: torch.device, block_q: int, block_kv: int,
                separate_full_blocks: bool) -> tuple:  # fmt: skip
    """``create_block_mask``'s four block tensors in code that torch.compile traces (arguments already checked).

    A custom op evaluates the planned mask_mod with its captured tensors, so Dynamo never
    runs the mask_mod itself, which would leave its closure unreadable for the plan.
    """
    plan, captured = planned_inputs(None, mask_mod, None, None, device.type)
    return BLOCK_MASK(captured, plan, B, H, Q_LEN, KV_LEN, block_q, block_kv, separate_full_blocks, device)


def planned_inputs(score_mod, mask_mod, kernel_options, backend, device_type: str) -> tuple[str, list]:
    """The plan's key and the mods' captured tensors, with Dynamo guarding all the plan read (traced code)."""
    for role, mod in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        check_outside(role, mod)
    roots = (score_mod, mask_mod)
    # An attribute of the module, not a global: marked for Dynamo at this first use (``__getattr__``).
    plan = _THIS_MODULE.plan_mods(*plannable(score_mod), *plannable(mask_mod), kernel_options, backend, device_type)
    for path in plan.functions:
        follow(roots, path).__code__  # noqa: B018 - reading it makes Dynamo guard the function's code
    for path, expected in plan.values:
        if follow(roots, path) != expected:  # never true while tracing; Dynamo keeps the comparison as a guard
            raise ModError(f"{describe(path)} changed while torch.compile traced the mods")
    return plan.key, [follow(roots, path) for path in plan.tensors]


def check_outside(role: str, mod) -> None:
    """Refuse a mod that reads variables of a function torch.compile traces: Dynamo hides its closure."""
    if not isinstance(mod, types.FunctionType) or not mod.__code__.co_freevars:
        return
    try:
        mod.__closure__  # noqa: B018 - Dynamo has no closure to give for a function made while it traces
    except AttributeError:
        names = ", ".join(mod.__code__.co_freevars)
        raise ModError(
            f"{role} {mod.__name__!r} is defined inside the code torch.compile traces and reads its variables "
            f"({names}); attncc cannot see them there: define the {role} outside the compiled function (at module "
            "level, in __init__, or as a method of the module), where it may capture tensors and numbers"
        ) from None


def plannable(mod) -> tuple:
    """A mod as two objects Dynamo can hand to the plan: a bound method as its function and ``self``."""
    if isinstance(mod, types.MethodType):
        return mod.__func__, mod.__self__
    return mod, None


def follow(roots: tuple, path: tuple):
    """The object at ``path``: a root index, then steps of (kind, name or index)."""
    value = roots[path[0]]
    for kind, arg in path[1:]:
        if kind == "closure":
            value = value.__closure__[arg].cell_contents
        elif kind == "global":
            value = value.__globals__[arg]
        elif kind == "default":
            value = value.__defaults__[arg]
        elif kind == "kwdefault":
            value = value.__kwdefaults__[arg]
        elif kind == "attr":
            value = getattr(value, arg)
        else:
            value = value[arg]
    return value


# --------------------------------------------------------------------------- the plan (runs eagerly)


def __getattr__(name: str):
    """``plan_mods``, marked for Dynamo at its first use in traced code.

    Marking it at import would import torch._dynamo, and with it triton, with attncc: too
    early for the triton backend to choose Triton's interpreter for CPU tensors.
    """
    if name != "plan_mods":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    marked = torch.compiler.assume_constant_result(_plan_mods)
    globals()["plan_mods"] = marked
    return marked


def _plan_mods(score_mod, score_self, mask_mod, mask_self, kernel_options, backend, device_type: str) -> Plan:
    """Trace the mods and find what they read; Dynamo calls this with the real objects while it traces.

    ``score_self`` / ``mask_self``: the object a mod is a method of, or None.
    """
    from attncc.backends import backend_for_device

    if score_self is not None:
        score_mod = types.MethodType(score_mod, score_self)
    if mask_self is not None:
        mask_mod = types.MethodType(mask_mod, mask_self)
    options = parse_kernel_options(kernel_options)
    if options.backend is not None and backend not in (None, options.backend):
        raise InputError(f"backend={backend!r} and kernel_options BACKEND (attncc's {options.backend!r}) disagree")
    score = None if score_mod is None else trace_score_mod(score_mod)
    mask = None if mask_mod is None else trace_mask_mod(mask_mod)
    planned = PlannedMods(stripped(score), stripped(mask), backend or options.backend or backend_for_device(device_type),
                          options)  # fmt: skip
    reached = reachable((score_mod, mask_mod))
    tensor_paths = {id(value): path for path, value in reached if isinstance(value, torch.Tensor)}
    for path, value in reached:
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            raise ModError(
                f"a mod reads the 0-d tensor at {describe(path)}, whose value tracing bakes in as a constant; under "
                "torch.compile it would not follow later changes: capture a Python number or a 1-D tensor instead"
            )
    values = {c.name: c.value for mod in (score, mask) if mod for c in mod.captured}
    tensors = []
    for name in planned.captured_names:
        path = tensor_paths.get(id(values[name]))
        if path is None:
            raise ModError(
                f"captured tensor {name!r} is not reachable through the mods' closures, globals, defaults or the "
                "attributes their code names, which is where attncc finds tensors under torch.compile"
            )
        tensors.append(path)
    key = hashlib.sha256(
        repr((score and expression_key(score), mask and expression_key(mask), planned.backend, options)).encode()
    ).hexdigest()[:16]
    _PLANNED[key] = planned
    scalars = tuple((path, value) for path, value in reached if isinstance(value, _SCALARS))
    functions = tuple(path for path, value in reached if isinstance(value, types.FunctionType))
    return Plan(key, tuple(tensors), scalars, functions)


def stripped(mod: TracedMod | None) -> TracedMod | None:
    """The traced mod without its captured values, so the plan keeps no user tensor alive."""
    if mod is None:
        return None
    return replace(mod, captured=tuple(replace(c, value=None) for c in mod.captured))


def describe(path: tuple) -> str:
    text = ("score_mod", "mask_mod")[path[0]]
    for kind, arg in path[1:]:
        text += {"closure": f".<closure {arg}>", "global": f".<global {arg}>", "default": f".<default {arg}>",
                 "kwdefault": f".<default {arg}>", "attr": f".{arg}"}.get(kind, f"[{arg!r}]")  # fmt: skip
    return text


def reachable(roots: tuple) -> list[tuple[tuple, object]]:
    """(path, object) for everything the mods can read, breadth first (each object by its shortest path).

    A function leads to its closure cells, defaults and the globals its code names
    (torch's own functions to their closure cells and defaults only); a bound method to
    its function and ``self``; a ``functools.partial`` to its function and arguments;
    tuples, lists and dicts to their items; any other object to its ``__call__`` and the
    attributes the functions' code names (not torch's methods of a module: ``self.float``).
    Python modules and classes are not entered.
    """
    names: set[str] = set()
    while True:  # again while the code of a function found later names attributes of objects seen earlier
        known = set(names)
        found: list[tuple[tuple, object]] = []
        seen: set[int] = set()
        frontier = [((index,), root) for index, root in enumerate(roots) if root is not None]
        for _depth in range(MAX_DEPTH + 1):
            following = []
            for path, value in frontier:
                if id(value) in seen or len(seen) > MAX_OBJECTS:
                    continue
                seen.add(id(value))
                found.append((path, value))
                following.extend((path + (step,), child) for step, child in children(value, names))
            frontier = following
        if names == known:
            return found


def children(value, names: set[str]) -> list[tuple[tuple, object]]:
    if isinstance(value, (*_SCALARS, torch.Tensor, torch.dtype, torch.device, types.ModuleType, type)):
        return []
    if isinstance(value, TracedMod):  # the mask_mod of an attncc BlockMask, traced when the mask was made
        return [(("attr", "captured"), value.captured)]
    if isinstance(value, Captured):
        return [(("attr", "value"), value.value)]
    if isinstance(value, types.FunctionType):
        return function_children(value, names)
    if isinstance(value, types.MethodType):
        return [(("attr", "__func__"), value.__func__), (("attr", "__self__"), value.__self__)]
    if isinstance(value, functools.partial):
        return [(("attr", "func"), value.func), (("attr", "args"), value.args), (("attr", "keywords"), value.keywords)]
    if isinstance(value, (tuple, list)):
        return [(("item", i), item) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return [(("item", k), item) for k, item in value.items() if isinstance(k, (str, int))]
    attributes = []
    # a callable object as a mod: the __call__ its class defines or inherits
    call = next((vars(cls)["__call__"] for cls in type(value).__mro__ if "__call__" in vars(cls)), None)
    if isinstance(call, types.FunctionType) and not isinstance(value, torch.nn.Module):
        attributes.append((("attr", "__call__"), value.__call__))
    for name in sorted(names):
        try:
            attribute = getattr(value, name)
        except Exception:  # noqa: BLE001 - a missing or failing attribute is nothing the mod can read
            continue
        if not _is_torch_method(attribute):  # self.float, self.to: torch's methods, not what a mod reads
            attributes.append((("attr", name), attribute))
    return attributes


def _is_torch_method(value) -> bool:
    return isinstance(value, types.MethodType) and (value.__func__.__module__ or "").startswith("torch")


def function_children(fn: types.FunctionType, names: set[str]) -> list[tuple[tuple, object]]:
    code = fn.__code__
    read = code_names(code)
    names.update(read)
    result = []
    for index, cell in enumerate(fn.__closure__ or ()):
        try:
            result.append((("closure", index), cell.cell_contents))
        except ValueError:  # an empty cell
            continue
    if not (fn.__module__ or "").startswith("torch"):
        result.extend((("global", name), fn.__globals__[name]) for name in sorted(read) if name in fn.__globals__)
    result.extend((("default", i), value) for i, value in enumerate(fn.__defaults__ or ()))
    result.extend((("kwdefault", name), value) for name, value in (fn.__kwdefaults__ or {}).items())
    return result


# --------------------------------------------------------------------------- the custom op (runs the program)


def _planned(plan: str) -> PlannedMods:
    planned = _PLANNED.get(plan)
    if planned is None:
        raise InputError(
            f"no attncc plan {plan!r} in this process: a graph traced by torch.compile runs in the process that "
            "traced it (attncc plans its mods while Dynamo traces)"
        )
    return planned


def planned_program(plan: str, q, k, v, scale):
    """The compiled program of a plan for these inputs (from the program cache), and its captured tensors' names."""
    from attncc.flex import program_for

    planned = _planned(plan)
    program = program_for(planned.score, planned.mask, q.shape[1], k.shape[1], q.shape[3], v.shape[3], scale,
                          planned.backend, planned.options)  # fmt: skip
    return program, planned.captured_names


def _forward(q, k, v, captured, plan, scale):
    program, names = planned_program(plan, q, k, v, scale)
    o, lse = program(q, k, v, return_lse=True, **dict(zip(names, captured)))
    return o.contiguous(), lse.contiguous()


def _forward_fake(q, k, v, captured, plan, scale):
    batch, heads, n, _ = q.shape
    return q.new_empty(batch, heads, n, v.shape[3]), q.new_empty(batch, heads, n, dtype=torch.float32)


def _backward(q, k, v, o, lse, grad_o, grad_lse, captured, trainable, plan, scale):
    program, names = planned_program(plan, q, k, v, scale)
    by_name = dict(zip(names, captured))
    labels = [node.op.label for node in program.graph.captured]  # passes may have dropped unread tensors
    wanted = {names[i] for i in trainable}
    program_trainable = [j for j, label in enumerate(labels) if label in wanted]
    grad_q, grad_k, grad_v, grads = program.backward_op(
        q, k, v, o, lse, grad_o, grad_lse, [by_name[label] for label in labels], program_trainable
    )
    by_label = {labels[j]: grad for j, grad in zip(program_trainable, grads)}
    grad_captured = [by_label.get(names[i], torch.zeros_like(captured[i])) for i in trainable]
    return grad_q.contiguous(), grad_k.contiguous(), grad_v.contiguous(), [g.contiguous() for g in grad_captured]


def _backward_fake(q, k, v, o, lse, grad_o, grad_lse, captured, trainable, plan, scale):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        [captured[i].new_empty(captured[i].shape) for i in trainable],
    )


def _setup_context(ctx, inputs, output):
    q, k, v, captured, plan, scale = inputs
    ctx.save_for_backward(q, k, v, *output, *captured)
    ctx.plan, ctx.scale = plan, scale


def _autograd_backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, *captured = ctx.saved_tensors
    trainable = [i for i, needed in enumerate(ctx.needs_input_grad[3]) if needed]
    grad_o = torch.zeros_like(o) if grad_o is None else grad_o
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_q, grad_k, grad_v, grads = FLEX_ATTENTION_BACKWARD(
        q, k, v, o, lse, grad_o, grad_lse, captured, trainable, ctx.plan, ctx.scale
    )
    grad_captured = [None] * len(captured)
    for i, grad in zip(trainable, grads):
        grad_captured[i] = grad
    return grad_q, grad_k, grad_v, grad_captured, None, None


def _block_lists(captured, plan, B, H, Q_LEN, KV_LEN, block_q, block_kv, separate_full_blocks, device):
    from attncc.flex import create_block_mask

    planned = _planned(plan)
    by_name = dict(zip(planned.captured_names, captured))
    mask = replace(planned.mask, captured=tuple(replace(c, value=by_name[c.name]) for c in planned.mask.captured))
    blocks = create_block_mask(mask, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=(block_q, block_kv),
                               separate_full_blocks=separate_full_blocks)  # fmt: skip
    return blocks.kv_num_blocks, blocks.kv_indices, blocks.full_kv_num_blocks, blocks.full_kv_indices


def _block_lists_fake(captured, plan, B, H, Q_LEN, KV_LEN, block_q, block_kv, separate_full_blocks, device):
    q_blocks, kv_blocks = (Q_LEN + block_q - 1) // block_q, (KV_LEN + block_kv - 1) // block_kv
    counts = torch.empty(B or 1, H or 1, q_blocks, dtype=torch.int32, device=device)
    indices = torch.empty(B or 1, H or 1, q_blocks, kv_blocks, dtype=torch.int32, device=device)
    return counts, indices, torch.empty_like(counts), torch.empty_like(indices)


FLEX_ATTENTION = torch.library.custom_op("attncc::flex_attention", _forward, mutates_args=(), schema=FORWARD_SCHEMA)
FLEX_ATTENTION_BACKWARD = torch.library.custom_op(
    "attncc::flex_attention_backward", _backward, mutates_args=(), schema=BACKWARD_SCHEMA
)
FLEX_ATTENTION.register_fake(_forward_fake)
FLEX_ATTENTION_BACKWARD.register_fake(_backward_fake)
FLEX_ATTENTION.register_autograd(_autograd_backward, setup_context=_setup_context)
BLOCK_MASK = torch.library.custom_op(
    "attncc::create_block_mask", _block_lists, mutates_args=(), schema=BLOCK_MASK_SCHEMA
)
BLOCK_MASK.register_fake(_block_lists_fake)
