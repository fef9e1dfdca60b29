"""Every finite constant and every shape of mod computes what torch computes, on every backend.

Regressions of docs/robustness.md, "Names, numbers, indices and mods in generated code":
constants beyond int64, mods that read neither the score nor every index, chained
indexing of captured tensors, and negative indices.
"""

from __future__ import annotations

import os

import pytest
import sympy
import torch

import attncc
from attncc.backends import BACKENDS
from attncc.ir.expr import number
from tests.reference import assert_attention_matches, dense_attention
from tests.test_fuzz import why_not_runnable

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

N, M = 5, 7


def cuda_reads_computed_indices_unchecked(backend):
    """A known gap: the cuda backend's loads at computed indices neither wrap negatives nor check the range."""
    if backend == "cuda":
        pytest.xfail("the cuda backend does not wrap or range-check computed captured indices yet (docs/cuda.md)")


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    reason = why_not_runnable(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


def qkv(seed: int = 0, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((1, 2, N, 16), (1, 2, M, 16), (1, 2, M, 16))
    return [torch.randn(*shape, generator=generator).requires_grad_(requires_grad) for shape in shapes]


def check(attn, reference: dict, seed: int = 0, grad: bool = False):
    """o, lse (and with ``grad`` the gradients of q, k, v) against the dense float64 reference."""
    q, k, v = qkv(seed, requires_grad=grad)
    o, lse = attn(q, k, v, return_lse=True)
    expected_o, expected_lse = dense_attention(q, k, v, **reference)
    assert_attention_matches(o.detach(), lse.detach(), expected_o.detach(), expected_lse.detach(), torch.float32)
    if grad:
        grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 1))
        got = torch.autograd.grad(o, (q, k, v), grad_o)
        wanted = torch.autograd.grad(expected_o, (q, k, v), grad_o.double(), allow_unused=True)
        for g, w, x in zip(got, wanted, (q, k, v)):
            w = torch.zeros_like(x, dtype=torch.float64) if w is None else w.double()
            torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def compile_spec(backend: str, **fields):
    return attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, **fields), backend=backend)


# --------------------------------------------------------------------------- constants beyond int64

FLOAT32_MIN = torch.finfo(torch.float32).min
HUGE_CONSTANTS = {
    # the additive mask of Hugging Face models
    "finfo.min where": (
        dict(score_mod=lambda s, b, h, i, j: torch.where(j > i, torch.finfo(torch.float32).min, s)),
        dict(score_mod=lambda s, b, h, i, j: torch.where(j > i, FLOAT32_MIN, s)),
    ),
    "score - 1e30 * mask": (
        dict(score_mod=lambda s, b, h, i, j: s - 1e30 * (j > i)),
        dict(score_mod=lambda s, b, h, i, j: s - 1e30 * (j > i)),
    ),
    "score + 2.0 ** 70": (
        dict(score_mod=lambda s, b, h, i, j: s + 2.0**70),
        dict(score_mod=lambda s, b, h, i, j: s + 2.0**70),
    ),
    "softcap 1e30": (dict(softcap=1e30), dict(softcap=1e30)),
    # an integer beyond int64 computes as the nearest double, here as an unbounded window
    "window (10 ** 25, 0)": (dict(window=(10**25, 0)), dict(window=(1e25, 0))),
    "window (0, 10 ** 25)": (dict(window=(0, 10**25)), dict(window=(0, 1e25))),
}


@pytest.mark.parametrize("case", HUGE_CONSTANTS, ids=list(HUGE_CONSTANTS))
def test_constants_beyond_int64(backend, case):
    fields, reference = HUGE_CONSTANTS[case]
    check(compile_spec(backend, **fields), reference)


def test_whole_floats_beyond_2_53_stay_floats():
    assert number(2.0**53) == sympy.Integer(2**53)  # exact in a double: written as the integer
    assert isinstance(number(2.0**53 * 2), sympy.Float)
    assert isinstance(number(FLOAT32_MIN), sympy.Float) and float(number(FLOAT32_MIN)) == FLOAT32_MIN
    assert number(10**25) == sympy.Integer(10**25)  # Python ints stay ints


def test_validate_an_integer_beyond_int64():
    """The float64 reference interpreter evaluates integers beyond int64 as the backends do."""
    report = attncc.validate(attncc.AttentionSpec(num_heads=2, head_dim=16, window=(10**25, 0)))
    assert report.ok


# --------------------------------------------------------------------------- mods that ignore the score

TABLE = torch.randn(M, generator=torch.Generator().manual_seed(5))
SCORELESS_MODS = {
    "t[kv_idx]": (lambda s, b, h, i, j: TABLE[j], None),
    "(q_idx - kv_idx) // 2": (lambda s, b, h, i, j: (i - j) // 2, None),
    "h * 0.5": (lambda s, b, h, i, j: h * 0.5, None),
    "3.0": (lambda s, b, h, i, j: 3.0, lambda s, b, h, i, j: torch.full_like(s, 3.0)),
    "3": (lambda s, b, h, i, j: 3, lambda s, b, h, i, j: torch.full_like(s, 3.0)),
}


@pytest.mark.parametrize("case", SCORELESS_MODS, ids=list(SCORELESS_MODS))
def test_mods_that_read_neither_score_nor_every_index(backend, case):
    mod, reference = SCORELESS_MODS[case]
    attn = compile_spec(backend, score_mod=mod, mask_mod=lambda b, h, i, j: j <= i + 3)
    check(attn, {"score_mod": reference or mod, "mask_mod": lambda b, h, i, j: j <= i + 3}, grad=True)


def test_a_row_of_only_finfo_min_is_uniform(backend):
    """Found by tests/test_fuzz.py: fold-scale multiplied finfo.min by log2(e), which overflows float32 to
    -inf, so a row whose every score is finfo.min (a padded row under Hugging Face's additive mask) gave
    o = 0 and lse = -inf instead of the mean of v and lse = finfo.min + log(M)."""
    mod = lambda s, b, h, i, j: torch.where(i == 1, FLOAT32_MIN, s)  # noqa: E731
    attn = compile_spec(backend, score_mod=mod)
    assert "exp2_refused_overflow=1" in attn.explain()
    check(attn, {"score_mod": mod})


# Found by tests/test_fuzz.py: Triton's interpreter converts a Python int to the type of the other
# operand, int32 for the indices, and raised "Scalar 9007199254740993 is out of range for type int32".
BETWEEN_INT32_AND_INT64 = {
    "b < 2**53 + 1": lambda s, b, h, i, j: torch.where(b < 2**53 + 1, s, s + 1),
    "(j + 2**62) % 7": lambda s, b, h, i, j: s + ((j + 2**62) % 7) * 0.5,
    "h - 10**18 < i": lambda s, b, h, i, j: torch.where(h - 10**18 < i, s, s - 1),
}


@pytest.mark.parametrize("case", BETWEEN_INT32_AND_INT64, ids=list(BETWEEN_INT32_AND_INT64))
def test_integers_between_int32_and_int64_with_indices(backend, case):
    mod = BETWEEN_INT32_AND_INT64[case]
    check(compile_spec(backend, score_mod=mod), {"score_mod": mod})


# --------------------------------------------------------------------------- fmod of constant floats

# Found by tests/test_fuzz.py: torch.fmod of float constants stayed unevaluated, so the score's
# coefficient 1 + fmod(1.25, 0.75) was a number sympy could not convert to a float and the pytorch
# backend raised "TypeError: Cannot convert complex to float".
CONSTANT_FLOATS = {
    "fmod(1.25, 0.75)": lambda s, b, h, i, j: s + torch.fmod(i * 0 + 1.25, 0.75) * s,
    "fmod(-1.25, 0.75)": lambda s, b, h, i, j: s + torch.fmod(i * 0 - 1.25, 0.75) * s,
}


@pytest.mark.parametrize("case", CONSTANT_FLOATS, ids=list(CONSTANT_FLOATS))
def test_fmod_of_constant_floats(backend, case):
    mod = CONSTANT_FLOATS[case]
    check(compile_spec(backend, score_mod=mod), {"score_mod": mod})


# --------------------------------------------------------------------------- chained indexing

BIAS = torch.randn(2, 1, 2, N, generator=torch.Generator().manual_seed(6))
CHAINED = {
    "bias[1][b, h][q_idx]": lambda s, b, h, i, j: s + BIAS[1][b, h][i],
    "bias[1][b, h, q_idx]": lambda s, b, h, i, j: s + BIAS[1][b, h, i],
    "bias[1][b][h][q_idx]": lambda s, b, h, i, j: s + BIAS[1][b][h][i],
}


@pytest.mark.parametrize("case", CHAINED, ids=list(CHAINED))
def test_chained_indexing_of_a_captured_tensor(backend, case):
    """Each chain means bias[1, b, h, q_idx], as in torch: the program takes the whole 4-D tensor."""
    attn = compile_spec(backend, score_mod=CHAINED[case])
    assert [tuple(t.shape) for t in attn.captured.buffers()] == [tuple(BIAS.shape)]
    check(attn, {"score_mod": lambda s, b, h, i, j: s + BIAS[1, b, h, i]})
    o = attncc.flex_attention(*qkv(seed=2), score_mod=CHAINED[case], backend=backend)
    torch.testing.assert_close(o, attn(*qkv(seed=2)))


# --------------------------------------------------------------------------- negative and out-of-range indices


def poisoned(values: torch.Tensor) -> torch.Tensor:
    """``values`` as a view into the middle of a NaN allocation: a read outside it poisons the output."""
    poison = float("nan") if values.is_floating_point() else 10**6  # an index far out of any range
    storage = torch.full((3 * values.numel(),), poison, dtype=values.dtype)
    view = storage[values.numel() : 2 * values.numel()].view(values.shape)
    view.copy_(values)
    return view


TAB = poisoned(torch.randn(12, generator=torch.Generator().manual_seed(7)))
IDX = poisoned(torch.tensor([0, -3, 5, -1, 11, -12, 2]))  # M entries; -12 is the first of TAB's 12
NEGATIVE = {
    "tab[idx[kv_idx]] (negative values)": lambda s, b, h, i, j: s + TAB[IDX[j]],
    "tab[kv_idx - q_idx] (negative computed)": lambda s, b, h, i, j: s + TAB[j - i],
    "tab[(q_idx - kv_idx) // 2 - 1]": lambda s, b, h, i, j: s + TAB[(i - j) // 2 - 1],
}


@pytest.mark.parametrize("case", NEGATIVE, ids=list(NEGATIVE))
def test_negative_indices_count_once_from_the_end(backend, case):
    """As torch's eager indexing (the reference calls the mod on index tensors): -1 is the last entry."""
    cuda_reads_computed_indices_unchecked(backend)
    check(compile_spec(backend, score_mod=NEGATIVE[case]), {"score_mod": NEGATIVE[case]})


OUT_OF_RANGE = {
    "tab[kv_idx + 6] (past the end)": lambda s, b, h, i, j: s + TAB[j + 6],
    "tab[kv_idx - q_idx - 12] (below -size)": lambda s, b, h, i, j: s + TAB[j - i - 12],
    "tab[bad[kv_idx]] (a stored -13)": lambda s, b, h, i, j: s + TAB[BAD[j]],
}
BAD = poisoned(torch.tensor([0, 1, 2, 3, 4, 5, -13]))


@pytest.mark.parametrize("case", OUT_OF_RANGE, ids=list(OUT_OF_RANGE))
def test_indices_out_of_range_raise_and_are_never_read(backend, case):
    """torch raises IndexError; attncc raises InputError naming the tensors, on every backend."""
    cuda_reads_computed_indices_unchecked(backend)
    attn = compile_spec(backend, score_mod=OUT_OF_RANGE[case])
    q, k, v = qkv()
    with pytest.raises(IndexError):
        dense_attention(q, k, v, score_mod=OUT_OF_RANGE[case])
    with pytest.raises(attncc.InputError, match=r"an index into a captured tensor \(.*TAB.*\) is out of range"):
        attn(q, k, v)


HEAD_TABLE = torch.randn(2, 3, generator=torch.Generator().manual_seed(9))


def test_a_head_and_a_computed_index_in_one_read(backend):
    """``t[h, (b + 1) % 3]`` at decoding shapes: the Triton decoding tile holds a head per row, so the computed
    index's 0-d range mask must take the row's shape (Triton's interpreter refused the load)."""
    cuda_reads_computed_indices_unchecked(backend)
    mod = lambda s, b, h, i, j: s + HEAD_TABLE[h, (b + 1) % 3]  # noqa: E731
    check(compile_spec(backend, score_mod=mod), {"score_mod": mod})



def test_key_bounds_beyond_int64_stay_inside_the_keys(backend):
    """``kv_idx // 2 == 2**62`` keeps no key: the sparsity schedule's bounds are 2**63, beyond int64 (printed as a
    double); the Triton forward cast its full-tile bound to int32 unclamped and read keys at negative offsets."""
    cuda_reads_computed_indices_unchecked(backend)
    mask = lambda b, h, i, j: (j <= i) & (j // 2 == 2**62)  # noqa: E731
    attn = compile_spec(backend, mask_mod=mask)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=generator) for _ in range(3))
    o, lse = attn(q, k, v, return_lse=True)
    expected_o, expected_lse = dense_attention(q, k, v, mask_mod=mask)
    assert_attention_matches(o, lse, expected_o, expected_lse, torch.float32)
