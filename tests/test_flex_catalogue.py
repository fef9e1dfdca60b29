"""A catalogue of FlexAttention mods, after the cases of PyTorch's FlexAttention tests and the
attention-gym collection, written here for attncc: each runs through ``attncc.flex_attention``
forward and backward against the float64 reference (tests/reference.py, which calls the mods
on real tensors), on the pytorch backend and, with tiny shapes in Triton's interpreter, on the
triton backend.

A case names where its pattern comes from (``torch``: PyTorch's test suite, ``gym``:
attention-gym). Cases with ``learnable`` tensors also check the gradients of those tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as torch_flex

import attncc
from tests.reference import dense_attention
from tests.test_triton import GRAD_TOLERANCE, requires_triton

LONGEST = 64  # captured tensors indexed by positions cover this many
HEADS = 4
BATCH = 2
_generator = torch.Generator().manual_seed(1234)


def _randn(*shape):
    return torch.randn(*shape, generator=_generator)


def _randint(high, *shape):
    return torch.randint(0, high, shape, generator=_generator)


@dataclass(frozen=True)
class Case:
    name: str
    origin: str
    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    kv_heads: int = HEADS
    value_dim: int | None = None
    learnable: tuple[str, ...] = ()  # captured float tensors whose gradients are checked
    torch_block_mask: bool = False  # pass the mask as torch's BlockMask
    # The reference calls mods on broadcast index tensors, where a reduction would sum over every
    # position: a mod that reduces gives the reference the same computation over its last dim.
    reference_score_mod: Callable | None = None
    tensors: dict = field(default_factory=dict, compare=False)


CASES: list[Case] = []


def case(name: str, origin: str, **fields) -> None:
    CASES.append(Case(name, origin, **fields))


# --------------------------------------------------------------------------- score mods


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


case("identity", "torch")
case("causal", "torch", mask_mod=causal)
case("times_two", "torch", score_mod=lambda score, b, h, q_idx, kv_idx: score * 2)
case("squared", "torch", score_mod=lambda score, b, h, q_idx, kv_idx: score * score)
case("head_offset", "torch", score_mod=lambda score, b, h, q_idx, kv_idx: score + h * 0.25)
case("relative_bias", "torch", score_mod=lambda score, b, h, q_idx, kv_idx: score + (q_idx - kv_idx) * 0.05)
case("relative_causal", "torch",
     score_mod=lambda score, b, h, q_idx, kv_idx: torch.where(q_idx >= kv_idx, score + (q_idx - kv_idx) * 0.05,
                                                              float("-inf")))  # fmt: skip
case("inverse_causal", "torch",
     score_mod=lambda score, b, h, q_idx, kv_idx: torch.where(q_idx <= kv_idx, score, -float("inf")))  # fmt: skip
case("trig", "torch",
     score_mod=lambda score, b, h, q_idx, kv_idx: torch.sin(torch.cos(score)) + torch.tan(b * 0.5))  # fmt: skip
case("trig2", "torch",
     score_mod=lambda score, b, h, q_idx, kv_idx: torch.cos(score) * torch.sin(score) + torch.tan(b * 0.5))  # fmt: skip
case("silu", "torch", score_mod=lambda score, b, h, q_idx, kv_idx: F.silu(score))
case("skip_odd_keys", "torch", mask_mod=lambda b, h, q_idx, kv_idx: kv_idx % 2 == 0)
case("causal_block", "torch", mask_mod=lambda b, h, q_idx, kv_idx: q_idx // 8 >= kv_idx // 8)
case("seq_mask_diagonal_hidden", "torch",
     score_mod=lambda score, b, h, q_idx, kv_idx: torch.where(q_idx == kv_idx, -float("inf"), score))  # fmt: skip


def _generate_alibi(score, b, h, q_idx, kv_idx):
    slope = torch.exp2(-((h + 1) * 8.0 / HEADS))
    return score + (kv_idx - q_idx) * slope


case("alibi_exp2", "gym", score_mod=_generate_alibi)
case("tanh_softcap", "gym", score_mod=lambda score, b, h, q_idx, kv_idx: 5.0 * torch.tanh(score / 5.0))


def _times_two(score, b, h, q_idx, kv_idx):
    return score * 2


def _composed(score, b, h, q_idx, kv_idx):
    return _times_two(score, b, h, q_idx, kv_idx) + _times_two(score, b, h, q_idx, kv_idx) * (kv_idx < 10)


case("function_composition", "torch", score_mod=_composed)

# --------------------------------------------------------------------------- captured tensors

SCALE = torch.tensor(0.75)
case("captured_scalar", "torch", score_mod=lambda score, b, h, q_idx, kv_idx: score * SCALE)

HALVES = (torch.arange(LONGEST) >= 20).long()
case("seq_masking", "torch",
     score_mod=lambda score, b, h, q_idx, kv_idx: torch.where(HALVES[q_idx] == HALVES[kv_idx], score,
                                                              -float("inf")))  # fmt: skip

BIAS_QK = _randn(LONGEST, LONGEST)
BIAS_BQK = _randn(BATCH, LONGEST, LONGEST)
BIAS_BHQK = _randn(BATCH, HEADS, LONGEST, LONGEST)
BIAS_REL = _randn(2 * LONGEST)
BIAS_BQ = _randn(BATCH, LONGEST)
BIAS_WEIRD1 = _randn(4, BATCH, HEADS, LONGEST)
BIAS_WEIRD2 = _randn(BATCH, HEADS, 4, LONGEST)
WHICH = _randint(4, LONGEST)
case("bias_seq_only", "torch", score_mod=lambda score, b, h, q_idx, kv_idx: score + BIAS_QK[q_idx, kv_idx])
case("bias_seq_batch", "torch", score_mod=lambda score, b, h, q_idx, kv_idx: score + BIAS_BQK[b, q_idx, kv_idx])
case("bias_head_seq_batch", "torch",
     score_mod=lambda score, b, h, q_idx, kv_idx: score + BIAS_BHQK[b, h, q_idx, kv_idx])  # fmt: skip
case("bias_relative", "torch",
     score_mod=lambda score, b, h, q_idx, kv_idx: score + BIAS_REL[q_idx - kv_idx + LONGEST])  # fmt: skip
case("index_multiple", "torch", score_mod=lambda score, b, h, q_idx, kv_idx: score + BIAS_BQ[b, q_idx])
case("index_weird1", "torch", score_mod=lambda score, b, h, q_idx, kv_idx: score + BIAS_WEIRD1[0, b, h, q_idx])
case("index_weird2", "torch",
     score_mod=lambda score, b, h, q_idx, kv_idx: score + BIAS_WEIRD2[b, h, WHICH[q_idx], q_idx])  # fmt: skip

BIDIRECTIONAL = torch.tensor([5, 17])


def _dependent_causal_bidirectional(b, h, q_idx, kv_idx):
    return (q_idx < BIDIRECTIONAL[b]) | (q_idx >= kv_idx)


case("dependent_causal_bidirectional", "torch", mask_mod=_dependent_causal_bidirectional)

DOCUMENTS = torch.repeat_interleave(torch.arange(5), torch.tensor([9, 14, 3, 20, 18]))


def _document_causal(b, h, q_idx, kv_idx):
    return (DOCUMENTS[q_idx] == DOCUMENTS[kv_idx]) & (q_idx >= kv_idx)


case("document_causal", "gym", mask_mod=_document_causal)

# --------------------------------------------------------------------------- reductions over captured tensors

W_HEAD = _randn(HEADS, 4)
FEATURES = _randn(LONGEST, 4)
case("captured_reduction", "torch",
     score_mod=lambda score, b, h, q_idx, kv_idx: score + (W_HEAD[h] * FEATURES[q_idx]).sum(),
     reference_score_mod=lambda score, b, h, q_idx, kv_idx: score + (W_HEAD[h] * FEATURES[q_idx]).sum(-1))  # fmt: skip
Q_ROPE = _randn(BATCH, HEADS, LONGEST, 4) * 0.5
K_ROPE = _randn(BATCH, LONGEST, 4) * 0.5


def _latent_rope(score, b, h, q_idx, kv_idx):
    """MLA: the decoupled rotary part of the score, shared by the heads on the key side."""
    return score + torch.dot(Q_ROPE[b, h, q_idx], K_ROPE[b, kv_idx]) / math.sqrt(4)


case("latent_attention_rope", "gym", score_mod=_latent_rope,
     reference_score_mod=lambda score, b, h, q_idx, kv_idx: score
     + (Q_ROPE[b, h, q_idx] * K_ROPE[b, kv_idx]).sum(-1) / math.sqrt(4))  # fmt: skip

# --------------------------------------------------------------------------- masks of attention-gym


def _prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx <= 8) | (q_idx >= kv_idx)


def _sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 6)


def _dilated_window(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx).abs() <= 12) & ((q_idx - kv_idx) % 3 == 0)


def _chunked(b, h, q_idx, kv_idx):
    return (q_idx // 16 == kv_idx // 16) & (q_idx >= kv_idx)


GLOBAL = torch.zeros(LONGEST, dtype=torch.bool)
GLOBAL[[0, 7]] = True


def _global_and_window(b, h, q_idx, kv_idx):
    return GLOBAL[q_idx] | GLOBAL[kv_idx] | ((q_idx - kv_idx).abs() <= 3)


case("prefix_lm", "gym", mask_mod=_prefix_lm)
case("sliding_window_gqa", "gym", mask_mod=_sliding_window, kv_heads=2)
case("dilated_sliding_window", "gym", mask_mod=_dilated_window)
case("chunked_causal", "gym", mask_mod=_chunked)
case("global_tokens_window", "gym", mask_mod=_global_and_window)
case("and_or_noop_masks", "torch",
     mask_mod=torch_flex.and_masks(causal, torch_flex.or_masks(_prefix_lm, torch_flex.noop_mask)))  # fmt: skip
case("torch_block_mask", "torch", mask_mod=_sliding_window, torch_block_mask=True)

TEXT_IMAGE = torch.repeat_interleave(torch.arange(4), 16)  # the image each text token follows
KEY_IMAGE = torch.repeat_interleave(torch.arange(4), 16)  # the image each key belongs to


def _flamingo_cross_attention(b, h, q_idx, kv_idx):
    return TEXT_IMAGE[q_idx] == KEY_IMAGE[kv_idx]


case("flamingo_cross_attention", "gym", mask_mod=_flamingo_cross_attention)

CANVAS = 8  # a canvas of 8 x 8 positions, row-major


def _natten(b, h, q_idx, kv_idx):
    q_x, q_y = q_idx // CANVAS, q_idx % CANVAS
    kv_x, kv_y = kv_idx // CANVAS, kv_idx % CANVAS
    return ((q_x - kv_x).abs() <= 1) & ((q_y - kv_y).abs() <= 2)


def _compact(bits):
    """The even bits of a Morton code, packed: its x (or, shifted by one, its y) coordinate."""
    bits = bits & 0x55555555
    bits = (bits | (bits >> 1)) & 0x33333333
    bits = (bits | (bits >> 2)) & 0x0F0F0F0F
    return (bits | (bits >> 4)) & 0x00FF00FF


def _morton_natten(b, h, q_idx, kv_idx):
    q_x, q_y = _compact(q_idx), _compact(q_idx >> 1)
    kv_x, kv_y = _compact(kv_idx), _compact(kv_idx >> 1)
    return ((q_x - kv_x).abs() <= 1) & ((q_y - kv_y).abs() <= 1)


case("natten_2d", "torch", mask_mod=_natten)
case("natten_morton_order", "gym", mask_mod=_morton_natten)
case("bit_operations", "gym",
     score_mod=lambda score, b, h, q_idx, kv_idx: score + ((q_idx ^ kv_idx) & 3) * 0.25 - (~kv_idx >> 2) * 0.01
     + ((q_idx << 1) | 1) * 0.01)  # fmt: skip

# --------------------------------------------------------------------------- element-wise math


def _activations(score, b, h, q_idx, kv_idx):
    return (F.relu(score) * 0.5 + F.gelu(score) * 0.25 + F.gelu(score, approximate="tanh") * 0.25
            + F.softplus(score * 4, beta=0.5, threshold=3) * 0.125 + torch.sigmoid(score))  # fmt: skip


def _trigonometry(score, b, h, q_idx, kv_idx):
    bounded = torch.tanh(score * 0.5)
    return (torch.sin(score) + torch.cos(score) + torch.tan(score * 0.2) + torch.asin(bounded)
            + torch.acos(bounded * 0.9) + torch.atan(score * 2) + torch.sinh(score * 0.5) - torch.cosh(score * 0.3))  # fmt: skip


def _exp_log(score, b, h, q_idx, kv_idx):
    return (torch.expm1(score * 0.1) + torch.log1p(score * score) + torch.erf(score) + torch.abs(score) * 0.5
            + torch.sign(score) * 0.25 + score * torch.rsqrt(1 + score * score)
            + torch.pow(score * score + 1, (kv_idx % 3) * 0.25))  # fmt: skip


def _rounding(score, b, h, q_idx, kv_idx):
    """Steps only where float32 and float64 agree: on exact index values (halves: ties to even), and on
    scores kept away from the steps, so the backends' float32 scores cannot land on the other side."""
    steps = torch.round(q_idx * 0.5) + torch.trunc((q_idx - kv_idx) * 0.25) + torch.fmod(q_idx - kv_idx, 3)
    return (score * (1 + steps * 0.05) + torch.round(score * 0.01) + torch.trunc(score * 0.1)
            + torch.fmod(score * 0.1, 4.0) + torch.remainder(score * 0.1 + 2.0, 4.0) + torch.fmod((q_idx - kv_idx) * 0.5, 1.5))  # fmt: skip


def _minimum_maximum(score, b, h, q_idx, kv_idx):
    return torch.minimum(score, torch.maximum(score * -0.5, (q_idx - kv_idx) * 0.02))


case("elementwise_activations", "issue", score_mod=_activations)
case("elementwise_trigonometry", "issue", score_mod=_trigonometry)
case("elementwise_exp_log", "issue", score_mod=_exp_log)
case("elementwise_rounding", "issue", score_mod=_rounding)
case("elementwise_minimum_maximum", "issue", score_mod=_minimum_maximum)

case("sigmoid_gate_on_distance", "gym",
     score_mod=lambda score, b, h, q_idx, kv_idx: score * torch.sigmoid((q_idx - kv_idx) * 0.1))  # fmt: skip
case("causal_offset_bottom_right", "gym", mask_mod=lambda b, h, q_idx, kv_idx: q_idx + 8 >= kv_idx)
case("head_dependent_window", "gym", mask_mod=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= 4 * (h + 1))
case("batch_dependent_mask", "torch", mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < 20 + 10 * b)

case("document_sliding_window", "gym", mask_mod=torch_flex.and_masks(_document_causal, _sliding_window))
case("softcap_causal", "gym", score_mod=lambda score, b, h, q_idx, kv_idx: 2.0 * torch.tanh(score / 2.0),
     mask_mod=causal)  # fmt: skip

# --------------------------------------------------------------------------- shapes

case("value_head_dim_differs", "torch", mask_mod=causal, value_dim=24)
case("gqa_causal", "torch", mask_mod=causal, kv_heads=1)

# --------------------------------------------------------------------------- learnable biases


def _learnable(name: str, score_mod, **tensors) -> None:
    case(name, "torch", score_mod=score_mod, learnable=tuple(tensors), tensors=tensors)


GATE = _randn(HEADS)
_learnable("head_specific_gate", lambda score, b, h, q_idx, kv_idx: score * torch.sigmoid(GATE[h]), GATE=GATE)
REL_1D = _randn(2 * LONGEST)
_learnable("relative_1d_bias", lambda score, b, h, q_idx, kv_idx: score + REL_1D[q_idx - kv_idx + LONGEST],
           REL_1D=REL_1D)  # fmt: skip
ABS_2D = _randn(LONGEST, LONGEST)
_learnable("absolute_2d_bias", lambda score, b, h, q_idx, kv_idx: score + ABS_2D[q_idx, kv_idx], ABS_2D=ABS_2D)
FLAT_2D = _randn(LONGEST * LONGEST)
_learnable("absolute_2d_bias_flattened", lambda score, b, h, q_idx, kv_idx: score + FLAT_2D[q_idx * LONGEST + kv_idx],
           FLAT_2D=FLAT_2D)  # fmt: skip
ROW_BIAS, COLUMN_BIAS = _randn(LONGEST), _randn(LONGEST)
_learnable("dual_buffer_bias", lambda score, b, h, q_idx, kv_idx: score + ROW_BIAS[q_idx] + COLUMN_BIAS[kv_idx],
           ROW_BIAS=ROW_BIAS, COLUMN_BIAS=COLUMN_BIAS)  # fmt: skip
SLOPES = torch.rand(HEADS, generator=_generator)
_learnable("alibi_slopes", lambda score, b, h, q_idx, kv_idx: score - SLOPES[h] * (q_idx - kv_idx).abs(),
           SLOPES=SLOPES)  # fmt: skip
T5_TABLE = _randn(HEADS, 8)


def _t5_bucket(score, b, h, q_idx, kv_idx):
    """T5's relative buckets: exact up to 4, then logarithmic up to 32, the sign in the upper half."""
    distance = kv_idx - q_idx
    magnitude = distance.abs()
    far = 2 + (torch.log(magnitude.clamp(min=1) / 2.0 + 0.1) / math.log(16 / 2) * 2).floor().long()
    bucket = torch.where(magnitude < 2, magnitude, torch.clamp(far, max=3)) + torch.where(distance > 0, 4, 0)
    return score + T5_TABLE[h, bucket]


_learnable("t5_relative_buckets", _t5_bucket, T5_TABLE=T5_TABLE)


# --------------------------------------------------------------------------- running a case


def _inputs(c: Case, batch: int, n: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, n, 16, generator=g)
    k = torch.randn(batch, c.kv_heads, m, 16, generator=g)
    v = torch.randn(batch, c.kv_heads, m, c.value_dim or 16, generator=g)
    return q, k, v


def _check(c: Case, backend: str, batch: int, n: int, m: int, kernel_options=None):
    learnable = [c.tensors[name].requires_grad_() for name in c.learnable]
    try:
        q, k, v = _inputs(c, batch, n, m, seed=len(c.name))
        leaves = [t.requires_grad_() for t in (q, k, v)] + learnable
        extra = {}
        if c.torch_block_mask:
            extra["block_mask"] = torch_flex.create_block_mask(c.mask_mod, None, None, n, m, device="cpu",
                                                               BLOCK_SIZE=16)  # fmt: skip
        elif c.mask_mod is not None:
            extra["mask_mod"] = c.mask_mod
        o, lse = attncc.flex_attention(q, k, v, c.score_mod, enable_gqa=c.kv_heads != HEADS, return_lse=True,
                                       backend=backend, kernel_options=kernel_options, **extra)  # fmt: skip
        reference_score_mod = c.reference_score_mod or c.score_mod
        reference_o, reference_lse = dense_attention(q, k, v, score_mod=reference_score_mod, mask_mod=c.mask_mod)
        torch.testing.assert_close(o.double(), reference_o, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse.double(), reference_lse, atol=2e-6, rtol=2e-6)
        grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(o, leaves, grad_o)
        reference_grads = torch.autograd.grad(reference_o, leaves, grad_o.double())
        names = ["dq", "dk", "dv", *(f"d{name}" for name in c.learnable)]
        for name, grad, reference in zip(names, grads, reference_grads):
            scale = float(reference.abs().max())
            torch.testing.assert_close(grad.double(), reference.double(), rtol=GRAD_TOLERANCE[torch.float32]["rtol"],
                                       atol=GRAD_TOLERANCE[torch.float32]["atol"] * max(scale, 1.0),
                                       msg=lambda text, name=name: f"{name}: {text}")  # fmt: skip
    finally:
        for tensor in learnable:
            tensor.requires_grad_(False)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_catalogue_pytorch(c):
    _check(c, "pytorch", BATCH, 37, 45)


@requires_triton
@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_catalogue_triton(c):
    # Tiles of 16 x 16 over N=20, M=33: several tiles, partial ones at both ends.
    _check(c, "triton", 1, 20, 33, kernel_options={"BLOCK_M": 16, "BLOCK_N": 16})


def test_catalogue_covers_both_suites():
    origins = {c.origin for c in CASES}
    assert origins == {"torch", "gym", "issue"} and len(CASES) >= 60
