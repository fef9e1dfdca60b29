"""Backends that lower the IR to source code: one module per target.

A backend module defines ``name``, ``devices`` (the tensor device types it runs on)
and ``generate(graph) -> GeneratedSource``.
"""

from __future__ import annotations

import importlib

from attncc.errors import BackendError

# In order of preference for backend=None on a device that several support.
BACKENDS = {"pytorch": "attncc.backends.pytorch"}


def get_backend(name: str):
    if not isinstance(name, str) or name not in BACKENDS:
        raise BackendError(f"backend={name!r} is unknown; available backends: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def backend_for_device(device_type: str) -> str:
    """The preferred backend whose generated code runs on this device type."""
    for name in BACKENDS:
        if device_type in get_backend(name).devices:
            return name
    raise BackendError(f"no backend runs on device {device_type!r}; available backends: {', '.join(BACKENDS)}")
