"""Measurement primitives: timed calls (CUDA synchronised), peak extra memory, the memory guard's limit,
the machine's memory bandwidth."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import statistics
import time
from collections.abc import Callable

import torch

GIB = 2**30
MAX_LIMIT_BYTES = 20 * GIB  # never plan to allocate more than this, whatever the machine has


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def synchronized(fn):
    result = fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result


# Calls shorter than this are timed in batches of about this length: one sub-millisecond call's time is mostly the
# timer's and the scheduler's noise, a batch's mean is not.
BATCH_S = 0.02


def time_calls(run: Callable, warmup: int, repeats: int, budget_s: float,
               batch_s: float = BATCH_S) -> tuple[float, list[float]]:  # fmt: skip
    """Time ``run``: (seconds of the first call, seconds of each timed call).

    After the first call, ``warmup`` untimed calls, then ``repeats`` timed ones; once
    three timed calls took longer than ``budget_s`` together, the rest are skipped. A call
    that took less than ``batch_s`` (the last untimed one, or the first) is timed as the
    mean of a batch of calls lasting about ``batch_s``.
    """
    _, first = timed(lambda: synchronized(run))
    latest = first
    for _ in range(warmup):
        latest = timed(lambda: synchronized(run))[1]
    calls = max(1, math.ceil(batch_s / latest)) if 0 < latest < batch_s else 1

    def batch():
        for _ in range(calls):
            synchronized(run)

    times = []
    while len(times) < repeats:
        times.append(timed(batch)[1] / calls)
        if len(times) >= 3 and sum(times) * calls > budget_s:
            break
    return first, times


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} is not in /proc/self/status")


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: hand freed heap pages back, so reuse shows up


def peak_extra_memory(run: Callable, device) -> tuple[torch.Tensor, int | None]:
    """(output, bytes the call added at its peak over the memory held before it); None if unmeasurable here."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        output = synchronized(run)
        return output, torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return run(), None
    _release_free_memory()
    try:
        before = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # reset VmHWM to the current resident size (Linux >= 4.0)
    except OSError:
        return run(), None
    output = run()
    return output, _proc_status_bytes("VmHWM") - before


def memory_limit_default(device) -> int:
    """Half the memory available now (CPU) or 90% of the free device memory (CUDA), at most 20 GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 8 * GIB
    return min(MAX_LIMIT_BYTES, available // 2)


BANDWIDTH_BUFFER_BYTES = GIB  # far beyond any cache


def memory_bandwidth(device, repeats: int = 5) -> float:
    """Bytes per second the device's memory delivers: on a CPU, reading a 1 GiB buffer (``sum``); on a GPU,
    a copy kernel (``copy_``) between two 1 GiB buffers, counting the bytes read and written."""
    device = torch.device(device)
    source = torch.ones(BANDWIDTH_BUFFER_BYTES // 4, device=device)
    if device.type == "cuda":
        target = torch.empty_like(source)
        run, moved = (lambda: target.copy_(source)), 2 * BANDWIDTH_BUFFER_BYTES
    else:
        run, moved = source.sum, BANDWIDTH_BUFFER_BYTES
    _, times = time_calls(run, 1, repeats, budget_s=60.0)
    return moved / statistics.median(times)
