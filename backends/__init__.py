"""Backends that lower the IR to source code: one module per target.

A backend module defines ``name``, ``devices`` (the tensor device types it runs on)
and ``generate(graph) -> GeneratedSource``. A backend whose dependencies are missing
raises ``BackendError`` when imported (``triton`` without the triton package).
"""

from __future__ import annotations

import importlib

from attncc.errors import BackendError

# In order of preference for backend=None on a device that several support.
BACKENDS = {
    "pytorch": "attncc.backends.pytorch",
    "triton": "attncc.backends.triton",
    "cuda": "attncc.backends.cuda",
}
# The modules that compile linear attention's linear_attention region, per backend.
LINEAR_BACKENDS = {"pytorch": "attncc.backends.pytorch_linear", "triton": "attncc.backends.triton_linear"}
# Devices that prefer another order: generated Triton kernels on GPUs.
PREFERENCES = {"cuda": ("triton", "pytorch")}


def get_backend(name: str):
    if not isinstance(name, str) or name not in BACKENDS:
        raise BackendError(f"backend={name!r} is unknown; available backends: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def get_linear_backend(name: str):
    """The module generating linear attention for backend ``name``."""
    get_backend(name)  # a clear error for unknown names and missing dependencies
    if name not in LINEAR_BACKENDS:
        raise BackendError(
            f"backend={name!r} does not compile linear attention; backends that do: {', '.join(LINEAR_BACKENDS)}"
        )
    return importlib.import_module(LINEAR_BACKENDS[name])


def backend_for_device(device_type: str) -> str:
    """The preferred backend whose generated code runs on this device type and whose dependencies are installed."""
    for name in PREFERENCES.get(device_type, BACKENDS):
        try:
            backend = get_backend(name)
        except BackendError:
            continue
        if device_type in backend.devices:
            return name
    raise BackendError(f"no backend runs on device {device_type!r}; available backends: {', '.join(BACKENDS)}")
