"""attncc.flex_attention inside torch.compile(fullgraph=True): mods, learnable biases, recompiles, block masks."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import attncc
from tests.reference import OUTPUT_TOLERANCE, assert_attention_matches, dense_attention

GRAD_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(size: int):
    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx <= size)

    return window


def relative_bias(table):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, (kv_idx - q_idx).clamp(-4, 4) + 4]

    return score_mod


def inputs(heads=4, kv_heads=2, n=37, m=45, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, d, generator=g)
    k = torch.randn(2, kv_heads, m, d, generator=g)
    v = torch.randn(2, kv_heads, m, d, generator=g)
    return q, k, v


def compiled(fn, backend="aot_eager"):
    from torch._dynamo.testing import CompileCounterWithBackend  # Dynamo imports triton: not at collection

    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_flex_attention_compiles_whole_without_mods_and_with_a_causal_mask_gqa_and_lse():
    q, k, v = inputs()
    flex, counter = compiled(attncc.flex_attention, backend="inductor")
    for mask_mod in (None, causal):
        o, lse = flex(q, k, v, mask_mod=mask_mod, enable_gqa=True, return_lse=True)
        reference_o, reference_lse = dense_attention(q, k, v, mask_mod=mask_mod)
        assert_attention_matches(o, lse, reference_o, reference_lse, torch.float32)
    assert counter.frame_count == 2  # one graph per mask


def test_no_graph_break_and_one_custom_op_in_the_graph():
    q, k, v = inputs()
    table = torch.randn(4, 9)
    explanation = torch._dynamo.explain(attncc.flex_attention)(
        q, k, v, score_mod=relative_bias(table), mask_mod=causal, enable_gqa=True
    )
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    graph = explanation.graphs[0].graph
    assert graph.python_code("self").src.count("torch.ops.attncc.flex_attention") == 1
    # q, k, v and the captured table are the graph's inputs; nothing is baked in as a constant
    assert [node.op for node in graph.nodes].count("placeholder") == 4
    assert not [node for node in graph.nodes if node.op == "get_attr"]


def test_a_learnable_bias_gets_its_gradient_through_the_compiled_graph():
    q, k, v = inputs()
    g = torch.Generator().manual_seed(1)
    grad_o, grad_lse = torch.randn(2, 4, 37, 16, generator=g), torch.randn(2, 4, 37, generator=g)
    table = (0.5 * torch.randn(4, 9, generator=g)).requires_grad_()
    score_mod = relative_bias(table)

    def loss(q, k, v):
        o, lse = attncc.flex_attention(q, k, v, score_mod=score_mod, mask_mod=causal, enable_gqa=True, return_lse=True)
        return (o * grad_o).sum() + (lse * grad_lse).sum()

    step, counter = compiled(loss)
    for _update in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        step(*leaves).backward()
        compiled_grads = [leaf.grad for leaf in leaves] + [table.grad]
        table.grad = None
        eager_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        loss(*eager_leaves).backward()
        eager_grads = [leaf.grad for leaf in eager_leaves] + [table.grad]
        table.grad = None
        reference = reference_grads(q, k, v, table, grad_o, grad_lse)
        for compiled_grad, eager_grad, reference_grad in zip(compiled_grads, eager_grads, reference):
            torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(compiled_grad.double(), reference_grad, **GRAD_TOLERANCE)
        with torch.no_grad():
            table.mul_(-2.0)  # new values of the same tensor: an input, not a recompile
    assert counter.frame_count == 1


def reference_grads(q, k, v, table, grad_o, grad_lse):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    q64, k64, v64, table64 = leaves
    o, lse = dense_attention(q64, k64, v64, score_mod=relative_bias(table64), mask_mod=causal)
    return torch.autograd.grad((o * grad_o.double()).sum() + (lse * grad_lse.double()).sum(), leaves)


def test_a_new_window_size_in_a_closure_recompiles_and_is_never_stale():
    q, k, v = inputs()
    flex, counter = compiled(lambda q, k, v, mask_mod: attncc.flex_attention(q, k, v, mask_mod=mask_mod,
                                                                             enable_gqa=True))  # fmt: skip
    for size in (3, 11, 3):
        o = flex(q, k, v, sliding_window(size))
        reference, _ = dense_attention(q, k, v, mask_mod=sliding_window(size))
        torch.testing.assert_close(o.double(), reference, **OUTPUT_TOLERANCE[torch.float32])
    assert counter.frame_count == 2  # the third call finds the graph of the first


class Block(torch.nn.Module):
    """A small pre-norm transformer block whose attention has a learnable relative bias and a window."""

    def __init__(self, dim=32, heads=4, kv_heads=2, window=6):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, dim // heads, window
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim)
        self.out = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.rel = torch.nn.Parameter(0.5 * torch.randn(heads, 9))

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score + self.rel[h, (kv_idx - q_idx).clamp(-4, 4) + 4]

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= self.window)

    def forward(self, x):
        batch, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, n, -1, self.head_dim).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1
        )  # fmt: skip
        o = attncc.flex_attention(q, k, v, score_mod=self.score_mod, mask_mod=self.mask_mod, enable_gqa=True)
        x = x + self.out(o.transpose(1, 2).reshape(batch, n, -1))
        return x + self.mlp(x)


def test_a_transformer_block_trains_compiled_like_eager_and_follows_its_window():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 29, 32)
    step, counter = compiled(model)
    for window in (6, 6, 2):
        model.window = window
        step(x).square().mean().backward()
        compiled_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).square().mean().backward()
        for compiled_grad, p in zip(compiled_grads, model.parameters()):
            torch.testing.assert_close(compiled_grad, p.grad, atol=1e-6, rtol=1e-5)
        assert model.rel.grad.abs().sum() > 0
        model.zero_grad()
    assert counter.frame_count == 2  # a new window recompiles; the same window does not


def test_block_masks_made_outside_or_inside_the_compiled_region():
    q, k, v = inputs(n=45)
    doc = torch.tensor([0] * 20 + [1] * 25)

    def same_document(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    outside = attncc.create_block_mask(same_document, None, None, 45, 45, BLOCK_SIZE=16)
    torch_outside = torch_flex.create_block_mask(torch_flex.and_masks(causal, same_document), None, None, 45, 45,
                                                 device="cpu", BLOCK_SIZE=16)  # fmt: skip
    calls = {
        "attncc outside": lambda q, k, v: attncc.flex_attention(q, k, v, block_mask=outside, enable_gqa=True),
        "torch outside": lambda q, k, v: attncc.flex_attention(q, k, v, block_mask=torch_outside, enable_gqa=True),
        "attncc inside": lambda q, k, v: attncc.flex_attention(
            q, k, v, block_mask=attncc.create_block_mask(same_document, None, None, 45, 45), enable_gqa=True
        ),
    }
    flexes = {label: compiled(call)[0] for label, call in calls.items()}
    reference, _ = dense_attention(q, k, v, mask_mod=same_document)
    for label, flex in flexes.items():
        torch.testing.assert_close(flex(q, k, v).double(), reference, **OUTPUT_TOLERANCE[torch.float32],
                                   msg=lambda m, n=label: f"{n}: {m}")  # fmt: skip
    doc[20:30] = 0  # the document ids are an input of the graph that makes the blocks: new values hold
    reference, _ = dense_attention(q, k, v, mask_mod=same_document)
    torch.testing.assert_close(flexes["attncc inside"](q, k, v).double(), reference, **OUTPUT_TOLERANCE[torch.float32])


def test_torchs_create_block_mask_inside_the_compiled_region():
    q, k, v = inputs()
    flex, counter = compiled(lambda q, k, v: attncc.flex_attention(
        q, k, v, enable_gqa=True, block_mask=torch_flex.create_block_mask(causal, None, None, 37, 45, device="cpu"),
    ))  # fmt: skip
    reference, _ = dense_attention(q, k, v, mask_mod=causal)
    torch.testing.assert_close(flex(q, k, v).double(), reference, **OUTPUT_TOLERANCE[torch.float32])
    assert counter.frame_count == 1


def test_what_torch_compile_cannot_follow_is_refused_with_its_reason():
    q, k, v = inputs(heads=2)
    offset = torch.tensor(3)

    def shifted(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    flex, _ = compiled(lambda q, k, v: attncc.flex_attention(q, k, v, mask_mod=shifted))
    with pytest.raises(Exception, match=r"0-d tensor at mask_mod.<closure 0>, whose value tracing bakes in"):
        flex(q, k, v)

    def nested(q, k, v, size):
        def window(b, h, q_idx, kv_idx):
            return q_idx - kv_idx <= size

        return attncc.flex_attention(q, k, v, mask_mod=window)

    with pytest.raises(Exception, match=r"mask_mod 'window' is defined inside the code torch.compile traces"):
        compiled(nested)[0](q, k, v, 4)
    with pytest.raises(attncc.InputError, match="no attncc plan 'unknown' in this process"):
        torch.ops.attncc.flex_attention(q, k, v, [], "unknown", None)
    flex, _ = compiled(
        lambda q, k, v: attncc.flex_attention(q, k, v, return_aux=torch_flex.AuxRequest(max_scores=True))
    )
    with pytest.raises(Exception, match=r"max_scores=True\) is not supported under torch.compile"):
        flex(q, k, v)
