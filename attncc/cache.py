"""The on-disk cache of generated source: one verified file per content hash, written atomically.

Trust model (docs/robustness.md): the cache directory is created with mode 0700. An
entry ends with a record line naming the key it was generated for and the SHA-256 of
everything above it; it is imported only if the record matches, and only from a
directory and a file that belong to this user and that neither group nor others can
write (as ssh treats key files). The verified text itself is what runs, never a second
read of the file. A corrupt entry is reported once and regenerated; an untrusted one is
never read: the program is generated and compiled in memory. A directory that cannot be
created or written (read-only, a path that is a file, a full disk) gives one warning and
in-memory compiles.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import os
import stat
import sys
import tempfile
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch

import attncc

RECORD_PREFIX = "# attncc cache entry: "
MAX_ENTRY_BYTES = 64 * 1024 * 1024  # far above any generated file; a larger one is not read


class CacheWarning(UserWarning):
    """The cache directory or an entry in it cannot be used; attncc compiled in memory or regenerated."""


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


@dataclass(frozen=True)
class Generated:
    """A generated Python module: its source text and, when it is a cache entry, the entry's path."""

    key: str
    module: types.ModuleType
    source: str
    path: Path | None


_loaded: dict[str, Generated] = {}
_warned: set[str] = set()


def load_generated(key: str, generate: Callable[[], str]) -> Generated:
    """The module for ``key``: from its cache entry if that verifies, else from ``generate()``.

    A fresh text is stored when the cache directory is usable; otherwise (and for an
    entry this process must not trust) the module is compiled in memory, with a
    ``CacheWarning`` once per directory or entry. Imported once per process.
    """
    if key in _loaded:
        return _loaded[key]
    directory = cache_dir()
    path = directory / f"{key}.py"
    source, stored = None, False
    trouble = _directory_trouble(directory)
    if trouble is None:
        source, trouble, corrupt = _read_entry(path, key)
        if corrupt:  # reported, then regenerated and stored like a missing entry
            _warn_once(*trouble)
            trouble = None
        stored = source is not None
    if source is None:
        source = generate()
        if trouble is None:
            trouble = _write_entry(directory, path, key, source)
            stored = trouble is None
    if trouble is not None:
        _warn_once(*trouble)
    generated = Generated(key, _import(key, source, path if stored else None), source, path if stored else None)
    _loaded[key] = generated
    return generated


def _record(key: str, body: bytes) -> bytes:
    return f"{RECORD_PREFIX}key={key} sha256={hashlib.sha256(body).hexdigest()}\n".encode()


def _owner_trouble(what: str, path: Path, st: os.stat_result) -> str | None:
    """Why ``path`` (a directory or an entry) could have been written by another user, or None."""
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    if os.name == "posix" and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):#o})"
    return None


def _directory_trouble(directory: Path) -> tuple[str, str] | None:
    """(dedup key, message) if entries must not be read from or written to ``directory``."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.stat()
    except OSError as error:
        reason = "it is a file" if isinstance(error, FileExistsError) else error.strerror or str(error)
        return str(directory), (
            f"cannot use the attncc cache directory {directory} ({reason}); compiling in memory. "
            "Set ATTNCC_CACHE_DIR to a writable directory of your own"
        )
    why = _owner_trouble("the attncc cache directory", directory, st)
    if why is not None:
        return str(directory), (
            f"{why}: its entries are not imported, programs are compiled in memory. Run `chmod go-w {directory}` "
            "if it is yours, or set ATTNCC_CACHE_DIR to a directory of your own"
        )
    return None


def _read_entry(path: Path, key: str) -> tuple[str | None, tuple[str, str] | None, bool]:
    """The verified text of the entry (None if absent, untrusted or corrupt), the trouble to report,
    and whether the entry is corrupt (to be replaced) rather than untrusted (to be left alone)."""

    def untrusted(why: str):
        advice = "not imported, compiled in memory. Remove it, or set ATTNCC_CACHE_DIR to a directory of your own"
        return None, (str(path), f"{why}: {advice}"), False

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None, None, False
    except OSError as error:  # a symbolic link (O_NOFOLLOW), a directory, no permission
        return untrusted(f"cannot read the attncc cache entry {path} ({error.strerror or error})")
    with os.fdopen(fd, "rb") as handle:
        why = _owner_trouble("the attncc cache entry", path, os.fstat(handle.fileno()))
        if why is not None:
            return untrusted(why)
        data = handle.read(MAX_ENTRY_BYTES + 1)
    head, newline, record = data[:-1].rpartition(b"\n")
    body = head + newline
    if not data.endswith(b"\n") or not record.startswith(RECORD_PREFIX.encode()):
        problem = "it has no record line (truncated, empty or not written by attncc)"
    elif record + b"\n" != _record(key, body):
        problem = "its record does not match its content and key (changed after it was written)"
    else:
        return body.decode("utf-8"), None, False
    return None, (str(path), f"the attncc cache entry {path} is corrupt: {problem}; regenerating it"), True


def _write_entry(directory: Path, path: Path, key: str, source: str) -> tuple[str, str] | None:
    """Store ``source`` with its record, atomically; the trouble to report if the directory refuses."""
    body = source.encode("utf-8")
    if not body.endswith(b"\n"):
        body += b"\n"
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
    except OSError as error:
        return str(directory), _write_failure(directory, error)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(body + _record(key, body))
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        return str(directory), _write_failure(directory, error)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return None


def _write_failure(directory: Path, error: OSError) -> str:
    return (
        f"cannot write to the attncc cache directory {directory} ({error.strerror or error}); compiling in memory. "
        "Set ATTNCC_CACHE_DIR to a writable directory with free space"
    )


def _warn_once(dedup: str, message: str) -> None:
    if dedup not in _warned:
        _warned.add(dedup)
        warnings.warn(message, CacheWarning, stacklevel=4)


def _import(key: str, source: str, path: Path | None) -> types.ModuleType:
    """Run the verified text as a module. linecache holds that text, so tracebacks and
    ``inspect.getsource`` (Triton's JIT) see what ran, whatever the file holds later."""
    name = f"attncc_generated_{key}"
    filename = str(path) if path is not None else f"<attncc generated {key}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)  # noqa: S102 - attncc's own generated, verified code
    return module
