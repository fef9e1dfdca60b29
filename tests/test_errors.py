"""Bad input gets an AttnccError that names the field or argument, the value and what is allowed."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.api import InputTypeError


def spec(**fields):
    return attncc.AttentionSpec(**{"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, **fields})


SPEC_ERRORS = [
    (dict(num_heads=0), "num_heads=0 is invalid: a positive integer is allowed"),
    (dict(num_heads=-3), "num_heads=-3 is invalid"),
    (dict(head_dim=2.5), "head_dim=2.5 is invalid: a positive integer"),
    (dict(num_heads=True), "num_heads=True is invalid"),
    (dict(num_kv_heads=3), "num_kv_heads=3 is invalid: num_heads=4 must be a multiple of it (allowed: 1, 2, 4)"),
    (dict(v_head_dim=0), "v_head_dim=0 is invalid"),
    (dict(window=(-1, 0)), "window left=-1 is invalid: a non-negative integer"),
    (dict(window=(4, 0, 1)), "window=(4, 0, 1) is invalid: a pair (left, right)"),
    (dict(window=(None, None)), "window=(None, None) is invalid"),
    (dict(softcap=0.0), "softcap=0.0 is invalid: a positive number is allowed"),
    (dict(softcap=-5), "softcap=-5 is invalid"),
    (dict(scale=float("nan")), "scale=nan is invalid: a finite number is allowed"),
    (dict(causal="left"), "causal='left' is invalid: allowed are False, True, 'bottom_right', 'top_left'"),
    (dict(alibi="yes"), "alibi='yes' is invalid: True or False"),
    (dict(mask_mod=42), "mask_mod=42 is invalid: a callable"),
]


@pytest.mark.parametrize("fields, message", SPEC_ERRORS, ids=[m.split(" is")[0] for _, m in SPEC_ERRORS])
def test_spec_field_errors(fields, message):
    with pytest.raises(attncc.SpecError) as error:
        spec(**fields)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)


def test_unknown_field_lists_allowed_ones():
    with pytest.raises(attncc.SpecError, match="unknown field 'heads'; allowed fields: num_heads, head_dim"):
        attncc.AttentionSpec.from_dict({"heads": 4, "num_heads": 4, "head_dim": 8})


def test_unknown_backend():
    with pytest.raises(attncc.BackendError, match="backend='tpu' is unknown; available backends: pytorch"):
        attncc.compile(spec(), backend="tpu")


def test_compile_needs_a_spec():
    with pytest.raises(attncc.SpecError, match="an attncc.AttentionSpec is allowed"):
        attncc.compile({"num_heads": 4})


def qkv(q_shape=(1, 4, 5, 8), k_shape=(1, 2, 7, 8), v_shape=(1, 2, 7, 8), dtype=torch.float32):
    return torch.randn(q_shape).to(dtype), torch.randn(k_shape).to(dtype), torch.randn(v_shape).to(dtype)


CALL_ERRORS = [
    (lambda: (torch.randn(4, 5, 8),) + qkv()[1:], attncc.InputError, "q has shape (4, 5, 8): a 4-D tensor"),
    (
        lambda: qkv(q_shape=(1, 3, 5, 8)),
        attncc.InputError,
        "q has 3 heads (shape (1, 3, 5, 8)); the spec's num_heads is 4",
    ),
    (lambda: qkv(k_shape=(1, 4, 7, 8), v_shape=(1, 4, 7, 8)), attncc.InputError, "k has 4 heads"),
    (
        lambda: qkv(q_shape=(1, 4, 5, 16)),
        attncc.InputError,
        "q has 16 head dim (shape (1, 4, 5, 16)); the spec's head_dim is 8",
    ),
    (lambda: qkv(v_shape=(1, 2, 7, 4)), attncc.InputError, "the spec's v_head_dim is 8"),
    (lambda: qkv(v_shape=(1, 2, 6, 8)), attncc.InputError, "k has 7 keys and v has 6 values"),
    (lambda: qkv(q_shape=(2, 4, 5, 8)), attncc.InputError, "batch sizes differ: q 2, k 1, v 1"),
    (lambda: qkv(dtype=torch.int64), TypeError, "q has dtype torch.int64: float16, bfloat16 or float32 are allowed"),
    (lambda: qkv(dtype=torch.float64), TypeError, "q has dtype torch.float64"),
    (lambda: (qkv()[0].half(),) + qkv()[1:], TypeError, "q, k, v have dtypes torch.float16, torch.float32"),
    (lambda: ([[1.0]],) + qkv()[1:], TypeError, "q is a list: a torch.Tensor is allowed"),
    (lambda: qkv(q_shape=(1, 4, 0, 8)), attncc.InputError, "sequence lengths must be positive"),
]


@pytest.mark.parametrize("make, error_type, message", CALL_ERRORS, ids=[m[:30] for _, _, m in CALL_ERRORS])
def test_call_time_errors(make, error_type, message):
    attn = attncc.compile(spec())
    with pytest.raises(error_type) as error:
        attn(*make())
    assert message in str(error.value)
    assert isinstance(error.value, attncc.AttnccError)


def test_gqa_needs_enable_gqa():
    q, k, v = qkv()
    with pytest.raises(attncc.InputError, match="query has 4 heads and key has 2: pass enable_gqa=True"):
        attncc.flex_attention(q, k, v)


def test_captured_tensor_errors():
    doc = torch.zeros(5, dtype=torch.int64)
    attn = attncc.compile(spec(mask_mod=lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]))
    q, k, v = qkv()
    with pytest.raises(
        attncc.InputError, match="captured tensor 'doc' has 5 entries along dim 0, but is indexed by kv_idx up to 6"
    ):
        attn(q, k, v)
    with pytest.raises(attncc.InputError, match="unknown captured tensor 'docs'; this program captures: doc"):
        attn(q, k, v, docs=doc)
    with pytest.raises(
        attncc.InputError, match="captured tensor 'doc' is torch.float32 with 1 dims; the program was compiled for i64"
    ):
        attn(q, k, v, doc=torch.zeros(7))
    with pytest.raises(InputTypeError, match="captured tensor doc=list is invalid: a torch.Tensor is allowed"):
        attn(q, k, v, doc=[0] * 7)


MOD_ERRORS = [
    (dict(mask_mod=lambda b, h, q_idx: q_idx > 0), "mask_mod"),
    (dict(mask_mod=lambda b, h, q_idx, kv_idx: q_idx - kv_idx), "must return a boolean"),
    (dict(score_mod=lambda score, b, h, q_idx, kv_idx: score > 0), "score_mod"),
    (dict(mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx if q_idx > 3 else True), "torch.where"),
    (dict(score_mod=lambda score, b, h, q_idx, kv_idx: score - torch.sum(score)), "torch.sum"),
]


@pytest.mark.parametrize(
    "fields, message", MOD_ERRORS, ids=["arity", "non_bool_mask", "bool_score", "python_if", "reduction"]
)
def test_mod_errors(fields, message):
    with pytest.raises(attncc.ModError) as error:
        attncc.compile(spec(**fields))
    assert message in str(error.value)
    assert isinstance(error.value, TypeError)


def test_block_mask_length_mismatch():
    block_mask = attncc.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, 16, 16)
    q, k, v = qkv(k_shape=(1, 4, 7, 8), v_shape=(1, 4, 7, 8))
    with pytest.raises(
        attncc.InputError, match=r"block_mask was made for \(Q_LEN, KV_LEN\) = \(16, 16\), the inputs have \(5, 7\)"
    ):
        attncc.flex_attention(q, k, v, block_mask=block_mask)


def test_create_block_mask_argument_errors():
    with pytest.raises(attncc.InputError, match="Q_LEN=0 is invalid: a positive integer is allowed"):
        attncc.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, 0, 16)
