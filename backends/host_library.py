"""Generated C++ built by the host compiler into a shared library, cached on disk, called through ctypes.

The cuda backend's host emulation and the pytorch backend's CPU decoding kernel both build
this way: the library's file name is a digest of the source, the compiler and its flags,
so an edit to any of them builds a new one, and a library is written atomically, so
processes that build the same source at once never load half a file.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
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
    ``key`` are the same) and loaded; where the cache directory cannot be written, into a temporary folder of
    this process. ``what`` names the source in errors."""
    compiler = find_host_compiler()
    if compiler is None:
        raise BackendError(f"building {what} needs a C++ compiler (g++, c++ or $CXX); none is installed")
    name = f"{folder}-{digest(source, compiler, *flags, *key)}.so"
    path = cache_dir() / folder / name
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, _compile(compiler, source, flags, what, path.parent))
        except OSError:  # an unusable cache directory (attncc.cache warns about it): a folder of this process
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # if this call made it and left it empty
            path = _private_folder() / name
            if not path.exists():
                path.write_bytes(_compile(compiler, source, flags, what, path.parent))
    return ctypes.CDLL(str(path))


def _compile(compiler: str, source: str, flags: tuple[str, ...], what: str, folder: Path) -> bytes:
    with tempfile.TemporaryDirectory(dir=folder) as build:
        source_file, output = Path(build) / "source.cpp", Path(build) / "library.so"
        source_file.write_text(source, encoding="utf-8")
        command = [compiler, *flags, "-x", "c++", str(source_file), "-o", str(output)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BackendError(f"the host compiler ({compiler}) rejected {what}:\n{result.stderr[-4000:]}")
        return output.read_bytes()


@functools.cache
def _private_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="attncc-libraries-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
