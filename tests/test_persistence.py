"""Modules holding compiled programs copy and save: deepcopy, pickle, torch.save / torch.load in a fresh process."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import torch

import attncc
from tests.reference import assert_attention_matches, dense_attention

DOC = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])


def _documents(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


BIAS = torch.randn(2, 11, generator=torch.Generator().manual_seed(5))


def _spec() -> attncc.AttentionSpec:
    bias = BIAS.clone()
    return attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, causal=True, mask_mod=_documents,
                                score_mod=lambda score, b, h, q_idx, kv_idx: score + bias[h % 2, kv_idx])  # fmt: skip


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g),
            torch.randn(2, 2, 11, 8, generator=g))  # fmt: skip


def test_deepcopy_and_pickle_give_the_same_program():
    attn = attncc.compile(_spec())
    q, k, v = _inputs()
    expected = attn(q, k, v)
    for copied in (copy.deepcopy(attn), pickle.loads(pickle.dumps(attn))):
        assert copied is not attn and str(copied.graph) == str(attn.graph)
        torch.testing.assert_close(copied(q, k, v), expected, rtol=0, atol=0)
        # a lambda's traced expression stands in for it in the saved spec
        assert isinstance(copied.spec.score_mod, attncc.frontend.mod.TracedMod)
        assert copied.captured is not attn.captured


def test_copy_keeps_gradients_and_its_own_buffers():
    attn = attncc.compile(_spec())
    twin = copy.deepcopy(attn)
    name = next(iter(dict(twin.captured.named_buffers())))
    getattr(twin.captured, name).mul_(0)  # a copy owns its buffers
    q, k, v = (t.requires_grad_() for t in _inputs(1))
    assert not torch.equal(attn(q, k, v), twin(q, k, v))
    twin(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_nn_attention_deepcopy_for_an_ema_copy():
    torch.manual_seed(0)
    layer = attncc.nn.Attention(32, 4, num_kv_heads=2, causal=True)
    ema = copy.deepcopy(layer)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(ema(x), layer(x), rtol=0, atol=0)
    with torch.no_grad():
        for parameter in ema.parameters():
            parameter.mul_(0.5)
    assert not torch.allclose(ema(x), layer(x))


SAVED_MODEL = textwrap.dedent(
    """
    import sys, torch
    import attncc

    model = torch.load(sys.argv[1], weights_only=False)
    q, k, v = torch.load(sys.argv[2])
    torch.save(model(q, k, v, return_lse=True), sys.argv[3])
    """
)


def test_torch_save_and_load_in_a_fresh_process(tmp_path):
    """A fresh process with an empty cache regenerates the program from the saved graph."""
    model = torch.nn.Sequential()
    model.attn = attncc.compile(_spec())
    q, k, v = _inputs(2)
    torch.save(model.attn, tmp_path / "model.pt")
    torch.save((q, k, v), tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(SAVED_MODEL)
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(tmp_path / "fresh-cache")}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "model.pt"), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert any((tmp_path / "fresh-cache").iterdir())
    o, lse = torch.load(tmp_path / "out.pt")
    reference_o, reference_lse = dense_attention(q, k, v, causal=True, mask_mod=_documents,
                                                 score_mod=lambda s, b, h, i, j: s + BIAS[h % 2, j])  # fmt: skip
    assert_attention_matches(o, lse, reference_o, reference_lse, torch.float32)
