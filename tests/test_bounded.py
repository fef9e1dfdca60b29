"""Bounded sympy calls: too large, too slow or failing inputs give no result, and the caller keeps its input."""

from __future__ import annotations

import signal
import time

import sympy

import attncc
from attncc.frontend.trace import trace_mask_mod
from attncc.ir import bounded as bounded_module
from attncc.ir.bounded import FAILED, TIMED_OUT, TOO_LARGE, bounded
from attncc.ir.expr import captured_symbol, kv_idx, q_idx, score
from attncc.passes.canonicalize import Canonicalize, simplify
from attncc.passes.sparsity import Sparsity, schedule_for


def spin(expr):
    """A transform that never ends by itself (pure Python, so only the alarm stops it)."""
    while True:
        time.sleep(0.01)


def test_bounded_returns_the_transform_or_why_not(monkeypatch):
    assert bounded(sympy.expand, (q_idx + 1) ** 2) == (q_idx**2 + 2 * q_idx + 1, None)
    assert bounded(sympy.expand, sympy.Add(*(q_idx**i for i in range(bounded_module.MAX_OPS)))) == (None, TOO_LARGE)
    flags = captured_symbol("flags", "bool")
    recursing = sympy.Piecewise((score, q_idx > 3), (2 * score, sympy.Ne(flags[q_idx], 0)), (3 * score, True))
    assert bounded(sympy.simplify, recursing) == (None, FAILED)  # RecursionError inside sympy
    monkeypatch.setattr(bounded_module, "SECONDS", 0.2)
    start = time.monotonic()
    assert bounded(spin, q_idx) == (None, TIMED_OUT)
    assert time.monotonic() - start < 1
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


def test_an_alarm_the_caller_set_is_left_alone(monkeypatch):
    monkeypatch.setattr(bounded_module, "SECONDS", 0.05)
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        assert bounded(lambda e: time.sleep(0.1) or e, q_idx) == (q_idx, None)  # no budget of its own
        time.sleep(0.4)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == [signal.SIGALRM]


def test_canonicalize_keeps_an_expression_sympy_cannot_simplify_in_time(monkeypatch):
    slow = Canonicalize()
    monkeypatch.setattr(bounded_module, "SECONDS", 0.2)
    monkeypatch.setattr("attncc.passes.canonicalize.simplify", spin)
    expr = score * 2 + q_idx
    assert slow.simplified(expr) is expr
    assert slow.stats == {"unsimplified_timed_out": 1}
    assert simplify(score * 2 - score) == score  # the unbounded transform itself, for contrast


def test_sparsity_leaves_a_relation_it_cannot_expand_in_time_to_the_tile_table(monkeypatch):
    monkeypatch.setattr(bounded_module, "SECONDS", 0.2)
    mask = trace_mask_mod(lambda b, h, q_idx, kv_idx: (q_idx + kv_idx + b + h + 1) ** 60 <= 2**60).expr
    heard = []
    schedule = schedule_for(sympy.And(mask, kv_idx <= q_idx), on_fallback=heard.append)
    assert heard == [TIMED_OUT]
    assert schedule.table and schedule.residual == mask and str(schedule.kv_hi) == "Min(M, q_last + 1)"


def test_explain_names_the_fallback(monkeypatch):
    monkeypatch.setattr(bounded_module, "SECONDS", 0.2)
    spec = attncc.AttentionSpec(
        num_heads=1, head_dim=8, mask_mod=lambda b, h, q_idx, kv_idx: (q_idx + kv_idx + b + h + 1) ** 60 <= 2**60
    )
    attn = attncc.compile(spec)
    record = next(r for r in attn.pass_records if r.name == Sparsity.name)
    assert record.stats["unsolved_timed_out"] == 1
    assert "unsolved_timed_out=1" in attn.explain()
