"""Generated C++ built by the host compiler into a shared library, cached on disk, called through ctypes.

The cuda backend's host emulation and the pytorch backend's CPU decoding kernel both build
this way: the library's file name is a digest of the source, the compiler and its flags,
so an edit to any of them builds a new one, and a library is written atomically, so
processes that build the same source at once never load half a file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from attncc.cache import cache_dir
from attncc.errors import BackendError


def digest(*parts: str | bytes) -> str:
    """A short hex digest of the parts (each separated, so ("ab", "c") and ("a", "bc") differ)."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode() if isinstance(part, str) else part)
        hasher.update(b"\0")
    return hasher.hexdigest()[:24]


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def find_host_compiler() -> str | None:
    """$CXX, else g++, else c++: the first that is installed, or None."""
    for candidate in (os.environ.get("CXX"), "g++", "c++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def build_library(source: str, flags: tuple[str, ...], folder: str, what: str, *key: str | bytes) -> ctypes.CDLL:
    """``source`` compiled with ``flags`` into ``<cache>/<folder>/`` (reused while the source, compiler, flags and
    ``key`` are the same) and loaded. ``what`` names the source in errors."""
    compiler = find_host_compiler()
    if compiler is None:
        raise BackendError(f"building {what} needs a C++ compiler (g++, c++ or $CXX); none is installed")
    path = cache_dir() / folder / f"{folder}-{digest(source, compiler, *flags, *key)}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as build:
            source_file, output = Path(build) / "source.cpp", Path(build) / "library.so"
            source_file.write_text(source, encoding="utf-8")
            command = [compiler, *flags, "-x", "c++", str(source_file), "-o", str(output)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise BackendError(f"the host compiler ({compiler}) rejected {what}:\n{result.stderr[-4000:]}")
            write_atomically(path, output.read_bytes())
    return ctypes.CDLL(str(path))
