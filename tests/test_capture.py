"""FX capture: attention written by hand and SDPA calls are found, rewritten to attncc, and equal the original."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attncc
from attncc.integrations.chain import ChainAttention

# A captured model against the original model, both float32: attncc's float32 streaming
# softmax and the model's own softmax differ by rounding only.
FLOAT32 = dict(atol=2e-6, rtol=2e-6)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Llama's repeat_kv."""
    batch, heads, length, dim = x.shape
    if groups == 1:
        return x
    return x[:, :, None, :, :].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


class LlamaAttention(nn.Module):
    """Eager Llama attention: GQA through repeat_kv, an additive mask, float32 softmax, dropout."""

    def __init__(self, embed=32, heads=4, kv_heads=2, softcap=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, embed // heads
        self.q_proj = nn.Linear(embed, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(embed, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(embed, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, embed, bias=False)
        self.scaling = self.head_dim**-0.5
        self.softcap = softcap

    def forward(self, x, mask):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        k, v = repeat_kv(k, self.heads // self.kv_heads), repeat_kv(v, self.heads // self.kv_heads)
        weights = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if self.softcap is not None:
            weights = torch.tanh(weights / self.softcap) * self.softcap
        weights = weights + mask
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=0.1, training=self.training)
        out = torch.matmul(weights, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class NanoGPT(nn.Module):
    """nanoGPT's attention (k permuted, masked_fill from a causal buffer, nn.Dropout), an SDPA branch and a head."""

    def __init__(self, embed=32, heads=4, block=16):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(embed, 3 * embed)
        self.attn_dropout = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))
        self.head = nn.Linear(embed, 5)

    def forward(self, x):
        batch, length, embed = x.shape
        q, k, v = self.c_attn(x).split(embed, dim=2)
        q = q.view(batch, length, self.heads, -1).transpose(1, 2)
        k = k.view(batch, length, self.heads, -1).permute(0, 2, 3, 1)
        v = v.view(batch, length, self.heads, -1).transpose(1, 2)
        att = (q @ k) * (1.0 / math.sqrt(embed // self.heads))
        att = att.masked_fill(self.bias[:, :, :length, :length] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(batch, length, embed)
        z = F.scaled_dot_product_attention(q, k.transpose(-2, -1), v, is_causal=True)
        y = y + z.transpose(1, 2).reshape(batch, length, embed)
        return F.softmax(self.head(y), dim=-1)


def attention_modules(graph_module) -> list[ChainAttention]:
    return [m for m in graph_module.modules() if isinstance(m, ChainAttention)]


def call_kinds(graph_module) -> set[str]:
    return {getattr(n.target, "__name__", str(n.target)) for n in graph_module.graph.nodes if n.op != "placeholder"}


def padding_mask(batch: int, length: int, padded: int) -> torch.Tensor:
    """An additive causal + left-padding mask [B, 1, N, N] with finfo.min, as transformers' eager mask."""
    keep = torch.ones(length, length).tril().bool().expand(batch, 1, length, length).clone()
    keep[0, :, :, :padded] = False
    return torch.zeros(batch, 1, length, length).masked_fill(~keep, torch.finfo(torch.float32).min)


def test_llama_attention_is_rewritten_with_gqa_and_a_runtime_mask():
    torch.manual_seed(0)
    model = LlamaAttention().eval()
    x, mask = torch.randn(2, 7, 32), padding_mask(2, 7, 2)
    captured = attncc.capture(model, (x, mask))
    report = captured.attncc_report
    assert [(f.form, f.rewritten) for f in report.findings] == [("hand-written", True)]
    (attention,) = attention_modules(captured)
    spec = attention.spec
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 8)
    assert math.isclose(spec.scale, 8**-0.5) and [s.op for s in spec.steps] == ["add_tensor"]
    assert not {"softmax", "matmul", "expand", "dropout"} & call_kinds(captured)
    assert report.max_error < 1e-5
    # New values and a new length: the mask is an input, the graph is shape-generic.
    for x, mask in ((torch.randn(2, 7, 32), padding_mask(2, 7, 4)), (torch.randn(3, 12, 32), padding_mask(3, 12, 5))):
        with torch.no_grad():
            torch.testing.assert_close(captured(x, mask), model(x, mask), **FLOAT32)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([LlamaAttention(), LlamaAttention()])

    def forward(self, x, mask):
        for layer in self.layers:
            x = x + layer(x, mask)
        return x


@pytest.mark.parametrize("method", ["fx", "export"])
def test_each_layer_is_rewritten_and_reported_by_module_path(method):
    torch.manual_seed(0)
    model = TwoLayers().eval()
    x, mask = torch.randn(2, 7, 32), padding_mask(2, 7, 2)
    captured = attncc.capture(model, (x, mask), method=method)
    assert [(f.module, f.rewritten) for f in captured.attncc_report.findings] == [
        ("layers.0", True),
        ("layers.1", True),
    ]
    assert [m.spec.num_kv_heads for m in attention_modules(captured)] == [2, 2]
    with torch.no_grad():
        torch.testing.assert_close(captured(x, mask), model(x, mask), **FLOAT32)


def test_soft_capping_becomes_scale_tanh_and_multiply():
    torch.manual_seed(0)
    model = LlamaAttention(softcap=2.0).eval()
    x, mask = 3 * torch.randn(2, 7, 32), padding_mask(2, 7, 1)
    captured = attncc.capture(model, (x, mask))
    (attention,) = attention_modules(captured)
    assert [s.op for s in attention.spec.steps] == ["tanh", "mul", "add_tensor"]
    assert math.isclose(attention.spec.scale, 8**-0.5 / 2.0)
    with torch.no_grad():
        torch.testing.assert_close(captured(x, mask), model(x, mask), **FLOAT32)


def test_nanogpt_through_export_rewrites_both_forms_and_leaves_the_classifier_softmax():
    torch.manual_seed(0)
    model = NanoGPT().eval()
    x = torch.randn(2, 9, 32)
    captured = attncc.capture(model, (x,), method="export")
    found = {(f.form, f.rewritten) for f in captured.attncc_report.findings}
    assert found == {("hand-written", True), ("scaled_dot_product_attention", True), ("hand-written", False)}
    (classifier,) = captured.attncc_report.unmatched
    assert "the softmax input is 3-D [2, 9, 5]" in classifier.detail
    hand, sdpa = attention_modules(captured)
    assert hand.spec.masks == ((0, False),) and not hand.spec.steps and hand.spec.causal is False
    assert sdpa.spec.causal == "top_left" and not sdpa.spec.masks
    with torch.no_grad():
        torch.testing.assert_close(captured(x), model(x), **FLOAT32)


class SdpaModel(nn.Module):
    def forward(self, q, k, v, keep, bias):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True, scale=0.3)
        b = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
                                           attn_mask=bias)  # fmt: skip
        return a + b


def test_sdpa_with_boolean_and_additive_masks_and_gqa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    keep = torch.rand(2, 1, 6, 10) > 0.3
    keep[..., 0] = True
    bias = torch.randn(4, 6, 10)
    captured = attncc.capture(SdpaModel(), (q, k, v, keep, bias))
    first, second = attention_modules(captured)
    assert (first.spec.num_kv_heads, first.spec.scale, first.spec.masks) == (2, 0.3, ((0, True),))
    assert second.spec.num_kv_heads == 4 and [s.op for s in second.spec.steps] == ["add_tensor"]
    with torch.no_grad():
        torch.testing.assert_close(captured(q, k, v, keep, bias), SdpaModel()(q, k, v, keep, bias), **FLOAT32)


class UnusualAttention(nn.Module):
    """Attention-like code that attncc must leave alone, one reason per branch."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, q, k, v, gate):
        scores = q @ k.transpose(-2, -1)
        returned = F.softmax(scores * 0.5, dim=-1)  # the weights are also returned
        over_queries = F.softmax(q @ k.transpose(-2, -1), dim=-2) @ v  # normalised over queries
        gated = F.softmax((q @ k.transpose(-2, -1)) * gate, dim=-1) @ v  # scores times a tensor
        dropped = self.dropout(F.softmax(q @ k.transpose(-2, -1), dim=-1)) @ v  # dropout in training mode
        einsum = F.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k), dim=-1) @ v
        return returned @ v + over_queries + gated + dropped + einsum, returned


def test_patterns_it_does_not_understand_are_reported_and_left_alone():
    torch.manual_seed(0)
    model = UnusualAttention().train()
    inputs = (torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.rand(1, 2, 5, 5))
    captured = attncc.capture(model, inputs)
    report = captured.attncc_report
    assert not report.matched and report.max_error is None
    reasons = [f.detail for f in report.unmatched]
    assert len(reasons) == 5
    assert "the attention weights (softmax) feed 2 nodes" in reasons[0]
    assert "softmax over dim -2, not the last (keys) dim" in reasons[1]
    assert "does not add to or scale the scores by a constant or a broadcast tensor" in reasons[2]
    assert "dropout dropout (p=0.5) is in training mode" in reasons[3]
    assert "einsum" in reasons[4] and "is not understood" in reasons[4]
    assert not attention_modules(captured)
    torch.manual_seed(1)
    expected = model(*inputs)
    torch.manual_seed(1)
    for got, want in zip(captured(*inputs), expected):
        torch.testing.assert_close(got, want)


def test_report_text_and_verbose(capsys):
    torch.manual_seed(0)
    captured = attncc.capture(LlamaAttention().eval(), (torch.randn(1, 5, 32), torch.zeros(1, 1, 5, 5)), verbose=True)
    printed = capsys.readouterr().out
    assert printed.strip() == str(captured.attncc_report)
    assert printed.startswith("attncc capture: 1 attention rewritten, 0 left as is")
    assert "heads=4/2 head_dim=8 scale=0.353553 score: + t0" in printed
    assert "check on the example inputs: max |new - original| =" in printed


def test_the_check_catches_a_wrong_rewrite(monkeypatch):
    capture_module = importlib.import_module("attncc.capture")  # attncc.capture is the function
    monkeypatch.setattr(capture_module, "_fold_scale", lambda steps: (1.0, [s for s in steps if s.op != "mul"]))
    torch.manual_seed(0)
    with pytest.raises(attncc.ValidationError, match="the rewritten model differs from the original by up to"):
        attncc.capture(LlamaAttention().eval(), (3 * torch.randn(1, 5, 32), torch.zeros(1, 1, 5, 5)))


class SlicesABuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.ones(8))

    def forward(self, x):
        return x * self.table[: x.shape[0]].sum()


def test_usage_errors_name_what_is_allowed():
    with pytest.raises(attncc.InputError, match="model is a function: a torch.nn.Module is allowed"):
        attncc.capture(lambda x: x, (torch.ones(1),))
    with pytest.raises(attncc.InputError, match="method='jit' is invalid: 'fx' or 'export' is allowed"):
        attncc.capture(nn.Identity(), (torch.ones(1),), method="jit")
    with pytest.raises(attncc.AttnccError, match="torch.fx could not trace SlicesABuffer: .*method='export'"):
        attncc.capture(SlicesABuffer(), (torch.ones(3),))
