"""attncc inside torch programs: the per-program custom op, torch.compile(fullgraph=True), attncc.nn.Attention."""

from __future__ import annotations

import operator

import pytest
import torch
import torch._dynamo.testing
from torch.fx.experimental.proxy_tensor import make_fx

import attncc
from attncc.integrations.custom_op import backward_impl, direct_region
from attncc.nn import Attention, KVCache
from tests.reference import OUTPUT_TOLERANCE, assert_attention_matches, dense_attention

# Gradients against the float64 reference: fp32 accumulates rounding over the keys;
# fp16 / bf16 inputs and outputs are rounded to 11 / 8 significant bits (as in OUTPUT_TOLERANCE),
# and the backward reads o in the input dtype.
GRAD_TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

DOC = torch.tensor([0] * 20 + [1] * 17)


def document_spec(bias: torch.Tensor) -> attncc.AttentionSpec:
    """Causal GQA attention within documents plus a learned relative-position bias table."""
    doc = DOC

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, (kv_idx - q_idx).clamp(-4, 4) + 4]

    return attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, causal=True, mask_mod=mask_mod,
                                score_mod=score_mod)  # fmt: skip


def reference_with_grads(q, k, v, bias, doc, grad_o, grad_lse):
    """o, lse and the gradients of sum(o * grad_o) + sum(lse * grad_lse), all in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    q64, k64, v64, bias64 = leaves
    o, lse = dense_attention(
        q64, k64, v64, causal=True,
        mask_mod=lambda b, h, i, j: doc[i] == doc[j],
        score_mod=lambda s, b, h, i, j: s + bias64[h, (j - i).clamp(-4, 4) + 4],
    )  # fmt: skip
    finite = torch.isfinite(lse)
    loss = (o * grad_o.double()).sum() + (lse.where(finite, 0.0) * grad_lse.double()).sum()
    return o.detach(), lse.detach(), torch.autograd.grad(loss, leaves)


def random_inputs(dtype, n=37, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, 8, generator=generator).to(dtype) for heads in (4, 2, 2))
    bias = 0.5 * torch.randn(4, 9, generator=generator)  # a float32 table, as parameters are in mixed precision
    grad_o = torch.randn(2, 4, n, 8, generator=generator).to(dtype)
    grad_lse = torch.randn(2, 4, n, generator=generator)
    return q, k, v, bias, grad_o, grad_lse


# --------------------------------------------------------------------------- the custom op


def test_each_program_is_one_custom_op_registered_once():
    bias = torch.zeros(4, 9)
    first, second = attncc.compile(document_spec(bias)), attncc.compile(document_spec(bias))
    assert first.op is second.op
    assert str(first.op).startswith("<CustomOpDef(attncc::program_")
    q, k, v, *_ = random_inputs(torch.float32)
    graph = make_fx(lambda q, k, v: first(q, k, v))(q, k, v).graph
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    assert len(calls) == 1 and "attncc.program_" in str(calls[0].target)


def test_custom_op_passes_torch_library_opcheck():
    bias = torch.zeros(4, 9)
    attn = attncc.compile(document_spec(bias))
    q, k, v, table, *_ = random_inputs(torch.float32)
    captured = attn.captured_values({"bias": table.requires_grad_()}, q.device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    results = torch.library.opcheck(attn.op, (*inputs, captured))
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_and_backward_through_the_op_match_the_reference(dtype):
    q, k, v, bias, grad_o, grad_lse = random_inputs(dtype)
    attn = attncc.compile(document_spec(torch.zeros(4, 9)))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    o, lse = attn(*leaves[:3], return_lse=True, bias=leaves[3])
    torch.autograd.backward((o, lse), (grad_o, grad_lse))
    ref_o, ref_lse, ref_grads = reference_with_grads(q, k, v, bias, DOC, grad_o, grad_lse)
    assert_attention_matches(o, lse, ref_o, ref_lse, dtype)
    for name, leaf, ref in zip(("q", "k", "v", "bias"), leaves, ref_grads):
        assert leaf.grad.dtype == leaf.dtype, name
        torch.testing.assert_close(leaf.grad.double(), ref, **GRAD_TOLERANCE[dtype], msg=lambda m, n=name: f"{n}: {m}")


def test_a_trainable_table_gets_its_gradient_when_q_k_v_need_none():
    q, k, v, table, grad_o, grad_lse = random_inputs(torch.float32)
    attn = attncc.compile(document_spec(torch.zeros(4, 9)))
    table = table.clone().requires_grad_()
    o, lse = attn(q, k, v, return_lse=True, bias=table)
    torch.autograd.backward((o, lse), (grad_o, grad_lse))
    *_, ref_grads = reference_with_grads(q, k, v, table, DOC, grad_o, grad_lse)
    torch.testing.assert_close(table.grad.double(), ref_grads[3], **GRAD_TOLERANCE[torch.float32])


def test_region_backward_and_recomputing_backward_agree():
    """The op calls the generated region's backward; a program without a region is differentiated by recompute."""
    bias = torch.zeros(4, 9)
    fused = attncc.compile(document_spec(bias))
    unfused = attncc.compile(document_spec(bias), pipeline=["canonicalize"])
    assert direct_region(fused._function, fused.graph) is not None
    assert direct_region(unfused._function, unfused.graph) is None
    q, k, v, table, grad_o, grad_lse = random_inputs(torch.float32)
    grads = []
    for attn in (fused, unfused):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
        o, lse = attn(*leaves[:3], return_lse=True, bias=leaves[3])
        torch.autograd.backward((o, lse), (grad_o, grad_lse))
        grads.append([leaf.grad for leaf in leaves])
    for fused_grad, unfused_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, unfused_grad, **GRAD_TOLERANCE[torch.float32])


def test_a_region_backward_without_captured_gradients_is_an_error_not_a_crash():
    """A region whose backward returns no gradient for a captured tensor that requires grad must say so."""

    class NoCapturedGradients:
        @staticmethod
        def backward(ctx, grad_o, grad_lse):
            q, k, v, *_ = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None

    backward = backward_impl(None, NoCapturedGradients, ["bias"])
    q, k, v, table, grad_o, grad_lse = random_inputs(torch.float32)
    o, lse = torch.zeros_like(grad_o), torch.zeros_like(grad_lse)
    grad_q, *_ = backward(q, k, v, o, lse, grad_o, grad_lse, [table], [])
    assert grad_q.shape == q.shape
    with pytest.raises(attncc.BackendError, match="no gradient for captured tensor 'bias', which requires grad"):
        backward(q, k, v, o, lse, grad_o, grad_lse, [table], [0])


def test_torch_compile_fullgraph_inductor_forward_backward_and_new_captured_values():
    bias = torch.zeros(4, 9)
    attn = attncc.compile(document_spec(bias))
    q, k, v, table, grad_o, grad_lse = random_inputs(torch.float32)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, k, v, table):
        o, lse = attn(q, k, v, return_lse=True, bias=table)
        return (o * grad_o).sum() + (lse * grad_lse).sum(), o, lse

    for table_values in (table, 2 * table):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, table_values)]
        loss, o, lse = step(*leaves)
        loss.backward()
        ref_o, ref_lse, ref_grads = reference_with_grads(q, k, v, table_values, DOC, grad_o, grad_lse)
        assert_attention_matches(o, lse, ref_o, ref_lse, torch.float32)
        for leaf, ref in zip(leaves, ref_grads):
            torch.testing.assert_close(leaf.grad.double(), ref, **GRAD_TOLERANCE[torch.float32])
    assert counter.frame_count == 1  # new bias values are inputs, not a recompile


# --------------------------------------------------------------------------- runtime mask tensors


def test_a_new_captured_tensor_each_call_is_honoured():
    # New mask tensors each call, freed after it: a cache keyed by id() alone would hand a
    # new tensor at a recycled address the old table. The tile-table cache holds its tensors.
    holder = torch.zeros(1, 1, 300, 300, dtype=torch.bool)
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=8,
                                               mask_mod=lambda b, h, q_idx, kv_idx: holder[b, 0, q_idx, kv_idx]))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 8, generator=generator) for _ in range(3))
    for trial in range(4):
        keep = torch.zeros(1, 1, 300, 300, dtype=torch.bool)
        keep[..., :150] = trial % 2 == 0
        keep[..., 150:] = trial % 2 == 1
        o = attn(q, k, v, holder=keep)
        reference, _ = dense_attention(q, k, v, mask_mod=lambda b, h, i, j, keep=keep: keep[b, 0, i, j])
        torch.testing.assert_close(o.double(), reference, **OUTPUT_TOLERANCE[torch.float32])
        del keep, o


# --------------------------------------------------------------------------- attncc.nn.Attention


def rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as a complex rotation of the pairs (x[i], x[i + D/2]), in float64."""
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    rotation = torch.polar(torch.ones(1, dtype=torch.float64), positions.double()[:, None] * frequencies)
    rotated = torch.complex(x[..., :half].double(), x[..., half:].double()) * rotation
    return torch.cat([rotated.real, rotated.imag], dim=-1)


def attention_module_reference(module: Attention, x: torch.Tensor, **dense_options) -> torch.Tensor:
    batch, n, _ = x.shape
    x64 = x.double()

    def heads(linear, count):
        return torch.nn.functional.linear(x64, linear.weight.double()).view(batch, n, count, -1).transpose(1, 2)

    q = heads(module.q_proj, module.num_heads)
    k, v = heads(module.k_proj, module.num_kv_heads), heads(module.v_proj, module.num_kv_heads)
    positions = torch.arange(n)
    q, k = rope_reference(q, positions, module.rope_base), rope_reference(k, positions, module.rope_base)
    o, _ = dense_attention(q, k, v, **dense_options)
    return torch.nn.functional.linear(o.transpose(1, 2).reshape(batch, n, -1), module.o_proj.weight.double())


def test_attention_module_with_gqa_and_rope_matches_the_reference():
    torch.manual_seed(0)
    module = Attention(32, 4, num_kv_heads=2, rope=True, rope_base=500.0)
    x = torch.randn(2, 11, 32)
    expected = attention_module_reference(module, x, causal=True)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)
    assert module.spec.num_kv_heads == 2 and module.attention.spec.causal is True


@pytest.mark.parametrize("window", [None, (3, 0)], ids=["causal", "sliding-window"])
def test_kv_cache_decoding_equals_the_full_forward(window):
    torch.manual_seed(0)
    module = Attention(32, 4, num_kv_heads=1, rope=True, window=window)
    x = torch.randn(2, 9, 32)
    full = module(x)
    cache = KVCache()
    pieces = [module(x[:, :5], cache=cache)] + [module(x[:, i : i + 1], cache=cache) for i in range(5, 9)]
    assert len(cache) == 9
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-6, rtol=2e-6)
    expected = attention_module_reference(module, x, causal=True, window=window)
    torch.testing.assert_close(full.double(), expected, atol=1e-5, rtol=1e-5)


class TinyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.attention = Attention(32, 4, num_kv_heads=2, rope=True)

    def forward(self, x):
        return x + self.attention(self.norm(x))


def test_attention_module_compiles_fullgraph_with_backward_and_dynamic_lengths():
    torch.manual_seed(0)
    model = TinyBlock()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    frames = []
    for length in (7, 12):
        x = torch.randn(2, length, 32)
        model.zero_grad()
        compiled(x).square().mean().backward()
        compiled_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).square().mean().backward()
        for compiled_grad, p in zip(compiled_grads, model.parameters()):
            torch.testing.assert_close(compiled_grad, p.grad, atol=1e-6, rtol=1e-6)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1]  # a new length is not a recompile


def test_attention_module_errors_name_the_argument():
    with pytest.raises(attncc.SpecError, match="embed_dim=30 is not a multiple of num_heads=4"):
        Attention(30, 4)
    with pytest.raises(attncc.SpecError, match="rope=True needs an even head_dim; head_dim=5"):
        Attention(32, 4, head_dim=5, rope=True)
    module = Attention(32, 4)
    with pytest.raises(attncc.InputError, match=r"x is \(2, 5, 16\): a tensor \[batch, length, 32\] is allowed"):
        module(torch.randn(2, 5, 16))
    cache = KVCache()
    module(torch.randn(2, 3, 32), cache=cache)
    with pytest.raises(attncc.InputError, match="the KV cache holds batch size 2, the input has 1"):
        module(torch.randn(1, 1, 32), cache=cache)


def test_rope_rotates_pairs_by_position():
    x = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    positions = torch.arange(3, 9)
    torch.testing.assert_close(attncc.nn.rotary(x, positions, 10.0).double(), rope_reference(x, positions, 10.0),
                               atol=1e-6, rtol=1e-6)  # fmt: skip
