"""The on-disk cache of generated source."""

from __future__ import annotations

import os

import attncc
from attncc import cache


def test_compile_writes_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    spec = attncc.AttentionSpec(num_heads=2, head_dim=8, causal=True, window=(3, 0))
    first = attncc.compile(spec)
    assert first.path.parent == tmp_path and first.path.suffix == ".py"
    stamp = os.stat(first.path).st_mtime_ns
    second = attncc.compile(spec)
    assert second.path == first.path and os.stat(first.path).st_mtime_ns == stamp
    assert first.source == second.source
    different = attncc.compile(spec.replace(window=(4, 0)))
    assert different.path != first.path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, different.path.name])


def test_failed_generation_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))

    def broken():
        raise RuntimeError("boom")

    try:
        cache.cached_source("abc", ".py", broken)
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_key_depends_on_every_part():
    assert cache.content_key("a", "b") != cache.content_key("ab")
    assert cache.content_key("x", "pytorch") == cache.content_key("x", "pytorch")
