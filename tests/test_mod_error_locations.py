"""A ModError names the user's code: the line of the mod, or of the call when the mod has none.

Mods that are no Python function (a builtin such as ``torch.addcmul``) have no line of their
own; their error named attncc's ``flex.py`` before. An ``nn.Module`` mod is traced through.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attncc

HERE = "test_mod_error_locations.py"


def qkv():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 2, 5, 8, generator=generator), *torch.randn(2, 1, 2, 7, 8, generator=generator)


def line_of(text: str) -> int:
    """The number of the line of this file that holds ``text``."""
    lines = Path(__file__).read_text(encoding="utf-8").splitlines()
    return 1 + next(i for i, line in enumerate(lines) if text in line and "line_of(" not in line)


def test_a_builtin_mod_names_the_call_not_attncc():
    q, k, v = qkv()
    with pytest.raises(attncc.ModError) as info:
        attncc.flex_attention(q, k, v, mask_mod=torch.addcmul)  # the call
    message = str(info.value)
    assert f"torch.addcmul is not supported in a mask_mod at {HERE}:{line_of('# the call')}" in message
    assert "flex.py" not in message


@pytest.mark.parametrize("entry", ["flex_attention", "compile", "create_block_mask"])
def test_every_entry_point_names_the_mods_line(entry):
    def mask_mod(b, h, q_idx, kv_idx):
        return torch.lgamma(q_idx) > 0  # the unsupported op

    q, k, v = qkv()
    calls = {
        "flex_attention": lambda: attncc.flex_attention(q, k, v, mask_mod=mask_mod),
        "compile": lambda: attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=8, mask_mod=mask_mod)),
        "create_block_mask": lambda: attncc.create_block_mask(mask_mod, 1, 2, 5, 7),
    }
    with pytest.raises(attncc.ModError, match=f"at {HERE}:{line_of('# the unsupported op')}: "):
        calls[entry]()


class Biased(torch.nn.Module):
    def __init__(self, unsupported: bool):
        super().__init__()
        self.bias = torch.randn(7, generator=torch.Generator().manual_seed(1))
        self.cap = torch.nn.Tanh()
        self.unsupported = unsupported

    def forward(self, score, b, h, q_idx, kv_idx):
        if self.unsupported:
            return torch.lgamma(score)  # lgamma in a module
        return 5 * self.cap(score / 5) + self.bias[kv_idx]


def test_a_module_mod_is_traced_through_and_its_errors_name_its_line():
    from tests.reference import dense_attention

    q, k, v = qkv()
    mod = Biased(unsupported=False)
    o = attncc.flex_attention(q, k, v, score_mod=mod)
    torch.testing.assert_close(o.double(), dense_attention(q, k, v, score_mod=mod)[0], atol=2e-6, rtol=2e-6)
    with pytest.raises(attncc.ModError, match=f"torch.lgamma is not supported in a score_mod at {HERE}:"):
        attncc.flex_attention(q, k, v, score_mod=Biased(unsupported=True))
    with pytest.raises(attncc.ModError, match=f":{line_of('# lgamma in a module')}: "):
        attncc.flex_attention(q, k, v, score_mod=Biased(unsupported=True))
