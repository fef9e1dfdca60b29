"""Named benchmark suites, and ``CaseSource``: where a worker process rebuilds its cases from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import attncc
from attncc.bench.cases import DTYPES, BenchCase, describe_mask, document_causal_mask, document_ids
from attncc.errors import AttnccError
from attncc.spec import AttentionSpec


def cpu_suite(device) -> list[BenchCase]:
    """B=1, H=8, D=64, fp32, N=M in {1024, 4096}: dense, causal, sliding window 256, 8 packed documents."""
    cases = []
    for n in (1024, 4096):
        masks = {
            "dense": {},
            "causal": {"causal": True},
            "sliding window 256": {"causal": True, "window": (256, 0)},
            "document (8 docs)": {"mask_mod": document_causal_mask(document_ids(n, 8, seed=n, device=device))},
        }
        for mask, fields in masks.items():
            spec = AttentionSpec(num_heads=8, head_dim=64, **fields)
            cases.append(BenchCase(f"{mask} N=M={n}", mask, spec, 1, n, n))
    return cases


def passes_suite(device) -> list[BenchCase]:
    """The [passes] issue's benchmark: streaming memory against naive eager attention, time against SDPA."""
    causal = AttentionSpec(num_heads=8, head_dim=64, causal=True)
    dense = AttentionSpec(num_heads=8, head_dim=64)
    against_naive = ("attncc-pytorch", "naive")
    return [
        BenchCase("causal N=M=8192", "causal", causal, 1, 8192, 8192, implementations=against_naive),
        BenchCase("causal N=M=16384", "causal", causal, 1, 16384, 16384, implementations=against_naive),
        BenchCase("dense N=M=8192", "dense", dense, 1, 8192, 8192, implementations=("attncc-pytorch", "sdpa")),
    ]


def sparsity_suite(device) -> list[BenchCase]:
    """The [sparsity] issue's benchmark: B=1, H=8, N=M=8192, D=64, fp32.

    Causal sliding window 256 against SDPA with a dense boolean mask and against
    torch.compile(flex_attention); dense causal against SDPA(is_causal=True); 8 packed
    documents of random lengths (causal within each) against SDPA with the dense mask.
    """
    n = 8192
    window = AttentionSpec(num_heads=8, head_dim=64, causal=True, window=(256, 0))
    causal = AttentionSpec(num_heads=8, head_dim=64, causal=True)
    documents = AttentionSpec(num_heads=8, head_dim=64,
                              mask_mod=document_causal_mask(document_ids(n, 8, seed=n, device=device)))  # fmt: skip
    return [
        BenchCase(f"sliding window 256 N=M={n}", "sliding window 256", window, 1, n, n,
                  implementations=("attncc-pytorch", "sdpa", "flex-compiled")),  # fmt: skip
        BenchCase(f"causal N=M={n}", "causal", causal, 1, n, n, implementations=("attncc-pytorch", "sdpa")),
        BenchCase(f"document (8 docs) N=M={n}", "document (8 docs)", documents, 1, n, n,
                  implementations=("attncc-pytorch", "sdpa")),  # fmt: skip
    ]


GPU_IMPLEMENTATIONS = ("attncc-triton", "attncc-cuda", "flex-compiled", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn")


def gpu_suite(device) -> list[BenchCase]:
    """Training shapes on a GPU: B=4, H=32, bf16, N=M in {4096, 8192, 16384}, D in {64, 128}, forward and
    forward + backward, for dense, causal, sliding window 1024, GQA 32/8 causal, 8 packed documents, ALiBi
    (causal) and softcap 50 (causal); attncc's Triton kernels against compiled FlexAttention and SDPA's
    backends. Narrow it with ``--case``, ``--head-dim`` and ``--seq``."""
    cases = []
    for head_dim in (64, 128):
        for n in (4096, 8192, 16384):
            masks = {
                "dense": {},
                "causal": {"causal": True},
                "sliding window 1024": {"causal": True, "window": (1024, 0)},
                "gqa 32/8 causal": {"causal": True, "num_kv_heads": 8},
                "document (8 docs)": {"mask_mod": document_causal_mask(document_ids(n, 8, seed=n, device=device))},
                "alibi causal": {"causal": True, "alibi": True},
                "softcap 50 causal": {"causal": True, "softcap": 50.0},
            }
            for mask, fields in masks.items():
                spec = AttentionSpec(num_heads=32, head_dim=head_dim, **fields)
                cases.append(BenchCase(f"{mask} D={head_dim} N=M={n}", mask, spec, 4, n, n, torch.bfloat16,
                                       GPU_IMPLEMENTATIONS, backward=True))  # fmt: skip
    return cases


def short_suite(device) -> list[BenchCase]:
    """Prefill at every length from 128 to 16384 (B=1, fp32), dense and causal, H=8 with D=64 and H=32 / Hkv=8
    with D=128: attncc's pytorch backend against SDPA; at H=8, D=64 also a causal sliding window of 256 and 8
    packed documents against naive eager attention (up to N=8192: its N x M scores are 2 GiB there).
    Narrow it with ``--seq``, ``--case`` and ``--head-dim``."""
    cases = []
    lengths = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    for heads, kv_heads, head_dim in ((8, 8, 64), (32, 8, 128)):
        for n in lengths:
            for mask, fields in (("dense", {}), ("causal", {"causal": True})):
                spec = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, **fields)
                cases.append(BenchCase(f"{mask} H={heads}/{kv_heads} D={head_dim} N=M={n}", mask, spec, 1, n, n,
                                       implementations=("attncc-pytorch", "sdpa")))  # fmt: skip
    for n in lengths[:-1]:
        sparse = {
            "sliding window 256": {"causal": True, "window": (256, 0)},
            "document (8 docs)": {"mask_mod": document_causal_mask(document_ids(n, 8, seed=n, device=device))},
        }
        for mask, fields in sparse.items():
            spec = AttentionSpec(num_heads=8, head_dim=64, **fields)
            cases.append(BenchCase(f"{mask} H=8/8 D=64 N=M={n}", mask, spec, 1, n, n,
                                   implementations=("attncc-pytorch", "naive")))  # fmt: skip
    return cases


def linear_suite(device) -> list[BenchCase]:
    """The [linear] issue's benchmark: causal elu+1 linear attention, B=1, H=8, D=64, fp32, N=M from 1K to 256K.

    attncc's linear program at every length (32K and 256K: eight times the length, for the
    growth of time); softmax attention of the same shapes (SDPA up to 8K, attncc's pytorch
    backend up to 4K), for the crossover; the quadratic eager linear attention up to 4K.
    """
    spec = AttentionSpec(num_heads=8, head_dim=64, causal=True, kind="linear", feature_map="elu+1")
    cases = []
    for n in (1024, 4096, 8192, 32768, 262144):
        names = ["attncc-pytorch"]
        if n <= 8192:
            names.append("sdpa-softmax")
        if n <= 4096:
            names += ["attncc-pytorch-softmax", "naive-linear"]
        cases.append(BenchCase(f"linear N=M={n}", "causal elu+1", spec, 1, n, n, implementations=tuple(names)))
    return cases


DECODE_IMPLEMENTATIONS = {
    "cpu": ("attncc-pytorch", "attncc-pytorch-paged", "sdpa", "naive", "flex-compiled"),
    "cuda": ("attncc-triton", "attncc-triton-paged", "attncc-pytorch", "sdpa", "naive", "flex-compiled"),
}


def decode_suite(device) -> list[BenchCase]:
    """The [decode] issue's benchmark: one decoding step (N=1) of a Llama-3-8B-shaped layer (H=32, Hkv=8,
    D=128) against M in {1K, 16K, 128K} cached keys, B in {1, 8, 64}; fp32 on a CPU, bf16 on a GPU.
    attncc's decoding path (pytorch on a CPU; Triton and pytorch on a GPU) on a contiguous and a paged cache
    (pages of 16), SDPA, naive eager attention and compiled FlexAttention, with the K/V bytes read per second
    against the machine's memory bandwidth (a GPU: a copy kernel's). Cases are labelled ``B=<batch>``
    (``--case B=8``); ``--seq 1 --kv-seq 16384`` picks a length."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    implementations = DECODE_IMPLEMENTATIONS[kind]
    spec = AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128)  # N=1 sees every key: causal or not
    return [
        BenchCase(f"decode B={batch} M={m}", f"B={batch}", spec, batch, 1, m, dtype, implementations, bandwidth=True)
        for batch in (1, 8, 64)
        for m in (1024, 16384, 131072)
    ]


# Named suites: name -> function(device) -> cases. A new suite is one line here; workers
# rebuild a suite's cases by name, so a suite function must return the same cases every
# time it is called.
SUITES: dict[str, Callable[[torch.device], list[BenchCase]]] = {
    "cpu": cpu_suite,
    "passes": passes_suite,
    "sparsity": sparsity_suite,
    "gpu": gpu_suite,
    "decode": decode_suite,
    "linear": linear_suite,
    "short": short_suite,
}


@dataclass(frozen=True)
class CaseSource:
    """Where cases come from, so that a worker process can rebuild them: a suite, or a spec file at sizes.

    A spec file is timed at ``lengths``; a suite's cases are narrowed to the given ``lengths``,
    ``masks`` (case labels) and ``head_dims`` when those are not empty. ``backward`` also
    times forward + backward for every case.
    """

    suite: str | None = None
    spec_path: str | None = None
    batch: int = 1
    lengths: tuple[tuple[int, int], ...] = ()
    dtype: str = "float32"
    masks: tuple[str, ...] = ()
    head_dims: tuple[int, ...] = ()
    backward: bool = False

    def cases(self, device) -> list[BenchCase]:
        device = torch.device(device)
        if self.suite is not None:
            if self.suite not in SUITES:
                raise AttnccError(f"suite={self.suite!r} is unknown; known suites: {', '.join(SUITES)}")
            cases = SUITES[self.suite](device)
            labels = list(dict.fromkeys(case.mask for case in cases))
            for mask in self.masks:
                if mask not in labels:
                    raise AttnccError(f"case {mask!r} is not in suite {self.suite!r}; its cases: {', '.join(labels)}")
            cases = [
                case
                for case in cases
                if (not self.masks or case.mask in self.masks)
                and (not self.head_dims or case.spec.head_dim in self.head_dims)
                and (not self.lengths or (case.n, case.m) in self.lengths)
            ]
            if not cases:
                raise AttnccError(f"no case of suite {self.suite!r} has the lengths {list(self.lengths)}, head dims "
                                  f"{list(self.head_dims)} and masks {list(self.masks)} asked for")  # fmt: skip
        else:
            spec = attncc.load_spec(self.spec_path)
            label = describe_mask(spec)
            cases = [
                BenchCase(f"{Path(self.spec_path).stem} N={n} M={m}", label, spec, self.batch, n, m, DTYPES[self.dtype])
                for n, m in self.lengths
            ]
        return [replace(case, backward=True) for case in cases] if self.backward else cases
