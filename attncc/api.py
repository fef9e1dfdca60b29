"""The public entry points: compile a spec into a CompiledAttention module, and validate it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tabulate import tabulate

from attncc.cache import Generated, content_key, generator_fingerprint, load_generated
from attncc.errors import BackendError, InputError, SpecError
from attncc.frontend.lower import (
    POSITION_TENSORS,
    lower,
    merged_captured,
    position_captured,
    sharded_captured,
    trace_mods,
)
from attncc.frontend.mod import Captured, ir_dtype
from attncc.integrations.custom_op import program_ops
from attncc.interpreter import run_reference
from attncc.ir.cost import cost_table
from attncc.ir.graph import Graph
from attncc.spec import AttentionSpec
from attncc.validation import (
    TOLERANCES,
    ValidationReport,
    clip_lengths,
    example_captured,
    example_positions,
    graph_index_uses,
    lse_tolerance,
    random_qkv,
    within_tolerance,
)

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class InputTypeError(InputError, TypeError):
    """A call-time argument has the wrong type (not a tensor, integer dtype, ...)."""


def compile(  # noqa: A001
    spec: AttentionSpec,
    backend: str = "pytorch",
    *,
    pipeline=None,
    validate_each: bool = False,
    print_after_all: bool = False,
    print_after: tuple[str, ...] = (),
    sharded: bool = False,
    positions: tuple[str, ...] = (),
) -> CompiledAttention:
    """Compile a spec into a module computing ``o`` (and ``lse``) from ``q, k, v``.

    ``pipeline`` is a target name or a list of passes (default: the backend's
    pipeline); ``validate_each`` checks every pass numerically against the graph
    before it (translation validation); ``print_after_all`` / ``print_after``
    print the IR after every / the named passes. ``sharded`` compiles a program for
    shards of longer sequences (context parallelism): it takes the captured int64 tensor
    ``shard = (first query position, first key position, global N, global M)`` and its
    masks and mods see global positions (``attncc.distributed`` passes it). ``positions``:
    with a spec's ``rope``, the sequences ("q", "kv") whose positions the program reads
    from call-time tensors; a module called with ``q_positions`` / ``kv_positions``
    compiles the variant it needs itself.
    """
    from attncc import passes
    from attncc.backends import get_backend

    if not isinstance(spec, AttentionSpec):
        raise SpecError(f"spec={spec!r} is invalid: an attncc.AttentionSpec is allowed (see attncc.load_spec)")
    if spec.kind == "linear":
        from attncc.linear import compile_linear

        return compile_linear(spec, backend, pipeline=pipeline, validate_each=validate_each,
                              print_after_all=print_after_all, print_after=print_after)  # fmt: skip
    target = get_backend(backend)
    score_mod, mask_mod = trace_mods(spec)
    positions = tuple(sorted(positions))
    mods_captured, positions_captured = merged_captured(score_mod, mask_mod), position_captured(positions)
    if sharded:
        mods_captured = sharded_captured(mods_captured)
    unoptimized = lower(spec, (score_mod, mask_mod), sharded=sharded, given_positions=positions)
    captured = {**mods_captured, **positions_captured}
    examples = {}
    if validate_each:
        generator = torch.Generator().manual_seed(0)
        examples = {
            **example_captured(mods_captured, generator, "cpu"),
            **example_positions(positions_captured, generator),
        }
    manager = passes.PassManager(
        passes.pipeline(pipeline or backend),
        print_after_all=print_after_all,
        print_after=tuple(print_after),
        validate_each=validate_each,
        captured=examples,
    )
    graph = manager.run(unoptimized)
    attn = CompiledAttention(spec, unoptimized, graph, manager.records, target.name, load_program(graph, target),
                             captured)  # fmt: skip
    attn.positions, attn._pipeline = positions, pipeline
    return attn


def load_program(graph: Graph, target) -> Generated:
    """The generated module of an optimized graph for a backend (from the cache, generated if missing)."""
    key = content_key(str(graph), target.name, generator_fingerprint(target))
    generated = load_generated(key, lambda: target.generate(graph).source)
    if hasattr(target, "attach"):  # native parts of the program that the generated module calls
        target.attach(generated.module, graph)
    return generated


class CapturedTensors(torch.nn.Module):
    """A program's captured tensors as non-persistent buffers under their labels, so ``.to()`` moves them.

    Any label works, also one that names a method of ``nn.Module`` (``float``, ``to``, ``cuda``):
    read a tensor with ``attn.captured["doc"]``, or as ``attn.captured.doc`` where the label is
    not such a method.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            self._buffers[name] = tensor  # register_buffer refuses labels that are attributes of nn.Module
            self._non_persistent_buffers_set.add(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def get(self, name: str, default=None):
        return self._buffers.get(name, default)


class CompiledAttention(torch.nn.Module):
    """A compiled attention program as a module: ``o = attn(q, k, v)``.

    ``forward(q, k, v, return_lse=False, q_positions=None, kv_positions=None, **captured)``:
    captured tensors of the mods are held as buffers (under ``.captured``) and can be
    replaced per call by name. With a spec's ``rope``, ``q_positions`` [B, N] and
    ``kv_positions`` [B, M] (integer tensors) place each query and key of each
    sequence (default: key j at j, query i at M - N + i); the first call with a new
    combination compiles that variant once (``positions``, ``with_positions``).
    The call runs through the program's ``torch.library`` custom op (``.op``), so
    ``torch.compile(fullgraph=True)`` and autograd treat it as one opaque node (plain
    eager calls run the op's implementations without the dispatcher: docs/integrations.md).
    ``graph`` is the optimized IR the backend compiled, ``unoptimized_graph`` the
    textbook graph it came from (the meaning), ``pass_records`` what each pass did.

    The module copies (``copy.deepcopy``) and pickles (``torch.save(model)``): it saves
    its graphs, spec and buffers, not the loaded code, and a fresh process regenerates
    the program from the optimized graph through the cache. Python callables in the
    spec (``score_mod``, ``mask_mod``) are saved as their traced expressions.
    """

    def __init__(self, spec, unoptimized_graph: Graph, graph: Graph, pass_records, backend: str,
                 generated: Generated, captured: dict[str, Captured]):  # fmt: skip
        super().__init__()
        self.spec = spec
        self.unoptimized_graph = unoptimized_graph
        self.graph = graph
        self.pass_records = list(pass_records)
        self.backend = backend
        self.generated = generated
        self._function = generated.module.attention
        self._captured_meta = dict(captured)
        self.captured = CapturedTensors({name: info.value for name, info in captured.items() if info.value is not None})
        self._index_uses = tuple(sorted(graph_index_uses(unoptimized_graph)))
        self._program_labels = tuple(node.op.label for node in graph.captured)  # what the program still reads
        self._ops = program_ops(generated.key, self._function, graph)
        self.positions: tuple[str, ...] = ()
        self._pipeline = None
        self._variants: dict[tuple[str, ...], CompiledAttention] = {}

    def with_positions(self, positions: tuple[str, ...]) -> CompiledAttention:
        """This program with RoPE positions read from call-time tensors for ``positions`` ("q", "kv")."""
        positions = tuple(sorted(positions))
        if positions == self.positions:
            return self
        if positions not in self._variants:
            self._variants[positions] = compile(self.spec, self.backend, pipeline=self._pipeline, positions=positions)
        return self._variants[positions]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["generated"], state["_function"], state["_ops"]
        state["spec"] = portable_spec(self.spec)
        return state

    def __setstate__(self, state: dict) -> None:
        from attncc.backends import get_backend

        self.__dict__.update(state)
        self.generated = load_program(self.graph, get_backend(self.backend))
        self._function = self.generated.module.attention
        self._ops = program_ops(self.generated.key, self._function, self.graph)

    @property
    def op(self):
        """The program's forward custom op, ``attncc::program_<hash>(q, k, v, captured) -> (o, lse)``."""
        return self._ops.forward

    @property
    def backward_op(self):
        """The backward custom op ``(q, k, v, o, lse, grad_o, grad_lse, captured, trainable) -> grads``.

        It recomputes each tile's probabilities as ``exp(s - lse)``, so ``o`` and ``lse``
        may be those of attention over a larger key set that includes ``k``: the grads are
        then this key set's share (ring attention's backward).
        """
        return self._ops.backward

    @property
    def module(self):
        """The loaded generated module (its region classes and helpers, e.g. ``FlashAttention.tiles``)."""
        return self.generated.module

    @property
    def path(self) -> Path | None:
        """The cache entry the program was imported from; None if it was compiled in memory."""
        return self.generated.path

    @property
    def source(self) -> str:
        """The generated source that runs (verified against its cache entry's checksum)."""
        return self.generated.source

    def explain(self, sizes: dict | None = None) -> str:
        """The passes that ran, what each changed, the cost before and after each, and the final IR.

        ``sizes`` fixes the symbols for the cost table (default B=1, N=M=4096).
        """
        captured_sizes = {
            f"{name}_d{dim}": size
            for name, info in self._captured_meta.items()
            for dim, size in enumerate(info.value.shape if info.value is not None else info.shape or ())
        }
        return explain_program(self, sizes, captured_sizes)

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
            value = overrides.get(name, self.captured.get(name))
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

    def _check_index_ranges(self, by_name: dict, sizes: dict) -> None:
        """Raise InputError unless every captured tensor covers the indices it is read at."""
        for name, dim, symbol in self._index_uses:
            if by_name[name].shape[dim] < sizes[symbol]:
                raise InputError(
                    f"captured tensor {name!r} has {by_name[name].shape[dim]} entries along dim {dim}, but is indexed "
                    f"by {symbol} up to {sizes[symbol] - 1}"
                )

    def forward(self, q, k, v, return_lse: bool = False, q_positions=None, kv_positions=None, **captured):
        given = {role: t for role, t in (("q", q_positions), ("kv", kv_positions)) if t is not None}
        check_inputs(self.spec, q, k, v)
        check_positions(self.spec, q, k, given)
        if tuple(sorted(given)) != self.positions:  # the variant that reads these positions, with these buffers
            buffers = dict(self.captured.named_buffers())
            variant = self.with_positions(tuple(given))
            return variant(q, k, v, return_lse, q_positions, kv_positions, **{**buffers, **captured})
        captured.update({POSITION_TENSORS[role]: t.to(torch.int64) for role, t in given.items()})
        if not (self._captured_meta or captured):
            return self._run(q, k, v, [], return_lse)
        values = self.captured_values(captured, q.device)
        by_name = dict(zip(self._captured_meta, values))
        sizes = {"b": q.shape[0], "h": q.shape[1], "q_idx": q.shape[2], "kv_idx": k.shape[2]}
        self._check_index_ranges(by_name, sizes)
        # Passes may simplify a captured tensor away: the program takes those its graph still reads.
        return self._run(q, k, v, [by_name[label] for label in self._program_labels], return_lse)

    def _run(self, q, k, v, program_inputs: list, return_lse: bool):
        try:
            o, lse = self._ops(q, k, v, program_inputs)
        except IndexError as error:
            names = ", ".join(node.op.label for node in self.graph.captured)
            raise InputError(
                f"an index into a captured tensor ({names}) is out of range for these inputs: {error}"
            ) from error
        return (o, lse) if return_lse else o

    def decode(self, q, cache, return_lse: bool = False, sequences=None, **captured):
        """Attention of ``q [B, H, N, D]`` against a KV cache (``attncc.StaticKVCache`` or ``attncc.PagedKVCache``).

        Row ``b`` of q belongs to cache sequence ``sequences[b]`` (default: every sequence, in
        order). Means, for every row, ``attn(q[b], k_b, v_b)`` with ``k_b`` its sequence's first
        ``lengths`` keys (so ``M`` is that length for causal masks and mods, whose ``b`` is the
        row); a sequence without keys gives ``o = 0``, ``lse = -inf``. Paged caches are read
        through their page table in place (a static cache's rows are copied when
        ``sequences`` picks some). Differentiable in q, the cache's tensors and captured tensors.
        """
        from attncc.kv_cache import PagedKVCache, StaticKVCache

        function = getattr(self.module, "decode", None)
        if function is None:
            raise BackendError(
                f"this program (backend {self.backend!r}) has no decoding path: compile it with a pipeline that "
                "runs split-kv (the pytorch and triton pipelines do)"
            )
        if not isinstance(cache, (StaticKVCache, PagedKVCache)):
            raise InputTypeError(
                f"cache is a {type(cache).__name__}: an attncc.StaticKVCache or attncc.PagedKVCache is allowed"
            )
        paged = isinstance(cache, PagedKVCache)
        rows = cache.indices(sequences)
        k, v = (cache.k_pages, cache.v_pages) if paged else (cache.k, cache.v)
        lengths, table = cache.lengths, cache.page_table if paged else None
        if sequences is not None:
            index = torch.tensor(rows, device=cache.device)
            lengths, table = lengths[index], table[index] if paged else None
            k, v = (k, v) if paged else (k[index], v[index])
        logical = (len(rows), cache.num_kv_heads, 1, cache.head_dim)
        if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[0] != len(rows):
            raise InputError(f"q has batch size {q.shape[0]}; the call reads {len(rows)} sequences of the cache")
        check_inputs(self.spec, q, k.new_empty(logical), v.new_empty(logical[:3] + (cache.v_head_dim,)))
        values = self.captured_values(captured, q.device)
        by_name = dict(zip(self._captured_meta, values))
        sizes = {"b": q.shape[0], "h": q.shape[1], "q_idx": q.shape[2], "kv_idx": int(lengths.max())}
        self._check_index_ranges(by_name, sizes)
        program_inputs = [by_name[node.op.label] for node in self.graph.captured]
        o, lse = function(q, k, v, lengths, table, *program_inputs)
        return (o, lse) if return_lse else o


def explain_program(program, sizes: dict | None = None, bindings: dict | None = None) -> str:
    """A compiled program's passes (what each changed, how long it took), its cost before and after
    each pass at ``sizes`` (default B=1, N=M=4096; ``bindings`` fix further symbols), and its final IR."""
    sizes = sizes or {"B": 1, "N": 4096, "M": 4096}
    rows = [
        [r.description, ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items())) or "no change",
         f"{1000 * r.seconds:.1f} ms"]
        for r in program.pass_records
    ]  # fmt: skip
    stages = [("(unoptimized)", program.unoptimized_graph)] + [(r.name, r.graph) for r in program.pass_records]
    size_text = ", ".join(f"{k}={v}" for k, v in sizes.items())
    return "\n".join([
        f"backend: {program.backend}    source: {program.path or '(compiled in memory, not cached)'}",
        "passes:",
        tabulate(rows, headers=["pass", "changes", "time"]),
        "",
        f"cost at {size_text} (T = 2 bytes):",
        cost_table(stages, {**(bindings or {}), **sizes}),
        "",
        "optimized IR:",
        str(program.graph),
    ])  # fmt: skip


def portable_spec(spec: AttentionSpec) -> AttentionSpec:
    """The spec with Python callables (mods) replaced by their traced expressions, so that it pickles."""
    if not (callable(spec.score_mod) or callable(spec.mask_mod)):
        return spec
    score_mod, mask_mod = trace_mods(spec)
    return dataclasses.replace(spec, score_mod=score_mod, mask_mod=mask_mod)


def check_inputs(spec: AttentionSpec, q, k, v) -> None:
    """Raise InputError naming the argument unless q, k, v fit the spec."""
    if _inputs_fit(spec, q, k, v):  # the common case in one expression; the checks below name what is wrong
        return
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


def _inputs_fit(spec: AttentionSpec, q, k, v) -> bool:
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    return (
        len(qs) == len(ks) == len(vs) == 4
        and q.dtype == k.dtype == v.dtype
        and q.dtype in INPUT_DTYPES
        and q.device == k.device == v.device
        and qs[0] == ks[0] == vs[0]
        and qs[1] == spec.num_heads
        and ks[1] == vs[1] == spec.num_kv_heads
        and qs[3] == ks[3] == spec.head_dim
        and vs[3] == spec.v_head_dim
        and ks[2] == vs[2]
        and qs[2] > 0
        and ks[2] > 0
    )


def check_positions(spec: AttentionSpec, q, k, given: dict) -> None:
    """Raise InputError unless each given RoPE position tensor is an integer [B, N] (q) or [B, M] (kv) tensor."""
    for role, t in given.items():
        label = POSITION_TENSORS[role]
        if spec.rope is None:
            raise InputError(f"{label} is given, but the spec has no rope: positions place RoPE rotations")
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{label} is a {type(t).__name__}: a torch.Tensor is allowed")
        if t.dtype not in (torch.int32, torch.int64):
            raise InputTypeError(f"{label} has dtype {t.dtype}: int32 or int64 are allowed")
        expected = (q.shape[0], q.shape[2] if role == "q" else k.shape[2])
        if tuple(t.shape) != expected:
            axis = "N" if role == "q" else "M"
            raise InputError(f"{label} has shape {tuple(t.shape)}: [B, {axis}] = {list(expected)} is allowed")
        if t.device != q.device:
            raise InputError(f"{label} is on {t.device}, the inputs on {q.device}; move it")


DEFAULT_SHAPES = ((2, 37, 53), (1, 64, 29))


def validate(spec, backend: str = "pytorch", dtypes=INPUT_DTYPES, shapes=DEFAULT_SHAPES, seed: int = 0,
             device="cpu", verbose: bool = True) -> ValidationReport:  # fmt: skip
    """Compile ``spec`` and compare it with the reference interpreter on fresh random inputs.

    ``shapes`` are (B, N, M) triples, clipped to what the captured tensors allow.
    Prints a table when ``verbose``; returns the report (``report.ok``). An element
    passes when |out - ref| <= atol + rtol * |ref| (``TOLERANCES`` per dtype); the
    table's "worst / allowed" is the largest ratio of the two, at most 1 to pass.
    """
    if isinstance(spec, AttentionSpec) and spec.kind == "linear":
        from attncc.linear import validate_linear

        return validate_linear(spec, backend, dtypes, shapes, seed, device, verbose)
    attn = compile(spec, backend=backend).to(device)
    generator = torch.Generator().manual_seed(seed)
    captured = example_captured(attn._captured_meta, generator, device)
    report = ValidationReport()
    for batch, n, m in shapes:
        batch, n, m = clip_lengths(attn._index_uses, captured, batch, n, m)
        for dtype in dtypes:
            q, k, v = random_qkv(attn.unoptimized_graph, batch, n, m, dtype, generator, device)
            o, lse = attn(q, k, v, return_lse=True, **captured)
            reference = run_reference(attn.unoptimized_graph, q, k, v, captured)
            atol, rtol = TOLERANCES[dtype]
            o_ok, o_error, o_ratio = within_tolerance(o, reference["o"], atol, rtol)
            lse_ok, lse_error, lse_ratio = within_tolerance(
                lse, reference["lse"], *lse_tolerance(dtype, spec.rope is not None)
            )
            report.rows.append({
                "dtype": str(dtype).removeprefix("torch."), "B": batch, "N": n, "M": m, "o_error": o_error,
                "lse_error": lse_error, "ratio": max(o_ratio, lse_ratio), "ok": o_ok and lse_ok and o.dtype == dtype,
            })  # fmt: skip
    if verbose:
        print(report.table())
    return report


def reference_outputs(attn: CompiledAttention, q, k, v, **captured) -> dict:
    """The float64 reference of a compiled module's unoptimized graph on these inputs."""
    values = dict(zip(attn._captured_meta, attn.captured_values(captured, q.device)))
    return run_reference(attn.unoptimized_graph, q, k, v, values)


__all__ = ["CompiledAttention", "ValidationReport", "check_inputs", "check_positions", "compile", "validate"]
