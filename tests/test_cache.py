"""The on-disk cache of generated source: reuse, verification before import, and the trust model."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import attncc
from attncc import cache
from attncc.cache import CacheWarning
from attncc.cli import main
from tests.reference import assert_attention_matches, dense_attention

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPEC = attncc.AttentionSpec(num_heads=2, head_dim=8)  # quick to compile: no mask to analyse


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty cache directory, and a process that has imported nothing from it yet."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(directory))
    monkeypatch.setattr(cache, "_loaded", {})
    monkeypatch.setattr(cache, "_warned", set())
    return directory


def compile_checked(spec=SPEC):
    """Compile, run against the dense reference, and return the module and the CacheWarnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attn = attncc.compile(spec)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=generator) for n in (5, 7, 7))
    o, lse = attn(q, k, v, return_lse=True)
    assert_attention_matches(o, lse, *dense_attention(q, k, v, scale=spec.scale), torch.float32)
    return attn, [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]


def forget_imports(monkeypatch):
    """As a new process would: nothing imported yet, nothing warned yet."""
    monkeypatch.setattr(cache, "_loaded", {})
    monkeypatch.setattr(cache, "_warned", set())


def test_compile_writes_once_and_reuses(cache_dir, monkeypatch):
    first, warned = compile_checked()
    assert first.path.parent == cache_dir and first.path.suffix == ".py" and not warned
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    stamp = os.stat(first.path).st_mtime_ns
    forget_imports(monkeypatch)
    second, warned = compile_checked()
    assert second.path == first.path and os.stat(first.path).st_mtime_ns == stamp and not warned
    assert first.source == second.source
    different = attncc.compile(SPEC.replace(scale=0.25))
    assert different.path != first.path
    # besides the two programs, the folder of the CPU decoding kernel that these decode-shaped calls built
    assert sorted(p.name for p in cache_dir.iterdir() if p.name != "cpu-decode") == sorted(
        [first.path.name, different.path.name]
    )


def test_an_entry_records_its_key_and_checksum(cache_dir):
    attn, _ = compile_checked()
    text = attn.path.read_text(encoding="utf-8")
    body, record = text[: -len(text.splitlines()[-1]) - 1], text.splitlines()[-1]
    assert body == attn.source
    digest = hashlib.sha256(body.encode()).hexdigest()
    assert record == f"{cache.RECORD_PREFIX}key={attn.path.stem} sha256={digest}"


TAMPERED = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.mark.parametrize(
    "damage",
    ["empty", "truncated", "garbage", "appended code", "record of another key", "tampered, record kept"],
)
def test_a_corrupt_entry_is_reported_once_and_regenerated(cache_dir, monkeypatch, tmp_path, damage):
    attn, _ = compile_checked()
    path, good = attn.path, attn.path.read_bytes()
    marker = tmp_path / "marker"
    code = TAMPERED.format(marker=str(marker)).encode()
    record = good.splitlines(keepends=True)[-1]
    other = attncc.compile(SPEC.replace(scale=0.5)).path.read_bytes()
    path.write_bytes({
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "garbage": os.urandom(300),
        "appended code": good + code,
        "record of another key": other,
        "tampered, record kept": code + record,
    }[damage])  # fmt: skip
    forget_imports(monkeypatch)
    again, warned = compile_checked()
    assert warned == [f"the attncc cache entry {path} is corrupt: " + warned[0].split(": ", 1)[1]]
    assert "regenerating it" in warned[0]
    assert not marker.exists()  # the tampered code never ran
    assert again.path == path and path.read_bytes() == good  # regenerated in place
    forget_imports(monkeypatch)
    assert compile_checked()[1] == []  # reported once: the entry is whole again


def test_the_cache_directory_is_private(cache_dir):
    nested = cache_dir / "a" / "b"
    os.environ["ATTNCC_CACHE_DIR"] = str(nested)
    attn, _ = compile_checked()
    assert attn.path.parent == nested and stat.S_IMODE(nested.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_directory_others_can_write_is_never_imported_from(cache_dir, monkeypatch, tmp_path, mode):
    attn, _ = compile_checked()
    path, good = attn.path, attn.path.read_bytes()
    marker = tmp_path / "marker"
    body = TAMPERED.format(marker=str(marker)).encode()
    path.write_bytes(body + cache._record(path.stem, body))  # a well-formed entry someone else wrote
    cache_dir.chmod(mode)
    forget_imports(monkeypatch)
    again, warned = compile_checked()
    assert not marker.exists() and again.path is None and again.source == good.decode().rsplit("# attncc", 1)[0]
    assert warned == [
        f"the attncc cache directory {cache_dir} is writable by group or others (mode {mode:#o}): its entries are "
        f"not imported, programs are compiled in memory. Run `chmod go-w {cache_dir}` if it is yours, or set "
        "ATTNCC_CACHE_DIR to a directory of your own"
    ]
    assert "(compiled in memory, not cached)" in again.explain()


def test_an_entry_others_can_write_is_never_imported(cache_dir, monkeypatch, tmp_path):
    attn, _ = compile_checked()
    path = attn.path
    marker = tmp_path / "marker"
    body = TAMPERED.format(marker=str(marker)).encode()
    path.write_bytes(body + cache._record(path.stem, body))
    path.chmod(0o666)
    forget_imports(monkeypatch)
    again, warned = compile_checked()
    assert not marker.exists() and again.path is None
    assert warned == [
        f"the attncc cache entry {path} is writable by group or others (mode 0o666): not imported, compiled in "
        "memory. Remove it, or set ATTNCC_CACHE_DIR to a directory of your own"
    ]


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to give a file away")
def test_an_entry_or_directory_of_another_user_is_never_imported(cache_dir, monkeypatch):
    attn, _ = compile_checked()
    os.chown(attn.path, 4321, -1)
    forget_imports(monkeypatch)
    again, warned = compile_checked()
    assert again.path is None and warned[0].startswith(
        f"the attncc cache entry {attn.path} belongs to uid 4321, not to this user (uid 0)"
    )
    os.chown(cache_dir, 4321, -1)
    forget_imports(monkeypatch)
    again, warned = compile_checked()
    assert again.path is None and warned[0].startswith(f"the attncc cache directory {cache_dir} belongs to uid 4321")


def test_a_cache_path_that_is_a_file_compiles_in_memory_with_one_warning(cache_dir, tmp_path):
    a_file = tmp_path / "not-a-directory"
    a_file.write_text("")
    os.environ["ATTNCC_CACHE_DIR"] = str(a_file / "attncc")
    attn, warned = compile_checked()
    assert attn.path is None
    assert warned == [
        f"cannot use the attncc cache directory {a_file / 'attncc'} (Not a directory); compiling in memory. "
        "Set ATTNCC_CACHE_DIR to a writable directory of your own"
    ]
    assert compile_checked(SPEC.replace(scale=0.125))[1] == []  # one warning per directory


@pytest.mark.parametrize("failure", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_a_directory_that_refuses_writes_compiles_in_memory_with_one_warning(cache_dir, monkeypatch, failure):
    cache_dir.mkdir(mode=0o700)
    real_mkstemp = tempfile.mkstemp

    def refusing_mkstemp(*args, **kwargs):
        if failure == errno.ENOSPC:  # a full disk: the file is created, the write fails
            fd, name = real_mkstemp(*args, **kwargs)
            os.close(fd)
            return os.open("/dev/full", os.O_WRONLY), name
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(cache.tempfile, "mkstemp", refusing_mkstemp)
    attn, warned = compile_checked()
    assert attn.path is None and list(cache_dir.iterdir()) == []
    assert warned == [
        f"cannot write to the attncc cache directory {cache_dir} ({os.strerror(failure)}); compiling in memory. "
        "Set ATTNCC_CACHE_DIR to a writable directory with free space"
    ]
    assert compile_checked(SPEC.replace(scale=0.125))[1] == []


def test_tracebacks_show_the_lines_that_ran(cache_dir):
    attn, _ = compile_checked()
    attn.path.write_text("overwritten after the import\n")
    import inspect

    assert inspect.getsource(attn.module.attention) in attn.source


def test_failed_generation_leaves_no_file(cache_dir):
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.load_generated("abc", broken)
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []


def test_key_depends_on_every_part():
    assert cache.content_key("a", "b") != cache.content_key("ab")
    assert cache.content_key("x", "pytorch") == cache.content_key("x", "pytorch")


def test_the_cli_reports_an_unusable_cache_in_one_line(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(a_file))
    forget_imports(monkeypatch)
    assert main(["compile", str(EXAMPLES / "gpt2.toml")]) == 0
    out, err = capsys.readouterr()
    assert "def attention(" in out
    assert err == (
        f"attncc: warning: cannot use the attncc cache directory {a_file} (it is a file); compiling in memory. "
        "Set ATTNCC_CACHE_DIR to a writable directory of your own\n"
    )
