"""What attncc is timed against, and attncc itself: each implementation as a ``setup(case, device) -> Setup``."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch

import attncc
from attncc.bench.cases import (
    BenchCase,
    captured_values,
    keep_mask,
    kv_bytes,
    mask_bytes,
    naive_extra_bytes,
    score_function,
    spec_predicate,
)
from attncc.bench.timing import synchronized, timed
from attncc.errors import AttnccError
from attncc.frontend.lower import alibi_slope
from attncc.interpreter import evaluate
from attncc.ir.cost import graph_cost
from attncc.ir.expr import free_symbol_names
from attncc.spec import AttentionSpec

# torch.nn.attention.SDPBackend member per implementation name; "sdpa" is torch's own choice.
SDPA_BACKENDS = {
    "sdpa-math": "MATH",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}
# (backend, device type) pairs whose programs run in an interpreter: not timing targets, so
# they run only when asked for by name (e.g. --impl attncc-triton on CPU).
INTERPRETED = {
    ("triton", "cpu"): "Triton runs its kernels in an interpreter on CPU tensors",
    ("cuda", "cpu"): "the cuda backend runs its kernels in a host emulation on CPU tensors",
}


class Unsupported(Exception):
    """An implementation cannot express this case (e.g. SDPA and a score_mod); the row says why."""


@dataclass
class Setup:
    """An implementation ready for a case: ``bind(q, k, v)`` gives the call to time.

    ``extra_bytes``: memory one call needs beyond its inputs, when known beforehand;
    ``compile_s``: spec to runnable module; ``warm_compile()`` compiles again and
    returns the seconds it took (or None); ``compiles_on_first_call``: compile time is
    the first call minus the median (torch.compile).
    """

    bind: Callable
    extra_bytes: int | None = None
    compile_s: float | None = None
    block_mask_s: float | None = None
    warm_compile: Callable | None = None
    compiles_on_first_call: bool = False
    precomputed_bytes: int = 0


def _setup_attncc(backend: str, pipeline: list[str] | None = None):
    def setup(case: BenchCase, device) -> Setup:
        attn, seconds = timed(lambda: attncc.compile(case.spec, backend=backend, pipeline=pipeline))
        attn = attn.to(device)
        sizes = {"B": case.batch, "N": case.n, "M": case.m}
        peak = graph_cost(attn.graph, dtype_bytes=case.dtype.itemsize).at(sizes).peak_memory
        extra = int(peak) if sympy.sympify(peak).is_number else None

        def warm() -> float:
            return timed(lambda: attncc.compile(case.spec, backend=backend, pipeline=pipeline))[1]

        captured = captured_values(case.spec, device)  # spec files may leave their values to the call
        return Setup(lambda q, k, v: lambda: attn(q, k, v, **captured), extra, seconds, warm_compile=warm)

    return setup


PAGE_SIZE = 16  # tokens per page of the paged cache (vLLM's default block size)


def paged_cache(k: torch.Tensor, v: torch.Tensor, page_size: int = PAGE_SIZE) -> attncc.PagedKVCache:
    """A paged cache holding k, v [B, Hkv, M, *]: pages handed out to the sequences in turn, as when
    requests grow together, so each sequence's pages are scattered over the pool."""
    batch, kv_heads, length, head_dim = k.shape
    pages = -(-length // page_size)
    cache = attncc.PagedKVCache(batch * pages, page_size, batch, kv_heads, head_dim, v.shape[3], dtype=k.dtype,
                                device=k.device)  # fmt: skip
    for page in range(pages):
        for sequence in range(batch):
            cache.reserve(sequence, min(length, (page + 1) * page_size))
    cache.append(k, v)
    return cache


def _setup_attncc_paged(backend: str):
    """attncc's decoding path reading K and V through a paged cache's page table."""

    def setup(case: BenchCase, device) -> Setup:
        attn, seconds = timed(lambda: attncc.compile(case.spec, backend=backend))
        attn = attn.to(device)

        def bind(q, k, v):
            cache = paged_cache(k, v)
            return lambda: attn.decode(q, cache)

        # the pages (the pytorch path copies them in blocks of at most BLOCK_BYTES besides)
        return Setup(bind, kv_bytes(case), seconds)

    return setup


def _torch_decode(setup: Callable):
    """attncc's pytorch backend with its decoding steps on the generated torch code (``ATTNCC_CPU_DECODE=0``),
    to set beside the CPU decoding kernel in one run."""

    def torch_setup(case: BenchCase, device) -> Setup:
        made = setup(case, device)

        def bind(q, k, v):
            call = made.bind(q, k, v)

            def without_kernel():
                previous = os.environ.get("ATTNCC_CPU_DECODE")
                os.environ["ATTNCC_CPU_DECODE"] = "0"
                try:
                    return call()
                finally:
                    if previous is None:
                        del os.environ["ATTNCC_CPU_DECODE"]
                    else:
                        os.environ["ATTNCC_CPU_DECODE"] = previous

            return without_kernel

        return dataclasses.replace(made, bind=bind)

    return torch_setup


def tile_variant(name: str) -> Callable | None:
    """``attncc-triton@BMxBNxWxS`` (e.g. ``attncc-triton@128x64x8x2``): attncc's Triton backend with those
    tiles, warps and stages; ``attncc-triton@FORWARD/BACKWARD`` gives the backward kernels their own
    (``attncc-triton@128x64x8x2/64x64x4x3``). None for any other name."""
    from attncc.passes import PIPELINES

    prefix = "attncc-triton@"
    if not name.startswith(prefix):
        return None
    configs = name[len(prefix) :].lower().split("/")
    try:
        if len(configs) > 2:
            raise ValueError
        values = [[int(part) for part in config.split("x")] for config in configs]
        if any(len(config) != 4 for config in values):
            raise ValueError
    except ValueError:
        raise AttnccError(
            f"implementation {name!r} is invalid: attncc-triton@BLOCK_MxBLOCK_NxWARPSxSTAGES, optionally followed "
            "by /BLOCK_MxBLOCK_NxWARPSxSTAGES for the backward, e.g. attncc-triton@128x64x8x2/64x64x4x3, is allowed"
        ) from None
    keys = ("block_m", "block_n", "num_warps", "num_stages")
    options = dict(zip(keys, values[0]))
    if len(values) == 2:
        options.update(zip((f"bwd_{key}" for key in keys), values[1]))
    tile = "tile{target=triton," + ",".join(f"{key}={value}" for key, value in options.items()) + "}"
    return _setup_attncc("triton", [*PIPELINES["triton"][:-1], tile])


def naive_attention(q, k, v, scale: float, hidden: torch.Tensor | None = None, score_fn=None):
    """Textbook eager attention: softmax(q k^T * scale, masked) v, every score materialised.

    ``hidden`` is True where a score is masked out. Computes in the input dtype, as
    eager model code does. A fully masked row gives NaN (softmax of all -inf).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if score_fn is not None:
        scores = score_fn(scores)
    if hidden is not None:
        scores.masked_fill_(hidden, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    del scores
    return torch.matmul(probs, v)


def naive_linear_attention(q, k, v, phi, scale: float, causal: bool, normalize: bool, eps: float):
    """Textbook eager linear attention: the quadratic form, every (query, key) weight materialised.

    ``phi(x)`` is the feature map on a tensor; computes in the input dtype, as eager model code does.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    weights = torch.matmul(phi(q), phi(k).transpose(-1, -2)).mul_(scale)
    if causal:
        n, m = q.shape[2], k.shape[2]
        weights = weights.tril_(m - n)  # key j visible to query i iff j <= i + M - N
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + eps)
    return torch.matmul(weights, v)


def _setup_naive_linear(case: BenchCase, device) -> Setup:
    from attncc.frontend.feature_map import feature_map_expr

    spec = case.spec
    if spec.kind != "linear":
        raise Unsupported("naive-linear computes linear attention: the case's spec is not kind='linear'")
    expr = feature_map_expr(spec.feature_map)

    def phi(x):
        return torch.as_tensor(evaluate(expr, {"x": x}, {})).to(x.dtype).expand_as(x)

    scores = case.batch * spec.num_heads * case.n * case.m * case.dtype.itemsize
    extra = 2 * scores + case.batch * spec.num_heads * case.n * spec.v_head_dim * case.dtype.itemsize

    def bind(q, k, v):
        return lambda: naive_linear_attention(q, k, v, phi, _scale(spec), bool(spec.causal), spec.normalize, spec.eps)

    return Setup(bind, extra)


def _as_softmax(setup: Callable):
    """A softmax-attention implementation timed on a linear case: same shapes and mask, softmax instead of phi."""

    def softmax_setup(case: BenchCase, device) -> Setup:
        if case.spec.kind != "linear":
            raise Unsupported("the -softmax implementations stand in for linear attention cases only")
        softmax = case.spec.replace(kind="softmax", feature_map=None, normalize=True, eps=None)
        return setup(dataclasses.replace(case, spec=softmax), device)

    return softmax_setup


def _scale(spec: AttentionSpec) -> float:
    return spec.scale if spec.scale is not None else 1 / math.sqrt(spec.head_dim)


def _setup_naive(case: BenchCase, device) -> Setup:
    score_fn = score_function(case, device)

    def bind(q, k, v):
        keep = keep_mask(case, device)
        hidden = None if keep is None else ~keep
        return lambda: naive_attention(q, k, v, _scale(case.spec), hidden, score_fn)

    return Setup(bind, naive_extra_bytes(case), precomputed_bytes=mask_bytes(case))


def _sdpa_plan(case: BenchCase) -> tuple[str, int]:
    """How SDPA expresses the case ("none", "causal", "mask" or "bias"), and the bytes of the mask it takes."""
    spec = case.spec
    if spec.score_mod is not None or spec.softcap is not None:
        raise Unsupported("SDPA cannot apply a score_mod or softcap")
    if spec.alibi:  # the ALiBi bias, -inf where masked, as a float attn_mask
        return "bias", spec.num_heads * case.n * case.m * case.dtype.itemsize
    plain_causal = spec.causal and spec.window is None and spec.mask_mod is None
    if plain_causal and (case.n == case.m or spec.causal == "top_left"):
        return "causal", 0  # SDPA's is_causal is top-left aligned: exact when N == M
    return ("mask", mask_bytes(case)) if mask_bytes(case) else ("none", 0)


def _sdpa_arguments(case: BenchCase, device, plan: str) -> dict:
    if plan == "causal":
        return {"is_causal": True}
    keep = keep_mask(case, device)
    if plan != "bias":
        return {"attn_mask": keep}
    heads = case.spec.num_heads
    bias = score_function(case, device)(torch.zeros(1, heads, case.n, case.m, device=device))
    if keep is not None:
        bias = bias.masked_fill(~keep, -math.inf)
    return {"attn_mask": bias.to(case.dtype)}


def _setup_sdpa(name: str):
    def setup(case: BenchCase, device) -> Setup:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        plan, precomputed = _sdpa_plan(case)
        backend = SDPA_BACKENDS.get(name)
        extra = None
        if name == "sdpa-math":
            # The math backend materialises scores and probabilities, and a float copy of a mask.
            extra = naive_extra_bytes(case) + case.batch * case.spec.num_heads * case.n * case.m * case.dtype.itemsize

        def bind(q, k, v):
            options = {**_sdpa_arguments(case, device, plan), "scale": case.spec.scale,
                       "enable_gqa": case.spec.groups > 1}  # fmt: skip

            def run():
                context = sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext()
                with context:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **options)

            return run

        return Setup(bind, extra, precomputed_bytes=precomputed)

    return setup


def flex_mods(case: BenchCase, device) -> tuple[Callable | None, Callable | None, tuple[int | None, int | None]]:
    """(score_mod, mask_mod, (B, H) for create_block_mask) expressing the case with FlexAttention's mods."""
    spec = case.spec
    offset = 0 if spec.alignment == "top_left" else case.m - case.n
    score_parts = []
    if spec.alibi:
        heads = {"h": torch.arange(spec.num_heads, device=device)}
        slopes = torch.as_tensor(evaluate(alibi_slope(spec.num_heads), heads, {})).to(device, torch.float32)
        score_parts.append(lambda score, b, h, q_idx, kv_idx: score - slopes[h] * (q_idx + offset - kv_idx).abs())
    if spec.score_mod is not None:
        if not callable(spec.score_mod):
            raise Unsupported("FlexAttention needs a Python score_mod; this spec's score is an expression")
        score_parts.append(spec.score_mod)
    if spec.softcap is not None:
        cap = spec.softcap
        score_parts.append(lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap))

    mask_parts = []
    if spec.causal:
        mask_parts.append(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + offset)
    if spec.window is not None:
        left, right = spec.window
        if left is not None:
            mask_parts.append(lambda b, h, q_idx, kv_idx: kv_idx >= q_idx + offset - left)
        if right is not None and not spec.causal:
            mask_parts.append(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + offset + right)
    if callable(spec.mask_mod):
        mask_parts.append(spec.mask_mod)
    elif spec.mask_mod is not None:
        keep = keep_mask(case, device)  # an expression from a spec file: look its values up
        mask_parts = [lambda b, h, q_idx, kv_idx: keep[b * int(keep.shape[0] > 1), h * int(keep.shape[1] > 1),
                                                         q_idx, kv_idx]]  # fmt: skip

    def score_mod(score, b, h, q_idx, kv_idx):
        for part in score_parts:
            score = part(score, b, h, q_idx, kv_idx)
        return score

    def mask_mod(b, h, q_idx, kv_idx):
        keep = mask_parts[0](b, h, q_idx, kv_idx)
        for part in mask_parts[1:]:
            keep = keep & part(b, h, q_idx, kv_idx)
        return keep

    names = free_symbol_names(spec_predicate(spec))
    sizes = (case.batch if "b" in names else None, spec.num_heads if "h" in names else None)
    return (score_mod if score_parts else None), (mask_mod if mask_parts else None), sizes


def _setup_flex(compiled: bool):
    def setup(case: BenchCase, device) -> Setup:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        score_mod, mask_mod, (batch, heads) = flex_mods(case, device)
        block_mask, block_seconds = None, None
        if mask_mod is not None:
            block_mask, block_seconds = timed(
                lambda: create_block_mask(mask_mod, batch, heads, case.n, case.m, device=device)
            )
        function = torch.compile(flex_attention) if compiled else flex_attention
        options = {"score_mod": score_mod, "block_mask": block_mask, "scale": case.spec.scale,
                   "enable_gqa": case.spec.groups > 1}  # fmt: skip
        inputs = {}

        def bind(q, k, v):
            inputs.update(q=q, k=k, v=v)
            return lambda: function(q, k, v, **options)

        def warm() -> float:
            torch._dynamo.reset()
            again = torch.compile(flex_attention)
            _, first = timed(lambda: synchronized(lambda: again(inputs["q"], inputs["k"], inputs["v"], **options)))
            return first

        return Setup(bind, block_mask_s=block_seconds, warm_compile=warm if compiled else None,
                     compiles_on_first_call=compiled)  # fmt: skip

    return setup


def available_implementations(device) -> dict[str, Callable]:
    """Implementation name -> setup(case, device) for everything that runs on this device."""
    from attncc.backends import BACKENDS, get_backend

    device = torch.device(device)
    found = {}
    for backend in BACKENDS:
        try:
            module = get_backend(backend)
        except (ImportError, AttnccError):
            continue  # e.g. triton not installed
        if device.type in module.devices and (backend, device.type) not in INTERPRETED:
            found[f"attncc-{backend}"] = _setup_attncc(backend)
    for name in sdpa_backends_available(device):
        found[name] = _setup_sdpa(name)
    found["naive"] = _setup_naive
    if _flex_importable():
        found["flex-compiled"] = _setup_flex(compiled=True)
    return found


def optional_implementations(device) -> dict[str, Callable]:
    """Implementations that run only when asked for by name: SDPA's own dispatch, eager FlexAttention,
    attncc backends that would run in an interpreter (``INTERPRETED``), attncc decoding from a paged cache, attncc's
    decoding steps on its generated torch code instead of its CPU kernel (``-torch-decode``), and for linear attention cases
    the quadratic eager form (``naive-linear``) and softmax attention of the same shapes and mask
    (``attncc-pytorch-softmax``, ``sdpa-softmax``)."""
    device = torch.device(device)
    found = {f"attncc-{backend}": _setup_attncc(backend) for backend, kind in INTERPRETED if kind == device.type}
    found["sdpa"] = _setup_sdpa("sdpa")
    found["attncc-pytorch-paged"] = _setup_attncc_paged("pytorch")
    found["attncc-triton-paged"] = _setup_attncc_paged("triton")
    found["attncc-pytorch-torch-decode"] = _torch_decode(_setup_attncc("pytorch"))
    found["attncc-pytorch-paged-torch-decode"] = _torch_decode(_setup_attncc_paged("pytorch"))
    if _flex_importable():
        found["flex-eager"] = _setup_flex(compiled=False)
    found["naive-linear"] = _setup_naive_linear
    found["attncc-pytorch-softmax"] = _as_softmax(_setup_attncc("pytorch"))
    found["sdpa-softmax"] = _as_softmax(_setup_sdpa("sdpa"))
    return found


def runnable_implementations(device) -> dict[str, Callable]:
    """Everything that runs on this device, by default or when asked for by name."""
    return {**available_implementations(device), **optional_implementations(device)}


def _flex_importable() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def sdpa_backends_available(device) -> list[str]:
    """The SDPA backends that run a small causal problem on this device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 16, 64, device=device)
    names = []
    for name, member in SDPA_BACKENDS.items():
        if not hasattr(SDPBackend, member):
            continue
        try:
            with sdpa_kernel([getattr(SDPBackend, member)]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        except RuntimeError:
            continue
        names.append(name)
    return names
