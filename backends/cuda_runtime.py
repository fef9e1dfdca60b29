"""Runs generated CUDA sources from torch: NVRTC on CUDA tensors, the host emulation on CPU tensors.

CUDA tensors: the source is compiled once per GPU architecture by NVRTC (through torch's
``torch.cuda._utils`` bindings, so the GPU machine needs neither ``nvcc`` nor ``ninja``), the
cubin cached on disk by (source, architecture, options), and each kernel launched on the
current stream. CPU tensors: the same source is compiled by the host C++ compiler with
``-DATTNCC_EMULATION`` against ``include/attncc_emulation.h`` into a shared library, cached
likewise, and its C ABI functions are called through ctypes (see ``docs/cuda.md``).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from attncc.backends.host_library import build_library, digest, find_host_compiler, write_atomically
from attncc.cache import cache_dir
from attncc.errors import BackendError

INCLUDE_DIR = Path(__file__).parent / "include"
EMULATION_HEADER = INCLUDE_DIR / "attncc_emulation.h"
EMULATION_FLAGS = ("-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC", "-DATTNCC_EMULATION")
NVRTC_OPTIONS = ("-std=c++17",)
DTYPE_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
DTYPE_CODE = {"f16": 0, "bf16": 1, "f32": 2}
KERNEL_NAMES = ("forward", "backward_delta", "backward_dkdv", "backward_dq")


def host_compiler() -> str:
    """$CXX, else g++, else c++; BackendError when none is installed."""
    compiler = find_host_compiler()
    if compiler is None:
        raise BackendError(
            "CPU tensors run the cuda backend's kernels in its host emulation, which needs a C++20 compiler "
            "(g++ or $CXX); install one, use CUDA tensors, or use backend='pytorch'"
        )
    return compiler


@functools.cache
def emulation_library(source: str) -> ctypes.CDLL:
    """The source compiled for the host emulation (cached on disk by source, header, compiler and flags)."""
    host_compiler()  # the emulation's own message when no compiler is installed
    header = EMULATION_HEADER.read_text(encoding="utf-8")
    flags = (*EMULATION_FLAGS, "-I", str(INCLUDE_DIR))
    library = build_library(source, flags, "cuda", "the generated CUDA source", header)
    for function in (library.attncc_attention_forward, library.attncc_attention_backward):
        function.restype = ctypes.c_int
    return library


@functools.cache
def nvrtc_kernels(source: str, device_index: int) -> dict:
    """The source's kernels compiled by NVRTC for a device's architecture (the cubin cached on disk)."""
    try:
        from torch.cuda._utils import _cuda_load_module, _nvrtc_compile
    except ImportError:
        raise BackendError(
            f"the cuda backend compiles with NVRTC through torch.cuda._utils, which torch {torch.__version__} lacks"
        ) from None
    properties = torch.cuda.get_device_properties(device_index)
    architecture = f"{properties.major}{properties.minor}"
    if properties.major < 8:
        raise BackendError(
            f"the cuda backend's kernels need sm_80 or later (mma.sync, cp.async); this GPU is sm_{architecture}"
        )
    path = cache_dir() / "cuda" / f"nvrtc-{digest(source, architecture, torch.__version__, *NVRTC_OPTIONS)}.cubin"
    if not path.exists():
        with torch.cuda.device(device_index):
            try:
                binary, _ = _nvrtc_compile(source, "attncc_forward_f16", architecture, None, list(NVRTC_OPTIONS))
            except RuntimeError as error:
                raise BackendError(f"NVRTC rejected the generated CUDA source: {error}") from error
        write_atomically(path, binary)
    names = [f"attncc_{kernel}_{suffix}" for kernel in KERNEL_NAMES for suffix in DTYPE_CODE]
    with torch.cuda.device(device_index):
        return _cuda_load_module(path.read_bytes(), names)


def _strides(tensor: torch.Tensor):
    return (ctypes.c_int64 * tensor.dim())(*tensor.stride())


def _int_strides(tensor: torch.Tensor) -> list[int]:
    strides = list(tensor.stride())
    if any(abs(s) >= 2**31 for s in strides):
        raise BackendError(f"a tensor of shape {tuple(tensor.shape)} has strides {strides} beyond the kernels' int")
    return strides


def _check(status: int, what: str) -> None:
    if status != 0:
        raise BackendError(f"the generated {what} failed with CUDA error {status}")


class CudaProgram:
    """One generated source with its launch constants; ``forward`` and ``backward`` on CUDA or CPU tensors."""

    def __init__(self, source: str, *, groups: int, block_m: int, block_n: int, num_warps: int,
                 shared_bytes: dict, captured_ranks: tuple[int, ...]):  # fmt: skip
        self.source = source
        self.groups = groups
        self.block_m = block_m
        self.block_n = block_n
        self.threads = 32 * num_warps
        self.shared_bytes = shared_bytes
        self.captured_ranks = captured_ranks

    def _check_inputs(self, q, k, v, captured) -> str:
        if q.dtype not in DTYPE_SUFFIX:
            raise BackendError(f"the cuda backend runs float16, bfloat16 and float32, not {q.dtype}")
        if q.device.type not in ("cuda", "cpu"):
            raise BackendError(f"the cuda backend runs on cuda tensors (and cpu, emulated), not {q.device.type}")
        if len(captured) != len(self.captured_ranks):
            raise BackendError(f"this program takes {len(self.captured_ranks)} captured tensors, got {len(captured)}")
        return DTYPE_SUFFIX[q.dtype]

    # -- forward
    def forward(self, q, k, v, captured):
        suffix = self._check_inputs(q, k, v, captured)
        batch, heads, n, _ = q.shape
        m = k.shape[2]
        o = torch.empty(batch, heads, n, v.shape[3], dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, heads, n, dtype=torch.float32, device=q.device)
        if q.device.type == "cuda":
            kernels = nvrtc_kernels(self.source, q.device.index or 0)
            captured_args = self._captured_kernel_args(captured)
            self._launch(kernels[f"attncc_forward_{suffix}"], (-(-n // self.block_m), batch * heads),
                         self.shared_bytes["forward"][suffix],
                         [q, k, v, o, lse, *captured_args, heads, n, m, *_int_strides(q), *_int_strides(k),
                          *_int_strides(v), *_int_strides(o)])  # fmt: skip
        else:
            status = emulation_library(self.source).attncc_attention_forward(
                DTYPE_CODE[suffix], *self._pointer_and_strides(q), *self._pointer_and_strides(k),
                *self._pointer_and_strides(v), *self._pointer_and_strides(o), ctypes.c_void_p(lse.data_ptr()),
                batch, heads, n, m, *self._captured_abi_args(captured), None,
            )  # fmt: skip
            _check(status, "forward")
        return o, lse

    # -- backward
    def backward(self, q, k, v, o, lse, do, dlse, captured):
        suffix = self._check_inputs(q, k, v, captured)
        batch, heads, n, _ = q.shape
        m = k.shape[2]
        do = do.to(q.dtype)
        dlse = torch.zeros_like(lse) if dlse is None else dlse.float().contiguous()
        delta = torch.empty_like(lse)
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        if q.device.type == "cuda":
            kernels = nvrtc_kernels(self.source, q.device.index or 0)
            captured_args = self._captured_kernel_args(captured)
            strides = {name: _int_strides(t) for name, t in (("q", q), ("k", k), ("v", v), ("o", o), ("do", do),
                                                               ("dq", dq), ("dk", dk), ("dv", dv))}  # fmt: skip
            self._launch(kernels[f"attncc_backward_delta_{suffix}"], (-(-n // self.threads), batch * heads), 0,
                         [o, do, dlse, delta, heads, n, *strides["o"], *strides["do"]])  # fmt: skip
            self._launch(kernels[f"attncc_backward_dkdv_{suffix}"], (-(-m // self.block_m), batch * k.shape[1]),
                         self.shared_bytes["dkdv"][suffix],
                         [q, k, v, do, lse, delta, dk, dv, *captured_args, heads, n, m,
                          *(s for name in ("q", "k", "v", "do", "dk", "dv") for s in strides[name])])  # fmt: skip
            self._launch(kernels[f"attncc_backward_dq_{suffix}"], (-(-n // self.block_m), batch * heads),
                         self.shared_bytes["dq"][suffix],
                         [q, k, v, do, lse, delta, dq, *captured_args, heads, n, m,
                          *(s for name in ("q", "k", "v", "do", "dq") for s in strides[name])])  # fmt: skip
        else:
            pointer = ctypes.c_void_p
            status = emulation_library(self.source).attncc_attention_backward(
                DTYPE_CODE[suffix], *self._pointer_and_strides(q), *self._pointer_and_strides(k),
                *self._pointer_and_strides(v), *self._pointer_and_strides(o), pointer(lse.data_ptr()),
                *self._pointer_and_strides(do), pointer(dlse.data_ptr()), *self._pointer_and_strides(dq),
                *self._pointer_and_strides(dk), *self._pointer_and_strides(dv), pointer(delta.data_ptr()),
                batch, heads, n, m, *self._captured_abi_args(captured), None,
            )  # fmt: skip
            _check(status, "backward")
        return dq, dk, dv

    # -- arguments
    def _launch(self, kernel, grid: tuple[int, int], shared: int, args: list) -> None:
        if grid[0] == 0 or grid[1] == 0:
            return
        if shared >= 48 * 1024:
            kernel.set_shared_memory_config(shared)
        kernel(grid=(grid[0], grid[1], 1), block=(self.threads, 1, 1), args=args, shared_mem=shared,
               stream=torch.cuda.current_stream())  # fmt: skip

    @staticmethod
    def _captured_kernel_args(captured) -> list:
        args = []
        for tensor in captured:
            args += [tensor, *_int_strides(tensor)]
        return args

    @staticmethod
    def _pointer_and_strides(tensor: torch.Tensor) -> tuple:
        return ctypes.c_void_p(tensor.data_ptr()), _strides(tensor)

    def _captured_abi_args(self, captured) -> list:
        args = []
        for tensor in captured:
            args += list(self._pointer_and_strides(tensor))
        return args
