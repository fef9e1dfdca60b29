"""Bounded calls into sympy's heavier machinery: an optimisation gives up instead of breaking a compile.

``sympy.simplify``, inequality solving and Piecewise folding are exponential on some
inputs, and on others raise or recurse without end (a Piecewise whose first condition
is ``q_idx > 3`` and a later one ``Ne(flags[q_idx], 0)`` sends the inequality solver
into ``periodicity`` -> ``decompogen`` until ``RecursionError``). Every such call in
passes and frontends goes through :func:`bounded`: it refuses inputs above a size,
stops after a time budget, and turns any exception into "no result", so the caller
keeps its input, which is still correct, and counts why.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable

import sympy

# Beyond this many operations (sympy.count_ops) an input is not handed to the transform at all.
MAX_OPS = 2000
# Wall-clock budget of one call. Only the main thread can be interrupted (SIGALRM); elsewhere
# the size bound and the exception fallback still hold.
SECONDS = 2.0

TOO_LARGE, TIMED_OUT, FAILED = "too_large", "timed_out", "failed"


class OutOfTime(BaseException):
    """Raised by the alarm inside sympy; a BaseException, so sympy's own ``except Exception`` cannot swallow it."""


def bounded(transform: Callable, expr: sympy.Basic):
    """``(transform(expr), None)``, or ``(None, why)`` with why one of TOO_LARGE, TIMED_OUT, FAILED."""
    if sympy.count_ops(expr) > MAX_OPS:
        return None, TOO_LARGE
    try:
        with deadline(SECONDS):
            return transform(expr), None
    except OutOfTime:
        return None, TIMED_OUT
    except Exception:  # noqa: BLE001 - sympy raises anything from RecursionError to PolynomialError here
        return None, FAILED


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise OutOfTime in the body after ``seconds`` (main thread, no alarm already set; else no limit).

    For callers that must end rather than fall back, like the spec-file parser.
    """
    usable = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:  # an alarm delivered while cancelling lands here, and the handler is still restored
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
