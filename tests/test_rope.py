"""Fused RoPE: its meaning against transformers' rotary embeddings, every backend against the
float64 reference (forward and gradients), call-time positions, the IR, spec files, and errors."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import torch

import attncc
from attncc.api import reference_outputs
from attncc.frontend.lower import lower
from attncc.frontend.mod import Captured, TracedMod
from attncc.frontend.spec_file import parse_spec_text
from attncc.interpreter import rotate
from attncc.ir import ops
from attncc.ir.expr import captured_symbol, kv_idx
from attncc.validation import lse_tolerance
from tests.reference import dense_attention
from tests.test_cuda import SMALL_TILES as CUDA_TILES
from tests.test_cuda import requires_host_compiler
from tests.test_numerics import random_qkv
from tests.test_pytorch_backend import SMALL_TILES
from tests.test_triton import GPU_COMPILE, GRAD_TOLERANCE, HAS_NVIDIA_BACKEND, requires_triton
from tests.test_triton import SMALL_TILES as TRITON_TILES

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_neox import modeling_gpt_neox  # noqa: E402
from transformers.models.gptj import modeling_gptj  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

LLAMA_31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}  # fmt: skip
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def llama_config(theta: float, scaling: dict | None = None):
    parameters = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    return transformers.LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                    max_position_embeddings=131072, rope_parameters=parameters)  # fmt: skip


def hf_llama(config):
    embedding = modeling_llama.LlamaRotaryEmbedding(config)

    def turn(x, positions):
        cos, sin = embedding(x, positions)
        return modeling_llama.apply_rotary_pos_emb(x, x, cos, sin)[0]

    return turn


def hf_gpt_neox(rotary_pct: float):
    config = transformers.GPTNeoXConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, rotary_pct=rotary_pct)
    embedding = modeling_gpt_neox.GPTNeoXRotaryEmbedding(config)

    def turn(x, positions):
        cos, sin = embedding(x, positions)
        return modeling_gpt_neox.apply_rotary_pos_emb(x, x, cos, sin)[0]

    return turn


def hf_gptj(rotary_dim: int):
    config = transformers.GPTJConfig(n_embd=HEADS * HEAD_DIM, n_head=HEADS, rotary_dim=rotary_dim, n_positions=512)
    embedding = modeling_gptj.GPTJRotaryEmbedding(config)

    def turn(x, positions):  # GPT-J rotates [B, L, H, D] tensors
        sin, cos = embedding(x, positions)
        x = x.transpose(1, 2)
        turned = modeling_gptj.apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos)
        return torch.cat((turned, x[..., rotary_dim:]), dim=-1).transpose(1, 2)

    return turn


# name -> (attncc's RoPE, transformers' rotation of a [B, H, L, D] tensor at positions [B, L])
MODELS = {
    "llama2": (attncc.RoPE(theta=10000.0), hf_llama(llama_config(10000.0))),
    "llama2-linear-scaling": (
        attncc.RoPE(theta=10000.0, scaling={"rope_type": "linear", "factor": 4.0}),
        hf_llama(llama_config(10000.0, {"rope_type": "linear", "factor": 4.0})),
    ),
    "llama3": (attncc.RoPE(theta=500000.0), hf_llama(llama_config(500000.0))),
    "llama3.1": (
        attncc.RoPE(theta=500000.0, scaling=LLAMA_31_SCALING),
        hf_llama(llama_config(500000.0, LLAMA_31_SCALING)),
    ),
    "gpt-neox-partial": (attncc.RoPE(theta=10000.0, rotary_dim=4), hf_gpt_neox(0.25)),
    "gptj-interleaved": (attncc.RoPE(theta=10000.0, rotary_dim=8, interleaved=True), hf_gptj(8)),
}


def test_frequencies_are_transformers_rope_init_functions():
    for rope_type, scaling in (("linear", {"rope_type": "linear", "factor": 4.0}), ("llama3", LLAMA_31_SCALING)):
        config = llama_config(500000.0, scaling)
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](config)
        ours = torch.tensor(attncc.RoPE(theta=500000.0, scaling=scaling).inverse_frequencies(HEAD_DIM))
        # transformers computes in float32 (a few roundings of 2^-24 each), attncc in float64
        torch.testing.assert_close(ours.float(), expected, rtol=5e-7, atol=0)
    # Llama 3.1's scaling at head_dim 16 keeps high frequencies, divides low ones by 8 and blends one between
    plain = attncc.RoPE(theta=500000.0).inverse_frequencies(HEAD_DIM)
    scaled = attncc.RoPE(theta=500000.0, scaling=LLAMA_31_SCALING).inverse_frequencies(HEAD_DIM)
    ratios = [p / s for p, s in zip(plain, scaled)]
    assert ratios[:4] == [1.0] * 4 and all(math.isclose(r, 8.0) for r in ratios[5:]) and 1.0 < ratios[4] < 8.0


@pytest.mark.parametrize("model", sorted(MODELS))
def test_rotation_is_transformers_rotary_embedding(model):
    rope, hf_turn = MODELS[model]
    x = torch.randn(2, HEADS, 11, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([list(range(5, 16)), list(range(40, 51))])
    graph_position = attncc.frontend.lower.captured_symbol("kv_positions", "i64")[attncc.ir.b, attncc.ir.kv_idx]
    ours = rotate(x.double(), rope, graph_position, "key", (11, 11), {"kv_positions": positions})
    torch.testing.assert_close(ours, hf_turn(x, positions).double(), atol=2e-6, rtol=2e-6)
    assert not torch.allclose(ours[..., 1:, :], x[..., 1:, :].double(), atol=1e-3)  # it does rotate


@pytest.mark.parametrize("model", sorted(MODELS))
def test_attention_matches_transformers_rotary_embedding(model):
    """Decoding shape: 5 new queries against a cache of 23 keys; transformers places them at 18..22."""
    rope, hf_turn = MODELS[model]
    spec = attncc.AttentionSpec(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, causal=True, rope=rope)
    attn = attncc.compile(spec, pipeline=SMALL_TILES)
    q, k, v = random_qkv(2, HEADS, KV_HEADS, 5, 23, HEAD_DIM, seed=4)
    q_positions, kv_positions = torch.arange(18, 23).expand(2, 5), torch.arange(23).expand(2, 23)
    expected_o, expected_lse = dense_attention(hf_turn(q, q_positions), hf_turn(k, kv_positions), v, causal=True)
    o, lse = attn(q, k, v, return_lse=True)
    torch.testing.assert_close(o.double(), expected_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)
    # per-sequence positions (a batch of requests at different lengths), given at call time
    q_positions = torch.tensor([[30, 31, 32, 33, 34], [7, 8, 9, 10, 11]])
    kv_positions = torch.stack([torch.arange(12, 35), torch.arange(-11, 12)])
    expected_o, _ = dense_attention(hf_turn(q, q_positions.clamp(min=0)), hf_turn(k, kv_positions.clamp(min=0)), v)
    o = attncc.compile(spec.replace(causal=False), pipeline=SMALL_TILES)(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions.clamp(min=0)
    )
    torch.testing.assert_close(o.double(), expected_o, atol=1e-5, rtol=1e-5)


# name -> (RoPE, spec fields, (B, H, Hkv, N, M, D), positions given at call time)
CASES = {
    "rotate-half-partial-gqa": (attncc.RoPE(rotary_dim=12), {"causal": True}, (2, 4, 2, 19, 37, 20), ()),
    "interleaved-llama3-mqa": (
        attncc.RoPE(theta=500000.0, interleaved=True, scaling={**LLAMA_31_SCALING, "original_max_position_embeddings": 64}),
        {"window": (9, 3)}, (1, 4, 1, 23, 17, 18), ("q", "kv"),
    ),
    "linear-decode-positions": (
        attncc.RoPE(theta=10000.0, scaling={"rope_type": "linear", "factor": 2.0}),
        {"causal": True, "softcap": 5.0}, (3, 2, 2, 3, 29, 16), ("q",),
    ),
}  # fmt: skip
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUTPUT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def case_inputs(case: str, dtype):
    rope, fields, (batch, heads, kv_heads, n, m, d), given = CASES[case]
    spec = attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, rope=rope, **fields)
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, d, dtype=dtype, seed=n)
    generator = torch.Generator().manual_seed(m)
    positions = {
        "q_positions": torch.randint(0, 200, (batch, n), generator=generator),
        "kv_positions": torch.randint(0, 200, (batch, m), generator=generator).int(),
    }
    return spec, (q, k, v), {f"{role}_positions": positions[f"{role}_positions"] for role in given}


@functools.cache
def compiled_case(case: str, backend: str):
    """A case's program, compiled once for every dtype (with its position variant, once called)."""
    spec, _, _ = case_inputs(case, torch.float32)
    return attncc.compile(spec, backend=backend, pipeline=SMALL_TILES if backend == "pytorch" else TRITON_TILES)


def check_against_reference(attn, inputs, positions, dtype, gradients: bool, lse_tolerance=(1e-5, 1e-5)):
    leaves = [t.detach().requires_grad_() for t in inputs]
    o, lse = attn(*leaves, return_lse=True, **positions)
    program = attn.with_positions(tuple(name.removesuffix("_positions") for name in positions))
    reference_leaves = [t.detach().double().requires_grad_() for t in inputs]
    reference = reference_outputs(program, *reference_leaves, **{name: t.long() for name, t in positions.items()})
    tolerance = OUTPUT_TOLERANCE[dtype]
    assert o.dtype == dtype
    torch.testing.assert_close(o.double(), reference["o"].detach(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse.double(), reference["lse"].detach(), atol=lse_tolerance[0], rtol=lse_tolerance[1])
    if not gradients:
        return
    grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(o, leaves, grad_o)
    reference_grads = torch.autograd.grad(reference["o"], reference_leaves, grad_o.double())
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, reference_grads):
        scale = float(expected.abs().max())
        atol, rtol = GRAD_TOLERANCE[dtype]["atol"], GRAD_TOLERANCE[dtype]["rtol"]
        torch.testing.assert_close(
            grad.double(), expected, atol=atol * scale, rtol=rtol, msg=lambda t, n=name: f"{n}: {t}"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_pytorch_backend_against_reference(case, dtype):
    _, inputs, positions = case_inputs(case, dtype)
    check_against_reference(compiled_case(case, "pytorch"), inputs, positions, dtype, gradients=True)


@requires_triton
@pytest.mark.parametrize("case, dtype", [
    ("rotate-half-partial-gqa", torch.float32), ("interleaved-llama3-mqa", torch.float16),
    ("linear-decode-positions", torch.bfloat16),
])  # fmt: skip
def test_triton_backend_against_reference(case, dtype):
    _, inputs, positions = case_inputs(case, dtype)
    attn = compiled_case(case, "triton")
    # in fp16 / bf16 the kernels round the turned q and k to the input dtype for q . k: lse carries that rounding
    check_against_reference(attn, inputs, positions, dtype, gradients=True, lse_tolerance=lse_tolerance(dtype, True))


@requires_host_compiler
@pytest.mark.parametrize("case, dtype", [
    ("rotate-half-partial-gqa", torch.float32), ("interleaved-llama3-mqa", torch.float16),
    ("linear-decode-positions", torch.bfloat16), ("rotate-half-partial-gqa", torch.bfloat16),
])  # fmt: skip
def test_cuda_backend_against_reference(case, dtype):
    """The cuda kernels in the host emulation, at tiles small enough that q, K and dQ / dK span several."""
    spec, inputs, positions = case_inputs(case, dtype)
    attn = attncc.compile(spec, backend="cuda", pipeline=CUDA_TILES)
    # like triton's, the cuda kernels round the turned q and k to the input dtype for q . k
    check_against_reference(attn, inputs, positions, dtype, gradients=True, lse_tolerance=lse_tolerance(dtype, True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_on_cuda(case, dtype, backend):
    """The compiled kernels on the GPU (.ci/gpu-check runs this), at the backend's default tiles."""
    spec, inputs, positions = case_inputs(case, dtype)
    inputs, positions = [t.cuda() for t in inputs], {name: t.cuda() for name, t in positions.items()}
    attn = attncc.compile(spec, backend=backend)
    check_against_reference(attn, inputs, positions, dtype, gradients=True, lse_tolerance=lse_tolerance(dtype, True))


def test_unfused_rope_ops_run_as_the_reference():
    spec, inputs, positions = case_inputs("rotate-half-partial-gqa", torch.float32)
    attn = attncc.compile(spec, pipeline=["canonicalize"])
    assert len(attn.graph.nodes_of(ops.Rope)) == 2
    check_against_reference(attn, inputs, positions, torch.float32, gradients=True)


def test_ir_rope_ops_and_the_region_that_carries_them():
    spec = attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=True,
                                rope=attncc.RoPE(theta=500000.0, rotary_dim=8, interleaved=True))  # fmt: skip
    text = str(lower(spec, given_positions=("q",)))
    assert "%0 = rope(%q, %q_positions) {position = q_positions[b, q_idx], role = query, rope = {theta = 500000, " \
           "rotary_dim = 8, interleaved = true}} : f32[B, 4, N, 16]" in text  # fmt: skip
    assert "%1 = rope(%k) {position = kv_idx, role = key, rope = {theta = 500000, rotary_dim = 8, " \
           "interleaved = true}} : f32[B, 2, M, 16]" in text  # fmt: skip
    assert "%q_positions: i64[q_positions_d0, q_positions_d1]" in text
    attn = attncc.compile(spec)
    (region,) = attn.graph.nodes_of(ops.FlashAttention)
    assert not attn.graph.nodes_of(ops.Rope)
    assert region.op.q_position == attncc.ir.M - attncc.ir.N + attncc.ir.q_idx
    assert "kv_position = kv_idx" in str(attn.graph) and "rope = {theta = 500000" in str(attn.graph)
    assert "def rotate(cls, q, k, N, M, sign=1.0):" in attn.source
    assert "grad_q, grad_k = FlashAttention.rotate(grad_q.reshape(q.shape), grad_k, N, M, *captured, sign=-1.0)" \
        in attn.source  # fmt: skip


@requires_triton
def test_triton_source_turns_tiles_and_gradients():
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, rope=attncc.RoPE(rotary_dim=8))
    source = attncc.compile(spec, backend="triton", pipeline=TRITON_TILES).with_positions(("q",)).source
    tensor = "cap0_q_positions_ptr, cap0_q_positions_stride0, cap0_q_positions_stride1, cap0_q_positions_size0, " \
             "cap0_q_positions_size1, index_error_ptr"  # fmt: skip
    assert f"def _q_positions({tensor}, b, offs_m, N, M):" in source
    assert f"k = _round(_rope(k, k_pair, _kv_positions({tensor}, b, offs_n, N, M), freq), k.dtype, INTERPRET_BF16)" \
        in source  # fmt: skip
    assert "dq = _rope(dq, _partners(dq, pair), _q_positions(" in source
    assert "dk = _rope(dk, _partners(dk, pair), _kv_positions(" in source
    assert "ROPE_PAIR = (4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15)" in source


def test_default_positions_are_bottom_right_and_explicit_ones_reuse_one_variant():
    spec, (q, k, v), _ = case_inputs("rotate-half-partial-gqa", torch.float32)
    attn = attncc.compile(spec)
    batch, n, m = q.shape[0], q.shape[2], k.shape[2]
    default = attn(q, k, v)
    same = attn(
        q, k, v, q_positions=torch.arange(m - n, m).expand(batch, n), kv_positions=torch.arange(m).expand(batch, m)
    )
    torch.testing.assert_close(same, default, atol=1e-6, rtol=1e-6)
    shifted = attn(
        q,
        k,
        v,
        q_positions=torch.arange(m - n, m).expand(batch, n) + 7,
        kv_positions=torch.arange(m).expand(batch, m) + 7,
    )
    torch.testing.assert_close(shifted, default, atol=1e-5, rtol=1e-5)  # RoPE scores depend on differences only
    assert not torch.allclose(attn(q, k, v, q_positions=torch.zeros(batch, n, dtype=torch.long)), default, atol=1e-3)
    assert list(attn._variants) == [("kv", "q"), ("q",)]
    attn(q, k, v, q_positions=torch.ones(batch, n, dtype=torch.int32))
    assert list(attn._variants) == [("kv", "q"), ("q",)]


def test_spec_file_rope_table():
    spec = parse_spec_text("""
[attention]
num_heads = 4
head_dim = 16
[attention.rope]
theta = 500000.0
rotary_dim = 8
scaling = { rope_type = "llama3", factor = 8, low_freq_factor = 1, high_freq_factor = 4, original_max_position_embeddings = 8192 }
""")
    assert spec.rope == attncc.RoPE(theta=500000.0, rotary_dim=8, scaling=LLAMA_31_SCALING)
    assert hash(spec.rope) == hash(attncc.RoPE(theta=500000.0, rotary_dim=8, scaling=LLAMA_31_SCALING))


@pytest.mark.parametrize("rope, message", [
    (dict(theta=-1.0), "rope theta=-1.0 is invalid: a finite positive number is allowed"),
    (dict(theta=float("inf")), "rope theta=inf is invalid"),
    (dict(theta="10000"), "rope theta='10000' is invalid"),
    (dict(rotary_dim=7), "rope rotary_dim=7 is invalid: a positive even integer (or None) is allowed"),
    (dict(rotary_dim=0), "rope rotary_dim=0 is invalid"),
    (dict(rotary_dim=True), "rope rotary_dim=True is invalid"),
    (dict(interleaved=1), "rope interleaved=1 is invalid: True or False is allowed"),
    (dict(scaling={"rope_type": "yarn", "factor": 2.0}), "rope scaling rope_type='yarn' is invalid: allowed are 'linear', 'llama3'"),
    (dict(scaling={"factor": 2.0}), "rope scaling rope_type=None is invalid"),
    (dict(scaling={"rope_type": ["linear"], "factor": 2.0}), "rope scaling rope_type=['linear'] is invalid"),
    (dict(scaling={"rope_type": "linear"}), "rope scaling: rope_type 'linear' needs the key 'factor'"),
    (dict(scaling={"rope_type": "llama3", "factor": 8.0}), "rope_type 'llama3' needs the key 'low_freq_factor'"),
    (dict(scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}), "unknown key 'beta' for rope_type 'linear'"),
    (dict(scaling={"rope_type": "linear", "factor": 0}), "rope scaling factor=0 is invalid"),
    (dict(scaling={**LLAMA_31_SCALING, "high_freq_factor": 1.0}), "high_freq_factor=1.0 is invalid: it must exceed"),
    (dict(scaling=[("rope_type", "linear")]), "rope scaling=[('rope_type', 'linear')] is invalid"),
])  # fmt: skip
def test_bad_rope_parameters(rope, message):
    with pytest.raises(attncc.SpecError) as error:
        attncc.RoPE(**rope)
    assert message in str(error.value)


def test_bad_rope_for_the_spec():
    with pytest.raises(attncc.SpecError, match=r"rope rotary_dim=32 is invalid for head_dim=16: an even number"):
        attncc.AttentionSpec(num_heads=2, head_dim=16, rope=attncc.RoPE(rotary_dim=32))
    with pytest.raises(attncc.SpecError, match=r"rope rotary_dim=15 is invalid for head_dim=15"):
        attncc.AttentionSpec(num_heads=2, head_dim=15, rope=attncc.RoPE())
    with pytest.raises(attncc.SpecError, match=r"rope: unknown key 'base'; allowed keys: theta, rotary_dim"):
        attncc.AttentionSpec(num_heads=2, head_dim=16, rope={"base": 10000})
    with pytest.raises(
        attncc.SpecError, match=r"rope=10000 is invalid: an attncc.RoPE, a mapping of its fields or None"
    ):
        attncc.AttentionSpec(num_heads=2, head_dim=16, rope=10000)
    with pytest.raises(
        attncc.SpecError, match=r"rope \{theta = 1e-300\} gives the frequency 3.16e\+262, beyond float32"
    ):
        attncc.AttentionSpec(num_heads=2, head_dim=16, rope=attncc.RoPE(theta=1e-300))
    linear = {"rope_type": "linear", "factor": 1e-300}
    with pytest.raises(attncc.SpecError, match="gives the frequency 1e\\+300, beyond float32's range"):
        attncc.AttentionSpec(num_heads=2, head_dim=16, rope=attncc.RoPE(scaling=linear))
    assert attncc.AttentionSpec(num_heads=2, head_dim=16, rope={"theta": 5.0}).rope == attncc.RoPE(theta=5.0)


@pytest.mark.parametrize("text, message", [
    ("rope = 5", "<string>: attention.rope=5 is invalid: a table with keys theta, rotary_dim, interleaved, scaling"),
    ("rope = { theta = -5.0 }", "<string>: attention.rope: rope theta=-5.0 is invalid"),
    ("rope = { rotary = 8 }", "<string>: attention.rope: unknown key 'rotary'; allowed keys: theta"),
    ('rope = { scaling = { rope_type = "dynamic", factor = 2.0 } }', "rope_type='dynamic' is invalid"),
    ('rope = { scaling = "linear" }', "rope scaling='linear' is invalid"),
])  # fmt: skip
def test_bad_spec_file_rope_tables(text, message):
    with pytest.raises(attncc.SpecError) as error:
        parse_spec_text(f"[attention]\nnum_heads = 2\nhead_dim = 16\n{text}\n")
    assert message in str(error.value)


def test_bad_position_tensors():
    spec, (q, k, v), _ = case_inputs("rotate-half-partial-gqa", torch.float32)
    attn = attncc.compile(spec)
    batch, n, m = q.shape[0], q.shape[2], k.shape[2]
    cases = [
        (dict(q_positions=torch.zeros(batch, n)), attncc.InputError, "q_positions has dtype torch.float32: int32 or int64 are allowed"),
        (dict(q_positions=torch.zeros(batch, n, dtype=torch.bool)), attncc.InputError, "q_positions has dtype torch.bool"),
        (dict(q_positions=list(range(n))), TypeError, "q_positions is a list: a torch.Tensor is allowed"),
        (dict(q_positions=torch.zeros(n, dtype=torch.long)), attncc.InputError,
         f"q_positions has shape ({n},): [B, N] = [{batch}, {n}] is allowed"),
        (dict(kv_positions=torch.zeros(batch, n, dtype=torch.long)), attncc.InputError,
         f"kv_positions has shape ({batch}, {n}): [B, M] = [{batch}, {m}] is allowed"),
        (dict(kv_positions=torch.zeros(batch, m, 1, dtype=torch.long)), attncc.InputError, "kv_positions has shape"),
    ]  # fmt: skip
    for positions, error_type, message in cases:
        with pytest.raises(error_type) as error:
            attn(q, k, v, **positions)
        assert isinstance(error.value, attncc.AttnccError) and message in str(error.value)
    assert not attn._variants  # nothing compiled for a bad call
    plain = attncc.compile(spec.replace(rope=None))
    with pytest.raises(attncc.InputError, match="q_positions is given, but the spec has no rope"):
        plain(q, k, v, q_positions=torch.zeros(batch, n, dtype=torch.long))


def test_mod_tensors_named_like_position_tensors_are_refused():
    q_positions = torch.zeros(8, dtype=torch.long)
    traced = TracedMod(sympy.Eq(captured_symbol("q_positions", "i64")[kv_idx], 0),
                       (Captured("q_positions", "i64", 1, q_positions, (8,)),))  # fmt: skip
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, rope=attncc.RoPE(), mask_mod=traced)
    attncc.compile(spec)  # positions not given: no clash
    with pytest.raises(attncc.ModError, match="'q_positions' clashes with the RoPE position tensor of that name"):
        attncc.compile(spec, positions=("q",))
    # a traced closure's tensor never takes the name: it is renamed q_positions_
    closure = spec.replace(mask_mod=lambda b, h, q_idx, kv_idx: q_positions[kv_idx] == 0)
    assert "q_positions_" in str(attncc.compile(closure, positions=("q",)).graph)
    with pytest.raises(attncc.SpecError, match="positions 'k' is invalid: allowed are q, kv"):
        attncc.compile(spec, positions=("k",))


@requires_triton
@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton's NVIDIA backend")
@pytest.mark.parametrize("case, dtype", [("interleaved-llama3-mqa", "bf16")])
def test_rope_kernels_compile_for_an_h100_without_one(case, dtype):
    """The interpreter accepts more than the compiler: build each kernel, call-time positions included, for sm_90."""
    spec, _, positions = case_inputs(case, torch.float32)
    attn = attncc.compile(spec, backend="triton").with_positions(tuple(p.removesuffix("_positions") for p in positions))
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", GPU_COMPILE, str(attn.path), dtype], env=environment,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [
        "_attn_fwd",
        "_attn_bwd_preprocess",
        "_attn_bwd_dkdv",
        "_attn_bwd_dq",
    ]


def test_sharded_programs_refuse_rope():
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, causal=True, rope=attncc.RoPE())
    with pytest.raises(attncc.SpecError, match="a sharded program .context parallelism. with rope is not supported"):
        attncc.compile(spec, sharded=True)


def test_llama31_example_spec_file():
    spec = attncc.load_spec(Path(__file__).resolve().parent.parent / "examples" / "llama3_1_8b_rope.toml")
    assert spec.rope == attncc.RoPE(theta=500000.0, scaling=LLAMA_31_SCALING)
    report = attncc.validate(spec, dtypes=(torch.float32,), shapes=((1, 5, 23),), verbose=False)
    assert report.ok and report.rows[0]["M"] == 23


def test_rope_programs_copy_and_pickle_with_their_variants():
    spec, (q, k, v), positions = case_inputs("linear-decode-positions", torch.float32)
    attn = attncc.compile(spec)
    expected = attn(q, k, v, **positions)
    for copied in (copy.deepcopy(attn), pickle.loads(pickle.dumps(attn))):
        assert copied.spec.rope == spec.rope and list(copied._variants) == [("q",)]
        torch.testing.assert_close(copied(q, k, v, **positions), expected, atol=0, rtol=0)


def test_translation_validation_with_call_time_positions():
    spec = attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=True, rope=attncc.RoPE(rotary_dim=8))
    attn = attncc.compile(spec, validate_each=True, positions=("q", "kv"))
    assert [record.name for record in attn.pass_records][-1] == "tile"
    assert all(record.max_change < 1e-12 for record in attn.pass_records)


def test_rope_regions_stream_instead_of_the_platform_kernel():
    """torch's fused CPU kernel takes q and k as they are: a region that turns them keeps its own loop."""
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, causal=True, rope=attncc.RoPE())
    attn = attncc.compile(spec)
    assert "fused_kernel" not in str(attn.graph) and "fused_kernel" not in attn.pass_records[-1].stats
    q, k, v = random_qkv(1, 2, 2, 9, 9, 16, seed=5)
    torch.testing.assert_close(attn(q, k, v).double(), reference_outputs(attn, q.double(), k.double(), v.double())["o"],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_rope_op_verifier():
    x = attncc.ir.TensorType((attncc.ir.B, 2, attncc.ir.N, 16), "T")
    query = ops.Rope(attncc.RoPE(), "query", attncc.ir.M - attncc.ir.N + attncc.ir.q_idx)
    assert str(query.infer_type([x])) == "f32[B, 2, N, 16]"
    cases = [
        (query, [], "rope takes 1 inputs, got 0"),
        (query, [x.with_shape((attncc.ir.B, 2, attncc.ir.N, 15))], "rope rotary_dim=15 is invalid for head_dim=15"),
        (ops.Rope(attncc.RoPE(), "value", attncc.ir.q_idx), [x], "role query or key, got T[B, 2, N, 16] and 'value'"),
        (ops.Rope(attncc.RoPE(), "query", attncc.ir.kv_idx), [x], "uses unknown symbols ['kv_idx']"),
        (ops.Rope(attncc.RoPE(), "key", attncc.ir.kv_idx / 2), [x], "position kv_idx/2 is not an integer expression"),
    ]
    for op, inputs, message in cases:
        with pytest.raises(attncc.IRError) as error:
            op.infer_type(inputs)
        assert message in str(error.value)
