"""Fuzzing: random specs and mods on every available backend against the independent dense reference.

Mods are built from a small grammar (``Node`` subclasses). Each node renders twice:
``user`` writes it the way a user writes a mod (Python operators, torch functions,
captured tensors indexed with traced values), which attncc traces with torch.fx;
``ref`` evaluates it eagerly on the reference's index tensors, with every float
computed from indices in float64, for ``tests.reference.dense_attention``, which
shares no code with attncc.

Profiles (environment variable ``ATTNCC_FUZZ_PROFILE``): ``ci`` (default) is
derandomised, so CI runs the same examples every time; ``long`` runs random examples,
per backend 2000 or 9 minutes (triton: 150 or 3 minutes), whichever ends first
(see docs/fuzzing.md), e.g.
``ATTNCC_FUZZ_PROFILE=long python -m pytest tests/test_fuzz.py -p no:cacheprovider``.
``ATTNCC_FUZZ_EXAMPLES`` (``pytorch=1000,triton=100``) runs exactly that many examples of
the named backends with no time budget, recording failures instead of stopping at the
first; ``ATTNCC_FUZZ_SEED`` seeds them. ``python -m tests.fuzz_workers`` runs such counts
in parallel worker processes.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, note, reject, seed, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from torch.nn.attention.flex_attention import and_masks, noop_mask, or_masks

import attncc
from attncc.backends import BACKENDS, get_backend
from tests.reference import LSE_TOLERANCE, OUTPUT_TOLERANCE, assert_attention_matches, dense_attention, turn_q_and_k

PROFILE = os.environ.get("ATTNCC_FUZZ_PROFILE", "ci")
# examples per backend: the triton backend runs under Triton's interpreter on CPU, which is slow;
# the cuda backend builds each program for its host emulation with the C++ compiler (seconds each).
EXAMPLES = {"ci": {"default": 150, "triton": 12, "cuda": 6}, "long": {"default": 2000, "triton": 150, "cuda": 60}}
# time budget per backend: the long profile ends after 15 minutes in all
SECONDS = {"ci": {"default": math.inf}, "long": {"default": 9 * 60, "triton": 3 * 60, "cuda": 3 * 60}}
if PROFILE not in EXAMPLES:
    raise ValueError(f"ATTNCC_FUZZ_PROFILE={PROFILE!r} is invalid: ci or long")


def requested_counts(text: str | None) -> dict[str, int] | None:
    """``ATTNCC_FUZZ_EXAMPLES``: ``1000`` (every backend) or ``pytorch=1000,triton=100`` (only those)."""
    if not text:
        return None
    counts = {}
    for item in text.split(","):
        backend, _, count = item.rpartition("=")
        if not count.strip().isdigit() or int(count) == 0 or (backend and backend.strip() not in BACKENDS):
            raise ValueError(
                f"ATTNCC_FUZZ_EXAMPLES={text!r} is invalid: a positive count (1000) or backend=count pairs "
                f"separated by commas (pytorch=1000,triton=100), backends among {', '.join(BACKENDS)}"
            )
        counts[backend.strip() or "*"] = int(count)
    return counts


def requested_seed(text: str | None) -> int | None:
    """``ATTNCC_FUZZ_SEED``: Hypothesis's seed for the random examples of one run (one worker)."""
    if not text:
        return None
    if not text.lstrip("-").isdigit():
        raise ValueError(f"ATTNCC_FUZZ_SEED={text!r} is invalid: an integer is allowed")
    return int(text)


# A requested count runs that many examples with no time budget, and records failures instead of
# stopping at the first to shrink it, so the count is reached (tests/fuzz_workers.py runs workers).
COUNTS = requested_counts(os.environ.get("ATTNCC_FUZZ_EXAMPLES"))
SEED = requested_seed(os.environ.get("ATTNCC_FUZZ_SEED"))

if not torch.cuda.is_available():
    # Without a GPU the triton backend runs in Triton's interpreter, which must be chosen before
    # anything imports triton (calling a compiled program may, through torch.compile's machinery).
    os.environ.setdefault("TRITON_INTERPRET", "1")

TABLE_LENGTH = 48  # captured tables are longer than any sequence drawn below
MAX_LENGTH = 33
MAX_HEADS = 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def requested_examples(backend: str) -> int | None:
    """The count ATTNCC_FUZZ_EXAMPLES asks of this backend: None when it asks none (the profile decides)."""
    if COUNTS is None:
        return None
    return COUNTS.get(backend, COUNTS.get("*"))


def fuzz_settings(backend: str):
    count = requested_examples(backend)
    return settings(
        max_examples=count if count is not None else EXAMPLES[PROFILE].get(backend, EXAMPLES[PROFILE]["default"]),
        derandomize=PROFILE == "ci" and SEED is None,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --------------------------------------------------------------------------- the grammar


class Node:
    """An expression of a mod: ``user(env)`` as a user writes it, ``ref(env)`` for the reference."""

    kind: str  # "int", "bool" or "float"

    def user(self, env):
        raise NotImplementedError

    def ref(self, env):
        raise NotImplementedError


@dataclass(frozen=True)
class Var(Node):
    name: str
    kind = "int"

    def user(self, env):
        return env[self.name]

    def ref(self, env):
        return env[self.name]

    def __repr__(self):
        return self.name


@dataclass(frozen=True)
class Const(Node):
    value: int
    kind = "int"

    def user(self, env):
        return self.value

    def ref(self, env):
        return self.value

    def __repr__(self):
        return str(self.value)


@dataclass(frozen=True)
class IntOp(Node):
    """Integer arithmetic as Python operators and torch functions; ``a`` is traced, ``c`` maybe a constant."""

    op: str
    a: Node
    c: Node
    kind = "int"

    def user(self, env):
        a, c = self.a.user(env), self.c.user(env)
        if self.op in ("min", "max"):
            if isinstance(c, int):  # what a user writes for a constant bound
                return torch.clamp(a, max=c) if self.op == "min" else torch.clamp(a, min=c)
            return torch.minimum(a, c) if self.op == "min" else torch.maximum(a, c)
        return {"+": lambda: a + c, "-": lambda: a - c, "*": lambda: a * c, "//": lambda: a // c,
                "%": lambda: a % c, "&": lambda: a & c, "|": lambda: a | c, "^": lambda: a ^ c,
                "<<": lambda: a << c, ">>": lambda: a >> c}[self.op]()  # fmt: skip

    def ref(self, env):
        a, c = torch.as_tensor(self.a.ref(env)), torch.as_tensor(self.c.ref(env))
        return {
            "+": torch.add,
            "-": torch.sub,
            "*": torch.mul,
            "//": lambda x, y: torch.div(x, y, rounding_mode="floor"),
            "%": torch.remainder,
            "min": torch.minimum,
            "max": torch.maximum,
            "&": torch.bitwise_and,
            "|": torch.bitwise_or,
            "^": torch.bitwise_xor,
            "<<": torch.bitwise_left_shift,
            ">>": torch.bitwise_right_shift,
        }[self.op](a, c)

    def __repr__(self):
        return f"({self.a!r} {self.op} {self.c!r})"


@dataclass(frozen=True)
class IntUnary(Node):
    """abs, neg, bitnot (``~a``), clamp(a, low, high), or floor_div_float: ``torch.floor(a / high).long()``."""

    op: str
    a: Node
    low: int = 0
    high: int = 0
    kind = "int"

    def user(self, env):
        a = self.a.user(env)
        if self.op == "abs":
            return abs(a)
        if self.op == "neg":
            return -a
        if self.op == "bitnot":
            return ~a
        if self.op == "clamp":
            return torch.clamp(a, self.low, self.high)
        # a float quotient of small integers is exact enough that its floor equals a // high
        return torch.floor(a / self.high).long()

    def ref(self, env):
        a = torch.as_tensor(self.a.ref(env))
        if self.op == "abs":
            return a.abs()
        if self.op == "neg":
            return -a
        if self.op == "bitnot":
            return torch.bitwise_not(a)
        if self.op == "clamp":
            return a.clamp(self.low, self.high)
        return torch.floor(a.double() / self.high).long()

    def __repr__(self):
        if self.op == "clamp":
            return f"clamp({self.a!r}, {self.low}, {self.high})"
        if self.op == "floor_div_float":
            return f"floor({self.a!r} / {self.high})"
        return f"{self.op}({self.a!r})"


@dataclass(frozen=True)
class Lookup(Node):
    """A captured table indexed by an expression: ``table[expr % L]`` or ``table2d[h, expr % L]``."""

    table: str
    index: Node
    by_head: bool = False
    bare: bool = False  # index with the bare variable (attncc checks the table's length against N or M)

    @property
    def kind(self):
        return {"flags": "bool", "tab": "int"}.get(self.table, "float")

    def position(self, index, env, reference: bool):
        if self.bare:
            return index
        return torch.remainder(torch.as_tensor(index), TABLE_LENGTH) if reference else index % TABLE_LENGTH

    def user(self, env):
        table = env[self.table]
        position = self.position(self.index.user(env), env, reference=False)
        return table[env["h"], position] if self.by_head else table[position]

    def ref(self, env):
        table = env[self.table]
        position = self.position(self.index.ref(env), env, reference=True)
        value = table[env["h"], position] if self.by_head else table[position]
        return value.double() if value.is_floating_point() else value

    def __repr__(self):
        index = repr(self.index) if self.bare else f"({self.index!r}) % {TABLE_LENGTH}"
        return f"{self.table}[h, {index}]" if self.by_head else f"{self.table}[{index}]"


@dataclass(frozen=True)
class Where(Node):
    cond: Node
    a: Node
    c: Node

    @property
    def kind(self):
        return self.a.kind

    def user(self, env):
        return torch.where(self.cond.user(env), self.a.user(env), self.c.user(env))

    def ref(self, env):
        return torch.where(self.cond.ref(env), torch.as_tensor(self.a.ref(env)), torch.as_tensor(self.c.ref(env)))

    def __repr__(self):
        return f"where({self.cond!r}, {self.a!r}, {self.c!r})"


@dataclass(frozen=True)
class Compare(Node):
    op: str
    a: Node
    c: Node
    kind = "bool"

    def user(self, env):
        a, c = self.a.user(env), self.c.user(env)
        return {"<": a < c, "<=": a <= c, ">": a > c, ">=": a >= c, "==": a == c, "!=": a != c}[self.op]

    def ref(self, env):
        a, c = torch.as_tensor(self.a.ref(env)), torch.as_tensor(self.c.ref(env))
        return {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "==": torch.eq, "!=": torch.ne}[self.op](
            a, c
        )

    def __repr__(self):
        return f"({self.a!r} {self.op} {self.c!r})"


@dataclass(frozen=True)
class Logic(Node):
    op: str  # & | ^ ~
    a: Node
    c: Node | None = None
    kind = "bool"

    def user(self, env):
        a = self.a.user(env)
        if self.op == "~":
            return ~a
        c = self.c.user(env)
        return {"&": lambda: a & c, "|": lambda: a | c, "^": lambda: a ^ c}[self.op]()

    def ref(self, env):
        a = self.a.ref(env)
        if self.op == "~":
            return torch.logical_not(a)
        return {"&": torch.logical_and, "|": torch.logical_or, "^": torch.logical_xor}[self.op](a, self.c.ref(env))

    def __repr__(self):
        return f"~{self.a!r}" if self.op == "~" else f"({self.a!r} {self.op} {self.c!r})"


@dataclass(frozen=True)
class Score(Node):
    kind = "float"

    def user(self, env):
        return env["score"]

    def ref(self, env):
        return env["score"]

    def __repr__(self):
        return "score"


@dataclass(frozen=True)
class Bounded(Node):
    """A bounded float made from an integer expression (so scores stay well conditioned)."""

    op: str  # exp_decay, sigmoid, tanh, sqrt, log, remainder, exp2_decay
    a: Node
    c: float
    kind = "float"

    def user(self, env):
        a = self.a.user(env)
        if self.op == "exp_decay":
            return torch.exp(-abs(a) * self.c)
        if self.op == "exp2_decay":
            return torch.exp2(-abs(a) * self.c)
        if self.op == "sigmoid":
            return torch.sigmoid(a * self.c)
        if self.op == "tanh":
            return torch.tanh(a * self.c)
        if self.op == "sqrt":
            return torch.sqrt(abs(a) + 1) * self.c
        if self.op == "log":
            return torch.log(abs(a) + 1) * self.c
        return (a % 17) * self.c

    def ref(self, env):
        a = torch.as_tensor(self.a.ref(env)).double()
        return {
            "exp_decay": lambda: torch.exp(-a.abs() * self.c),
            "exp2_decay": lambda: torch.exp2(-a.abs() * self.c),
            "sigmoid": lambda: torch.sigmoid(a * self.c),
            "tanh": lambda: torch.tanh(a * self.c),
            "sqrt": lambda: torch.sqrt(a.abs() + 1) * self.c,
            "log": lambda: torch.log(a.abs() + 1) * self.c,
            "remainder": lambda: torch.remainder(a, 17) * self.c,
        }[self.op]()

    def __repr__(self):
        return f"{self.op}({self.a!r}, {self.c})"


@dataclass(frozen=True)
class FloatOp(Node):
    op: str  # + - * max min
    a: Node
    c: Node
    kind = "float"

    def user(self, env):
        a, c = self.a.user(env), self.c.user(env)
        return {"+": lambda: a + c, "-": lambda: a - c, "*": lambda: a * c,
                "max": lambda: torch.maximum(a, c), "min": lambda: torch.minimum(a, c)}[self.op]()  # fmt: skip

    def ref(self, env):
        a, c = torch.as_tensor(self.a.ref(env)).double(), torch.as_tensor(self.c.ref(env)).double()
        return {"+": torch.add, "-": torch.sub, "*": torch.mul, "max": torch.maximum, "min": torch.minimum}[self.op](
            a, c
        )

    def __repr__(self):
        return f"({self.a!r} {self.op} {self.c!r})"


@dataclass(frozen=True)
class Scaled(Node):
    a: Node
    c: float
    softcap: bool = False  # c * tanh(a / c)
    kind = "float"

    def user(self, env):
        a = self.a.user(env)
        return self.c * torch.tanh(a / self.c) if self.softcap else a * self.c

    def ref(self, env):
        a = torch.as_tensor(self.a.ref(env)).double()
        return self.c * torch.tanh(a / self.c) if self.softcap else a * self.c

    def __repr__(self):
        return f"softcap({self.a!r}, {self.c})" if self.softcap else f"({self.a!r} * {self.c})"


@dataclass(frozen=True)
class HideWhere(Node):
    """``torch.where(cond, score_expr, fill)``: a score_mod that hides elements, possibly whole rows.

    ``fill`` is -inf, or a large finite negative number (-1e30, float32's ``finfo.min``) as users write
    instead: a row of only such scores is then uniform, with lse = fill + log(visible keys)."""

    cond: Node
    a: Node
    fill: float = -math.inf
    kind = "float"

    def user(self, env):
        return torch.where(self.cond.user(env), self.a.user(env), self.fill)

    def ref(self, env):
        return torch.where(self.cond.ref(env), torch.as_tensor(self.a.ref(env)).double(), self.fill)

    def __repr__(self):
        return f"where({self.cond!r}, {self.a!r}, {self.fill!r})"


def _gelu_tanh(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


# Element-wise functions of a float x = clamp(a * c, low, high): (the function, the domain [low, high]).
# Domains keep every draw defined and well conditioned (no NaN from asin(2), no tan near its pole, no
# overflow of sinh), so the fuzzer filters by construction and the outputs must be NaN-free.
FUNCTIONS = {
    "relu": (torch.relu, (-4, 4)),
    "gelu": (torch.nn.functional.gelu, (-4, 4)),
    "gelu_tanh": (_gelu_tanh, (-4, 4)),
    "silu": (torch.nn.functional.silu, (-4, 4)),
    "softplus": (torch.nn.functional.softplus, (-4, 4)),
    "sigmoid": (torch.sigmoid, (-4, 4)),
    "sin": (torch.sin, (-8, 8)),
    "cos": (torch.cos, (-8, 8)),
    "tan": (torch.tan, (-1.25, 1.25)),
    "asin": (torch.asin, (-1, 1)),
    "acos": (torch.acos, (-1, 1)),
    "atan": (torch.atan, (-8, 8)),
    "sinh": (torch.sinh, (-3, 3)),
    "cosh": (torch.cosh, (-3, 3)),
    "abs": (torch.abs, (-4, 4)),
    "sign": (torch.sign, (-4, 4)),
    "erf": (torch.erf, (-3, 3)),
    "expm1": (torch.expm1, (-3, 2)),
    "log1p": (torch.log1p, (-0.75, 8)),
    "rsqrt": (torch.rsqrt, (0.25, 8)),
    "round": (torch.round, (-4, 4)),
    "trunc": (torch.trunc, (-4, 4)),
}


@dataclass(frozen=True)
class Function(Node):
    """``fn(torch.clamp(a * c, low, high))`` with a binary fraction ``c``, so ``a * c`` is exact in float32
    and float64 alike and round, trunc and sign see the same argument in both."""

    fn: str
    a: Node
    c: float
    kind = "float"

    def argument(self, a):
        low, high = FUNCTIONS[self.fn][1]
        return torch.clamp(a * self.c, low, high)

    def user(self, env):
        return FUNCTIONS[self.fn][0](self.argument(self.a.user(env)))

    def ref(self, env):
        return FUNCTIONS[self.fn][0](self.argument(torch.as_tensor(self.a.ref(env)).double()))

    def __repr__(self):
        low, high = FUNCTIONS[self.fn][1]
        return f"{self.fn}(clamp({self.a!r} * {self.c}, {low}, {high}))"


@dataclass(frozen=True)
class FloatBinary(Node):
    """``torch.pow(base, exponent)``, ``torch.fmod(x, y)`` or ``x % y`` (remainder) on floats of indices.

    pow: base clamp(a * c, 0.5, 4) (or the constant 1.5), exponent clamp(e * c, -2, 2); fmod and
    remainder: x = clamp(a * c, -8, 8) by a constant or by clamp(e * c, 0.5, 3). Operands are multiples
    of 1/4, so a quotient is either an exact integer or at least 1/12 from one: float32 and float64
    floor it alike."""

    op: str  # pow, pow_constant_base, fmod, remainder
    a: Node
    e: Node
    c: float
    divisor: float | None = None  # fmod / remainder by a constant instead of by e
    kind = "float"

    def operands(self, a, e):
        if self.op.startswith("pow"):
            base = 1.5 if self.op == "pow_constant_base" else torch.clamp(a * self.c, 0.5, 4)
            return base, torch.clamp(e * self.c, -2, 2)
        divisor = self.divisor if self.divisor is not None else torch.clamp(e * self.c, 0.5, 3)
        return torch.clamp(a * self.c, -8, 8), divisor

    def user(self, env):
        x, y = self.operands(self.a.user(env), self.e.user(env))
        if self.op.startswith("pow"):
            return torch.pow(x, y)
        return torch.fmod(x, y) if self.op == "fmod" else x % y

    def ref(self, env):
        x, y = self.operands(torch.as_tensor(self.a.ref(env)).double(), torch.as_tensor(self.e.ref(env)).double())
        if self.op.startswith("pow"):
            return torch.pow(torch.as_tensor(x, dtype=torch.float64), y)
        return torch.fmod(x, y) if self.op == "fmod" else torch.remainder(x, y)

    def __repr__(self):
        divisor = self.divisor if self.divisor is not None else f"clamp({self.e!r} * {self.c}, 0.5, 3)"
        return {
            "pow": f"pow(clamp({self.a!r} * {self.c}, 0.5, 4), clamp({self.e!r} * {self.c}, -2, 2))",
            "pow_constant_base": f"pow(1.5, clamp({self.e!r} * {self.c}, -2, 2))",
            "fmod": f"fmod(clamp({self.a!r} * {self.c}, -8, 8), {divisor})",
            "remainder": f"(clamp({self.a!r} * {self.c}, -8, 8) % {divisor})",
        }[self.op]


@dataclass(frozen=True)
class Reduction(Node):
    """A reduction over a captured tensor's fixed last dimension (``ROW``):
    ``(w[h] * feats[a % L]).sum()`` (or ``.mean()``, ``.amax()``) and ``torch.dot(feats[a % L], feats2[e % L])``."""

    op: str  # sum, mean, amax, dot
    a: Node
    e: Node
    kind = "float"

    def user(self, env):
        row = env["feats"][self.a.user(env) % TABLE_LENGTH]
        if self.op == "dot":
            return torch.dot(row, env["feats2"][self.e.user(env) % TABLE_LENGTH])
        return getattr(env["w"][env["h"]] * row, self.op)()

    def ref(self, env):
        row = env["feats"][torch.remainder(torch.as_tensor(self.a.ref(env)), TABLE_LENGTH)].double()
        if self.op == "dot":
            other = env["feats2"][torch.remainder(torch.as_tensor(self.e.ref(env)), TABLE_LENGTH)].double()
            return (row * other).sum(-1)
        return getattr(env["w"][env["h"]].double() * row, self.op)(-1)

    def __repr__(self):
        row = f"feats[({self.a!r}) % {TABLE_LENGTH}]"
        if self.op == "dot":
            return f"dot({row}, feats2[({self.e!r}) % {TABLE_LENGTH}])"
        return f"(w[h] * {row}).{self.op}()"


@dataclass(frozen=True)
class MaskCombination(Node):
    """torch's mask combinators at the top of a mask_mod: ``and_masks(*parts)``, ``or_masks(*parts)``
    or ``noop_mask`` (no parts), each part a mask_mod of its own."""

    op: str  # and, or, noop
    parts: tuple = ()
    kind = "bool"

    def user_mask(self, part_mask):
        """The mask_mod a user passes: the combinator applied to ``part_mask(part)`` for each part."""
        if self.op == "noop":
            return noop_mask
        return {"and": and_masks, "or": or_masks}[self.op](*(part_mask(part) for part in self.parts))

    def ref(self, env):
        if self.op == "noop":
            return torch.ones((), dtype=torch.bool)
        combine = torch.logical_and if self.op == "and" else torch.logical_or
        return functools.reduce(combine, (part.ref(env) for part in self.parts))

    def __repr__(self):
        return "noop_mask" if self.op == "noop" else f"{self.op}_masks({', '.join(map(repr, self.parts))})"


INDEX_NAMES = ("q_idx", "kv_idx", "h", "b")
# Integers beyond float64's 2^53 and near int64's limits: compared with, or added before a % 3, % 7 or
# // 2^60 that brings the sum back below 8 (index expressions stay below 2^12: nothing overflows int64).
LARGE_INTEGERS = (2**53 + 1, 2**62, -(2**62), 10**18)


@functools.cache
def int_exprs(depth: int = 2):
    """Integer expressions that read at least one index (so every torch function gets a traced value)."""
    leaves = st.one_of(st.sampled_from(INDEX_NAMES).map(Var), st.sampled_from(("q_idx", "kv_idx")).map(Var))
    if depth == 0:
        return leaves
    inner = int_exprs(depth - 1)
    operand = st.one_of(inner, st.integers(-6, 6).map(Const))
    return st.one_of(
        leaves,
        st.builds(IntOp, st.sampled_from(("+", "-", "min", "max")), inner, operand),
        st.builds(IntOp, st.just("*"), inner, st.integers(-3, 3).map(Const)),
        st.builds(IntOp, st.sampled_from(("//", "%")), inner, st.sampled_from((2, 3, 5, 7, -3)).map(Const)),
        st.builds(IntUnary, st.sampled_from(("abs", "neg", "bitnot")), inner),
        st.builds(IntOp, st.sampled_from(("&", "|", "^")), inner, operand),
        st.builds(IntOp, st.sampled_from(("<<", ">>")), inner, st.integers(0, 3).map(Const)),
        st.builds(
            lambda a, large, reduce: IntOp(reduce[0], IntOp("+", a, Const(large)), Const(reduce[1])),
            inner,
            st.sampled_from(LARGE_INTEGERS),
            st.sampled_from((("%", 3), ("%", 7), ("//", 2**60))),
        ),
        st.builds(
            lambda a, low, width: IntUnary("clamp", a, low, low + width), inner, st.integers(-8, 8), st.integers(0, 12)
        ),  # fmt: skip
        st.builds(lambda a, c: IntUnary("floor_div_float", a, high=c), inner, st.sampled_from((2, 3, 4))),
        st.builds(Lookup, st.just("tab"), inner),
        st.builds(Where, bool_exprs(depth - 1), inner, operand),
    )


@functools.cache
def bool_exprs(depth: int = 2):
    operand = st.one_of(int_exprs(0), st.integers(-6, 40).map(Const), st.sampled_from(LARGE_INTEGERS).map(Const))
    compare = st.builds(
        Compare, st.sampled_from(("<", "<=", ">", ">=", "==", "!=")), int_exprs(max(0, depth - 1)), operand
    )
    leaves = st.one_of(
        compare,
        st.builds(Lookup, st.just("flags"), int_exprs(0)),
        st.builds(
            Lookup, st.just("flags"), st.sampled_from(("q_idx", "kv_idx")).map(Var), st.just(False), st.just(True)
        ),  # fmt: skip
    )
    if depth == 0:
        return leaves
    inner = bool_exprs(depth - 1)
    return st.one_of(
        leaves,
        st.builds(Logic, st.sampled_from(("&", "|", "^")), inner, inner),
        st.builds(Logic, st.just("~"), inner),
    )


@functools.cache
def float_terms():
    """Floats of indices, bounded in magnitude."""
    return st.one_of(
        st.builds(
            Bounded,
            st.sampled_from(("exp_decay", "exp2_decay", "sigmoid", "tanh", "sqrt", "log", "remainder")),
            int_exprs(1),
            st.sampled_from((0.05, 0.1, 0.25, 0.5)),
        ),  # fmt: skip
        st.builds(Lookup, st.just("bias"), int_exprs(1)),
        st.builds(Lookup, st.just("bias2"), int_exprs(1), st.just(True)),
        st.builds(Function, st.sampled_from(sorted(FUNCTIONS)), int_exprs(1), st.sampled_from((0.25, 0.5))),
        st.builds(
            FloatBinary,
            st.sampled_from(("pow", "pow_constant_base")),
            int_exprs(1),
            int_exprs(1),
            st.sampled_from((0.25, 0.5)),
        ),
        st.builds(
            FloatBinary,
            st.sampled_from(("fmod", "remainder")),
            int_exprs(1),
            int_exprs(1),
            st.sampled_from((0.25, 0.5)),
            st.sampled_from((None, 0.75, 1.5, -2.5)),
        ),
        st.builds(Reduction, st.sampled_from(("sum", "mean", "amax", "dot")), int_exprs(1), int_exprs(1)),
    )


@functools.cache
def score_exprs(depth: int = 2):
    """Finite score expressions (no -inf inside: -inf times a negative number is +inf, whose softmax is NaN)."""
    if depth == 0:
        return st.one_of(st.just(Score()), st.builds(FloatOp, st.just("+"), st.just(Score()), float_terms()))
    inner = score_exprs(depth - 1)
    return st.one_of(
        inner,
        st.builds(FloatOp, st.sampled_from(("+", "-")), inner, float_terms()),
        st.builds(FloatOp, st.just("*"), inner, float_terms()),
        st.builds(FloatOp, st.sampled_from(("max", "min")), inner, inner),
        st.builds(Scaled, inner, st.sampled_from((-1.5, -0.5, 0.5, 2.0))),
        st.builds(Scaled, inner, st.sampled_from((3.0, 10.0)), st.just(True)),
        st.builds(Where, bool_exprs(1), inner, inner),
    )


@functools.cache
def score_mods():
    """A finite score expression, or one that hides some elements (maybe whole rows) with -inf at the top."""
    fills = st.sampled_from((-math.inf, -math.inf, -1e30, torch.finfo(torch.float32).min))
    return st.one_of(score_exprs(), st.builds(HideWhere, bool_exprs(1), score_exprs(1), fills))


@functools.cache
def mask_mods():
    """A mask expression, or torch's combinators (and_masks, or_masks of two or three, noop_mask) at the top."""
    parts = st.lists(bool_exprs(1), min_size=2, max_size=3).map(tuple)
    return st.one_of(
        bool_exprs(),
        st.builds(MaskCombination, st.sampled_from(("and", "or")), parts),
        st.just(MaskCombination("noop")),
    )


# --------------------------------------------------------------------------- mods and cases


ROW = 4  # the fixed last dimension of the tables that reductions fold
# Names the captured tables may be reached by (keys of the dict a mod closes over, which name them):
# keywords, builtins, identifiers of the generated sources, non-ASCII and non-identifier spellings.
CAPTURED_NAMES = (
    "class", "lambda", "None", "float", "len", "max", "print", "self", "torch", "math", "tl", "s", "out",
    "masked", "keep", "rows", "ctx", "cls", "k_f", "acc", "m_i", "l_i", "q", "k", "v", "o", "lse", "score",
    "q_idx", "kv_idx", "b", "h", "N", "BLOCK_M", "offs_n", "cap0_", "cap1_bias", "δ", "表", "ｋ_f", "ｃｌａｓｓ",
    "naïve", "my bias", "0", "", "a-b", "__init__",
)  # fmt: skip


def make_tables(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "tab": torch.randint(-5, 6, (TABLE_LENGTH,), generator=generator),
        "flags": torch.rand(TABLE_LENGTH, generator=generator) < 0.7,
        "bias": torch.randn(TABLE_LENGTH, generator=generator),
        "bias2": 0.5 * torch.randn(MAX_HEADS, TABLE_LENGTH, generator=generator),
        "feats": torch.randn(TABLE_LENGTH, ROW, generator=generator),
        "feats2": 0.5 * torch.randn(TABLE_LENGTH, ROW, generator=generator),
        "w": 0.5 * torch.randn(MAX_HEADS, ROW, generator=generator),
    }


def user_mods(score_tree: Node | None, mask_tree: Node | None, tables: dict, names: tuple | None = None):
    """(score_mod, mask_mod) written like a user's: closures over a dict of the captured tables, whose
    keys (``names``, in the order of ``tables``; by default their roles) name the captured tensors."""
    roles = dict(zip(tables, names or tables))
    captured = {roles[role]: table for role, table in tables.items()}

    def score_mod(score, b, h, q_idx, kv_idx):
        env = {role: captured[name] for role, name in roles.items()}
        return score_tree.user({**env, "score": score, "b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx})

    def part_mask(tree: Node):
        def mask_mod(b, h, q_idx, kv_idx):
            env = {role: captured[name] for role, name in roles.items()}
            return tree.user({**env, "b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx})

        return mask_mod

    if mask_tree is None:
        mask_mod = None
    elif isinstance(mask_tree, MaskCombination):
        mask_mod = mask_tree.user_mask(part_mask)
    else:
        mask_mod = part_mask(mask_tree)
    return (score_mod if score_tree is not None else None), mask_mod


def reference_mods(score_tree: Node | None, mask_tree: Node | None, tables: dict):
    """The same mods evaluated eagerly on the reference's index tensors, floats of indices in float64."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return score_tree.ref({"score": score, "b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx, **tables})

    def mask_mod(b, h, q_idx, kv_idx):
        return mask_tree.ref({"b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx, **tables})

    return (score_mod if score_tree is not None else None), (mask_mod if mask_tree is not None else None)


@dataclass
class FuzzCase:
    api: str  # "compile" or "flex" (attncc.flex_attention, with or without a block mask)
    batch: int
    kv_heads: int
    groups: int
    head_dim: int
    v_head_dim: int
    shapes: list  # (N, M) pairs, checked with the same program
    dtype: torch.dtype
    fields: dict  # spec fields besides the mods
    score_tree: Node | None
    mask_tree: Node | None
    table_seed: int
    input_seed: int
    block_mask: bool = False
    names: tuple | None = None  # the captured tables' names, in the order of make_tables
    kv_batch_one: bool = False  # flex_attention with K/V of batch 1 for every query batch
    cache: str | None = None  # compile, then decode against a "static" or "paged" KV cache
    lengths: tuple = ()  # the cache's sequence lengths, as fractions of M (a row may be empty)
    page_size: int = 4
    rope: dict | None = None  # attncc.RoPE's fields (compile only), also tests/reference.py's rotate keywords
    positions: tuple = ()  # with rope, the roles ("q", "kv") given as call-time position tensors

    def __str__(self):
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if "tree" not in key)
        return f"score_mod: {self.score_tree!r}\nmask_mod: {self.mask_tree!r}\n{fields}"

    @property
    def heads(self) -> int:
        return self.kv_heads * self.groups


@st.composite
def fuzz_cases(draw, apis=("compile", "flex")):
    api = draw(st.sampled_from(apis))
    kv_heads = draw(st.integers(1, 2))
    groups = draw(st.sampled_from((1, 2, 3, 4)))
    head_dim = draw(st.sampled_from((4, 8, 12, 16)))
    v_head_dim = draw(st.sampled_from((head_dim, head_dim, 8, 6)))
    lengths = st.tuples(st.integers(1, MAX_LENGTH), st.integers(1, MAX_LENGTH))
    shapes = draw(st.lists(lengths, min_size=1, max_size=2))
    fields = {}
    if api == "compile":
        causal = draw(st.sampled_from((False, False, True, "top_left")))
        if causal:
            fields["causal"] = causal
        if draw(st.booleans()):
            left = draw(st.one_of(st.none(), st.integers(0, 12)))
            right = draw(st.integers(0, 12)) if left is None else draw(st.one_of(st.none(), st.integers(0, 12)))
            fields["window"] = (left, right)
        if draw(st.integers(0, 3)) == 0:
            fields["softcap"] = draw(st.sampled_from((2.0, 5.0, 30.0)))
        if draw(st.integers(0, 3)) == 0:
            fields["alibi"] = True
    if draw(st.integers(0, 2)) == 0:
        fields["scale"] = draw(st.sampled_from((0.1, 0.5, 1.0)))
    rope = draw(ropes(head_dim)) if api == "compile" and draw(st.integers(0, 3)) == 0 else None
    score_tree = draw(st.one_of(st.none(), score_mods()))
    mask_tree = draw(st.one_of(st.none(), mask_mods()))
    batch = draw(st.integers(1, 2))
    cache = draw(st.sampled_from((None, None, None, "static", "paged"))) if api == "compile" else None
    lengths = draw(st.lists(st.sampled_from((0.0, 0.5, 1.0)), min_size=batch, max_size=batch)) if cache else []
    names = draw(st.one_of(st.none(), st.lists(st.sampled_from(CAPTURED_NAMES), min_size=7, max_size=7, unique=True)))
    return FuzzCase(
        api=api,
        batch=batch,
        kv_heads=kv_heads,
        groups=groups,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        shapes=shapes,
        dtype=draw(st.sampled_from(DTYPES)),
        fields=fields,
        score_tree=score_tree,
        mask_tree=mask_tree,
        table_seed=draw(st.integers(0, 2**16)),
        input_seed=draw(st.integers(0, 2**16)),
        block_mask=api == "flex" and mask_tree is not None and draw(st.booleans()),
        names=tuple(names) if names is not None else None,
        kv_batch_one=api == "flex" and batch > 1 and draw(st.booleans()),
        cache=cache,
        lengths=tuple(lengths),
        page_size=draw(st.sampled_from((1, 4, 16))) if cache == "paged" else 4,
        rope=rope,
        positions=draw(st.sampled_from(((), (), ("q",), ("kv",), ("kv", "q")))) if rope and not cache else (),
    )


LLAMA3_SCALINGS = (
    # Llama 3.1's, and one whose short original context puts head dims 4-16's wavelengths in all three bands
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 64},
)  # fmt: skip


@st.composite
def ropes(draw, head_dim: int) -> dict:
    """attncc.RoPE's fields: theta, a partial even rotary_dim, rotate-half or interleaved pairs, a scaling."""
    return {
        "theta": draw(st.sampled_from((10000.0, 500000.0, 100.0, 2.5))),
        "rotary_dim": draw(st.one_of(st.none(), st.sampled_from(range(2, head_dim + 1, 2)))),
        "interleaved": draw(st.booleans()),
        "scaling": draw(st.sampled_from((None, None, {"rope_type": "linear", "factor": 4.0}) + LLAMA3_SCALINGS)),
    }


REFERENCE_OPTIONS = {"causal", "window", "softcap", "alibi", "scale"}
UNBOUNDED = 10**9
# Position tensors drawn for a call: small enough that float32 angles (position * frequency) stay
# within float32 attention's tolerance of the reference, which rounds them the same way
MAX_POSITION = 64


def spec_fields(case: FuzzCase) -> dict:
    """The AttentionSpec keywords of a case besides the shapes and the mods."""
    return {**case.fields, **({"rope": attncc.RoPE(**case.rope)} if case.rope else {})}


def reference_options(case: FuzzCase, rotated_dtype=None) -> dict:
    """The reference's keywords for the spec fields (its window takes numbers, its top-left is a flag); RoPE
    with float32 angles as the kernels (tests/reference.py's rotate), turned q and k rounded to ``rotated_dtype``."""
    fields = case.fields
    options = {key: value for key, value in fields.items() if key in REFERENCE_OPTIONS}
    if case.rope:
        options.update(rope={**case.rope, "angle_dtype": torch.float32}, rotated_dtype=rotated_dtype)
    if fields.get("causal") == "top_left":
        options.update(causal=True, top_left=True)
    if "window" in options:
        options["window"] = tuple(UNBOUNDED if side is None else side for side in options["window"])
    return options


def report(text: str) -> None:
    """Hypothesis prints notes with a failing example; check_case also runs outside a test, to replay one."""
    if currently_in_test_context():
        note(text)


def assert_matches_at_logit_scale(o, lse, reference_o, reference_lse, dtype, slack=(0.0, 0.0)) -> None:
    """tests/reference.py's tolerances, with the float32 part scaled by the size of the logits.

    Scores are float32, so each carries a rounding error of about |s| * 2^-24 (times a
    few for the dot product), and the largest logits of a row (about its lse) set the
    error of o and lse. The reference's tolerances suit logits up to about 4 (randn
    inputs at the default scale); a case with ``scale=1`` or a large score_mod has
    larger ones, and its float32 error grows in proportion. fp16 / bf16 outputs are
    dominated by their own rounding, so only float32 outputs and lse are scaled.

    ``slack = (E, max |v|)``, with E a bound on how far each score may be from the reference's
    (``rope_rounding_slack``), adds E to lse's atol and 2 E max |v| to o's: a softmax whose scores move
    by at most E moves lse by at most E and o by at most 2 E max |v|.
    """
    finite = reference_lse[torch.isfinite(reference_lse)]
    magnitude = max(1.0, float(finite.abs().max()) / 4) if finite.numel() else 1.0
    assert o.dtype == dtype and lse.dtype == torch.float32
    output = dict(OUTPUT_TOLERANCE[dtype])
    if dtype == torch.float32:
        output = {key: value * magnitude for key, value in output.items()}
    lse_tolerance = {key: v * magnitude for key, v in LSE_TOLERANCE.items()}
    score_slack, v_max = slack
    output["atol"] += 2 * score_slack * v_max
    lse_tolerance["atol"] += score_slack
    torch.testing.assert_close(o.double(), reference_o, **output)
    torch.testing.assert_close(lse.double(), reference_lse, **lse_tolerance)


def reference_attention(case: FuzzCase, q, k, v, ref_score, ref_mask, row: int = 0, positions=None,
                        rotated=None):  # fmt: skip
    """The dense reference of one call: K/V broadcast to the query batch, the mods seeing batch indices from
    ``row`` (a decoded sequence's), RoPE at ``positions`` (role -> tensor; default bottom-right) with the
    turned q and k rounded to ``rotated`` (a dtype, or None)."""
    k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
    score_mod = ref_score and (lambda score, b, h, i, j: ref_score(score, b + row, h, i, j))
    mask_mod = ref_mask and (lambda b, h, i, j: ref_mask(b + row, h, i, j))
    given = {f"{role}_positions": tensor for role, tensor in (positions or {}).items()}
    return dense_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, **given,
                           **reference_options(case, rotated))  # fmt: skip


def rope_rounding_slack(case: FuzzCase, q, k, ref_score, dtype, row: int = 0, positions=None) -> float:
    """A bound on how far a kernel's scores may be from those of the reference whose turned q and k are rounded
    to ``dtype``, where that rounding is ambiguous: the kernel turns q and k in float32 (a relative error of a
    few 2^-24), so an element that close to a midpoint between two ``dtype`` numbers may round either way.
    Each such element moves the scores it enters by at most its ``dtype`` spacing times the other operand,
    times the score_mod's slope there (the softcap's is at most 1)."""
    n, m = q.shape[2], k.shape[2]
    positions = positions or {}
    rope = {**case.rope, "angle_dtype": torch.float32}
    turned_q, turned_k = turn_q_and_k(q, k, rope, positions.get("q"), positions.get("kv"))
    groups = q.shape[1] // k.shape[1]
    turned_k = turned_k.expand(q.shape[0], -1, -1, -1).repeat_interleave(groups, dim=1)

    def spacing_where_ambiguous(x):
        rounded = x.to(dtype)
        neighbour = torch.nextafter(rounded, torch.where(x > rounded.double(), math.inf, -math.inf).to(dtype))
        midpoint = (rounded.double() + neighbour.double()) / 2
        near = (x - midpoint).abs() <= 2.0**-20 * x.abs().amax(dim=-1, keepdim=True)
        return torch.where(near & (x != rounded.double()), (neighbour.double() - rounded.double()).abs(), 0.0)

    spacing_q, spacing_k = spacing_where_ambiguous(turned_q), spacing_where_ambiguous(turned_k)
    scale = case.fields.get("scale", 1 / math.sqrt(case.head_dim))
    bound = scale * (spacing_q @ turned_k.abs().transpose(-1, -2) + turned_q.abs() @ spacing_k.transpose(-1, -2))
    if ref_score is not None:
        scores = (scale * turned_q @ turned_k.transpose(-1, -2)).requires_grad_()
        b, h = torch.arange(q.shape[0]).view(-1, 1, 1, 1) + row, torch.arange(q.shape[1]).view(1, -1, 1, 1)
        i, j = torch.arange(n).view(1, 1, -1, 1), torch.arange(m).view(1, 1, 1, -1)
        modified = torch.broadcast_to(ref_score(scores, b, h, i, j), scores.shape)
        (slope,) = torch.autograd.grad(modified.sum(), scores, allow_unused=True)
        bound = bound * (slope.abs().nan_to_num(0.0) if slope is not None else 0.0)
    return float(bound.max()) if bound.numel() else 0.0


def references_of(case: FuzzCase, q, k, v, ref_score, ref_mask, row: int = 0, positions=None) -> list:
    """(o, lse, slack) references a result may match (``assert_matches_at_logit_scale``'s ``slack``): the
    float64 attention; with RoPE in fp16 / bf16 also the one whose turned q and k are rounded to the input
    dtype, as a kernel that feeds them to tensor cores does (the triton backend; the lse tolerance of
    attncc.validation.lse_tolerance), with the slack of that rounding's ambiguous elements."""
    references = [(*reference_attention(case, q, k, v, ref_score, ref_mask, row, positions), (0.0, 0.0))]
    if case.rope and q.dtype != torch.float32:
        o, lse = reference_attention(case, q, k, v, ref_score, ref_mask, row, positions, rotated=q.dtype)
        slack = rope_rounding_slack(case, q, k, ref_score, q.dtype, row, positions)
        references.append((o, lse, (slack, float(v.abs().max()) if v.numel() else 0.0)))
    return references


def decode_from_cache(program, case: FuzzCase, q, k, v, ref_score, ref_mask):
    """``program.decode`` against a cache holding each sequence's first ``lengths`` keys, and the references
    (``references_of``) row by row, each with its own M."""
    batch, kv_heads, m, _ = k.shape
    lengths = [int(fraction * m) for fraction in case.lengths]
    if case.cache == "static":
        cache = attncc.StaticKVCache(batch, kv_heads, m, case.head_dim, case.v_head_dim, dtype=k.dtype)
    else:
        pages = batch * -(-m // case.page_size)
        cache = attncc.PagedKVCache(pages, case.page_size, batch, kv_heads, case.head_dim, case.v_head_dim,
                                    dtype=k.dtype)  # fmt: skip
    for row, length in enumerate(lengths):
        if length:
            cache.append(k[row : row + 1, :, :length], v[row : row + 1, :, :length], sequences=row)
    o, lse = program.decode(q, cache, return_lse=True)
    rows = [
        references_of(
            case, q[row : row + 1], k[row : row + 1, :, :length], v[row : row + 1, :, :length], ref_score, ref_mask, row
        )  # fmt: skip
        for row, length in enumerate(lengths)
    ]
    references = []
    for choice in zip(*rows):  # the same choice for every row: concatenated, with the largest slack
        slacks = [slack for _, _, slack in choice]
        slack = (max(s for s, _ in slacks), max(v for _, v in slacks))
        references.append((torch.cat([o for o, _, _ in choice]), torch.cat([lse for _, lse, _ in choice]), slack))
    return (o, lse), references


def assert_matches_one_of(o, lse, references, dtype) -> None:
    """``assert_matches_at_logit_scale`` against the first reference, or failing that, any other."""
    errors = []
    for reference_o, reference_lse, slack in references:
        try:
            assert_matches_at_logit_scale(o, lse, reference_o, reference_lse, dtype, slack)
            return
        except AssertionError as error:
            errors.append(error)
    if len(errors) > 1:
        kinds = ("float64", f"turned q and k rounded to {dtype}")
        raise AssertionError("matches no reference:\n" + "\n".join(f"{kind}: {e}" for kind, e in zip(kinds, errors)))
    raise errors[0]


def call_positions(case: FuzzCase, n: int, m: int, generator) -> dict:
    """The call-time RoPE position tensors of the case's roles: q [B, N] int64, kv [B, M] int32."""
    sizes, dtypes = {"q": n, "kv": m}, {"q": torch.int64, "kv": torch.int32}
    return {
        role: torch.randint(0, MAX_POSITION, (case.batch, sizes[role]), generator=generator, dtype=dtypes[role])
        for role in case.positions
    }


def check_case(case: FuzzCase, backend: str) -> None:
    """Compile (or flex_attention) the case and compare every shape and dtype with the dense reference."""
    report(str(case))
    tables = make_tables(case.table_seed)
    score_mod, mask_mod = user_mods(case.score_tree, case.mask_tree, tables, case.names)
    ref_score, ref_mask = reference_mods(case.score_tree, case.mask_tree, tables)
    generator = torch.Generator().manual_seed(case.input_seed)
    program = None
    if case.api == "compile":
        spec = attncc.AttentionSpec(num_heads=case.heads, num_kv_heads=case.kv_heads, head_dim=case.head_dim,
                                    v_head_dim=case.v_head_dim, score_mod=score_mod, mask_mod=mask_mod,
                                    **spec_fields(case))  # fmt: skip
        program = attncc.compile(spec, backend=backend)
    # backends without a decoding path (cuda) run a cache's case as a plain call
    decodes = case.cache is not None and getattr(program.module, "decode", None) is not None
    for index, (n, m) in enumerate(case.shapes):
        # the first shape in every dtype, the others in the drawn one
        for dtype in DTYPES if index == 0 else (case.dtype,):
            q = torch.randn(case.batch, case.heads, n, case.head_dim, generator=generator).to(dtype)
            kv_batch = 1 if case.kv_batch_one else case.batch
            k = torch.randn(kv_batch, case.kv_heads, m, case.head_dim, generator=generator).to(dtype)
            v = torch.randn(kv_batch, case.kv_heads, m, case.v_head_dim, generator=generator).to(dtype)
            positions = call_positions(case, n, m, generator)
            report(f"N={n} M={m} dtype={dtype} positions={positions}")
            if decodes:
                (o, lse), references = decode_from_cache(program, case, q, k, v, ref_score, ref_mask)
            else:
                if program is not None:
                    given = {f"{role}_positions": tensor for role, tensor in positions.items()}
                    o, lse = program(q, k, v, return_lse=True, **given)
                else:
                    arguments = {"score_mod": score_mod, "scale": case.fields.get("scale"), "return_lse": True,
                                 "enable_gqa": case.groups > 1, "backend": backend}  # fmt: skip
                    if case.block_mask:
                        arguments["block_mask"] = attncc.create_block_mask(mask_mod, case.batch, case.heads, n, m)
                    else:
                        arguments["mask_mod"] = mask_mod
                    o, lse = attncc.flex_attention(q, k, v, **arguments)
                references = references_of(case, q, k, v, ref_score, ref_mask, positions=positions)
            assert not torch.isnan(o).any(), "NaN in the output"
            assert_matches_one_of(o, lse, references, dtype)


def why_not_runnable(name: str) -> str | None:
    """None if the backend compiles and runs a tiny program on CPU tensors here, else the reason it cannot."""
    try:
        module = get_backend(name)
        if "cpu" not in module.devices:
            return f"backend {name} does not run on CPU tensors"
        attn = attncc.compile(attncc.AttentionSpec(num_heads=1, head_dim=4), backend=name)
        attn(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4))
    except (ImportError, attncc.BackendError) as error:
        return f"backend {name} cannot run on CPU tensors here: {error}"
    return None


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_random_specs_match_reference(backend):
    reason = why_not_runnable(backend)
    if reason is not None:
        pytest.skip(reason)
    count = requested_examples(backend)
    if COUNTS is not None and count is None:
        pytest.skip(f"ATTNCC_FUZZ_EXAMPLES asks no examples of backend {backend}")
    start = time.monotonic()
    budget = math.inf if count is not None else SECONDS[PROFILE].get(backend, SECONDS[PROFILE]["default"])
    outcomes = {"passed": 0, "failed": 0}
    failures = []

    @fuzz_settings(backend)
    @given(case=fuzz_cases())
    def run(case):
        if time.monotonic() > start + budget and not outcomes["failed"]:
            reject()  # the time budget is spent: no new examples (a failure found is still shrunk)
        outcomes["failed"] += 1
        try:
            check_case(case, backend)
        except Exception as error:
            if count is None:
                raise
            failures.append(f"{case}\n{type(error).__name__}: {error}")
            return
        outcomes["failed"] -= 1
        outcomes["passed"] += 1

    if SEED is not None:
        run = seed(SEED)(run)
    try:
        run()
    finally:  # shown with -s, and for a failing test (docs/fuzzing.md quotes it); tests/fuzz_workers.py reads it
        shrinking = "" if count is not None else " (shrinking included)"
        print(f"fuzz {backend} ({PROFILE}, seed {SEED}): {sum(outcomes.values())} examples run{shrinking}, "
              f"{outcomes['failed']} failed, in {time.monotonic() - start:.1f} s")  # fmt: skip
    if failures:
        pytest.fail(f"{len(failures)} of {sum(outcomes.values())} examples failed:\n\n" + "\n\n".join(failures))


# --------------------------------------------------------------------------- minimised findings
#
# The shrunk forms of failures the fuzzer found (docs/fuzzing.md), fixed in ee9bad0 and
# kept as regression tests.


def small_qkv(n=3, m=4, heads=1):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, heads, n, 8, generator=generator), torch.randn(1, heads, m, 8, generator=generator),
            torch.randn(1, heads, m, 8, generator=generator))  # fmt: skip


def test_score_mod_that_hides_everything():
    """Finding A: a constant score expression made the pytorch region call torch.broadcast_to on a float."""
    q, k, v = small_qkv()
    hide_all = attncc.AttentionSpec(num_heads=1, head_dim=8,
                                    score_mod=lambda score, b, h, q_idx, kv_idx: torch.where(q_idx < 0, score, -math.inf))  # fmt: skip
    o, lse = attncc.compile(hide_all)(q, k, v, return_lse=True)
    assert (o == 0).all() and (lse == -math.inf).all()


def test_zero_scale_is_uniform_attention():
    """Finding A: scale=0 makes every score the constant 0."""
    q, k, v = small_qkv()
    o = attncc.compile(attncc.AttentionSpec(num_heads=1, head_dim=8, scale=0.0))(q, k, v)
    torch.testing.assert_close(o, v.mean(dim=2, keepdim=True).expand_as(o))


def test_captured_tensor_simplified_away():
    """Finding B: canonicalize dropped ``bias`` from the region, but the module still passed it."""
    q, k, v = small_qkv()
    bias = torch.randn(4)
    flags = torch.tensor([True, False, True, True])

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(flags[kv_idx], score + bias[kv_idx], -math.inf) - bias[kv_idx]

    o, lse = attncc.compile(attncc.AttentionSpec(num_heads=1, head_dim=8, score_mod=score_mod))(
        q, k, v, return_lse=True
    )
    reference_o, reference_lse = dense_attention(q, k, v, mask_mod=lambda b, h, q_idx, kv_idx: flags[kv_idx])
    assert_attention_matches(o, lse, reference_o, reference_lse, torch.float32)


def test_mask_with_a_disjunction_is_not_full():
    """Finding E: sparsity called every tile of (q_idx > kv_idx) | (kv_idx > 0) full, so nothing was masked."""
    q, k, v = small_qkv(n=1, m=2)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx > kv_idx) | (kv_idx > 0)

    o, lse = attncc.compile(attncc.AttentionSpec(num_heads=1, head_dim=8, mask_mod=mask_mod))(q, k, v, return_lse=True)
    reference_o, reference_lse = dense_attention(q, k, v, mask_mod=mask_mod)
    assert_attention_matches(o, lse, reference_o, reference_lse, torch.float32)


def test_positive_infinite_score_gives_nan_rows():
    """Finding C: +inf in a score expression was printed as a bare ``inf`` (NameError)."""
    q, k, v = small_qkv()
    spec = attncc.AttentionSpec(num_heads=1, head_dim=8,
                                score_mod=lambda score, b, h, q_idx, kv_idx: torch.where(kv_idx == 0, math.inf, score))  # fmt: skip
    o = attncc.compile(spec)(q, k, v)
    assert torch.isnan(o).all()  # softmax of +inf is inf - inf, as in FlexAttention


def test_piecewise_over_a_boolean_table_compiles():
    """Finding F: sympy.simplify of this Piecewise recursed without end in its inequality solver
    (``q_idx > 3`` first, then ``Ne(flags[q_idx], 0)``): canonicalize keeps the expression unsimplified."""
    q, k, v = small_qkv(n=7, m=5)
    flags = torch.tensor([True, False, True, True, False, True, False])

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx > 3, score, torch.where(flags[q_idx], score * 2, score * 3))

    attn = attncc.compile(attncc.AttentionSpec(num_heads=1, head_dim=8, score_mod=score_mod))
    o, lse = attn(q, k, v, return_lse=True)
    reference_o, reference_lse = dense_attention(q, k, v, score_mod=score_mod)
    assert_attention_matches(o, lse, reference_o, reference_lse, torch.float32)
    assert attn.pass_records[0].stats["unsimplified_failed"] == 1
    assert "unsimplified_failed=1" in attn.explain()


SYMBOLIC_CONSTANTS = {
    # asin(clamp(where(flags[kv_idx], b, -6) * 0.5, -1, 1)) is asin(-1) = -pi/2 where flags is False (the counted run)
    "pi where a table is false": lambda score, b, h, q_idx, kv_idx: (
        score - torch.asin(torch.clamp(torch.where(kv_idx > 2, b, -6) * 0.5, -1, 1))
    ),
    "pi": lambda score, b, h, q_idx, kv_idx: score - torch.acos(torch.clamp(b * 0 - 3, -1, 1)),
    "e": lambda score, b, h, q_idx, kv_idx: score + torch.exp(b * 0 + 1),
}


@pytest.mark.parametrize("backend", ["pytorch", "triton", "cuda"])
@pytest.mark.parametrize("mod", sorted(SYMBOLIC_CONSTANTS))
def test_constants_sympy_names_print_as_numbers(mod, backend):
    """Finding O (a counted run, 2 of 10,000 pytorch programs): sympy folds asin(-1) to -pi/2, and the pytorch
    backend printed ``pi`` (and ``E``) into the generated source: NameError when called. A bare named constant
    would reach the cuda printer as ``M_E`` / ``M_PI``, which the host compiler knows and NVRTC does not."""
    reason = why_not_runnable(backend)
    if reason is not None:  # triton or the host compiler missing
        pytest.skip(reason)
    score_mod = SYMBOLIC_CONSTANTS[mod]
    q, k, v = small_qkv(n=5, m=6, heads=2)
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=8, score_mod=score_mod), backend=backend)
    o, lse = attn(q, k, v, return_lse=True)
    reference_o, reference_lse = dense_attention(q, k, v, score_mod=score_mod)
    assert_attention_matches(o, lse, reference_o, reference_lse, torch.float32)
    if backend == "cuda":
        assert not re.search(r"\bM_[A-Z0-9_]+\b", attn.module.CUDA_SOURCE)
