"""The on-disk cache of generated source: one file per content hash, written atomically."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import sympy
import torch

import attncc


def cache_dir() -> Path:
    """$ATTNCC_CACHE_DIR, else $XDG_CACHE_HOME/attncc, else ~/.cache/attncc."""
    explicit = os.environ.get("ATTNCC_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attncc"


def content_key(*parts: str) -> str:
    """A hash of the parts and of the versions that shape generated code."""
    digest = hashlib.sha256()
    for part in (attncc.__version__, torch.__version__, sympy.__version__, *parts):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


@functools.cache
def generator_fingerprint(backend) -> str:
    """A hash of the backend module's source and of the backend modules it imports from: a changed
    generator never serves stale files."""
    names = {backend.__name__, "attncc.backends.source"}
    names |= {
        getattr(value, "__module__", None) or ""
        for value in vars(backend).values()
        if (getattr(value, "__module__", None) or "").startswith("attncc.backends.")
    }
    digest = hashlib.sha256()
    for name in sorted(names):
        module = sys.modules.get(name)
        if module is not None:
            digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def cached_source(key: str, suffix: str, generate) -> Path:
    """The path of the cached file for ``key``, calling ``generate()`` and writing it if missing.

    The write goes to a temporary file in the same directory and is renamed into
    place, so a concurrent reader sees either nothing or the whole file.
    """
    directory = cache_dir()
    path = directory / f"{key}{suffix}"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    text = generate()
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


_loaded: dict[Path, object] = {}


def load_module(path: Path):
    """Import a generated Python file once per process (real file, so tracebacks show its lines)."""
    path = Path(path)
    module = _loaded.get(path)
    if module is None:
        name = f"attncc_generated_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _loaded[path] = module
    return module
