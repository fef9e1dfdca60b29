"""merge_attention_states: partial attention over disjoint key sets merges into attention over the union."""

import pytest
import torch

import attncc
from tests.reference import dense_attention


def _attend(q, k, v, keep):
    """float64 attention and lse of q over the keys where keep is True (o = 0, lse = -inf for empty rows)."""
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(keep.any(-1, keepdim=True), torch.softmax(s, -1), torch.zeros_like(s)).nan_to_num(0.0)
    return p @ v.double(), lse


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_merge_equals_attention_over_union(parts):
    torch.manual_seed(parts)
    B, H, N, M, D = 2, 3, 7, 45, 16
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, H, M, D), torch.randn(B, H, M, D)
    keep = torch.rand(B, H, N, M) < 0.6
    keep[0, 0, 3] = False  # a row that sees nothing in any part
    owner = torch.randint(0, parts, (M,))
    owner[:parts] = torch.arange(parts)
    states = [_attend(q, k, v, keep & (owner == p)) for p in range(parts)]
    o, lse = attncc.merge_attention_states([s[0].float() for s in states], [s[1].float() for s in states])
    o_ref, lse_ref = _attend(q, k, v, keep)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.double(), lse_ref, atol=2e-6, rtol=0)
    assert torch.isneginf(lse[0, 0, 3]) and (o[0, 0, 3] == 0).all()
    assert not o.isnan().any()


def test_merge_ignores_the_output_of_a_part_without_keys():
    torch.manual_seed(0)
    o_a, lse_a = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4)
    garbage = torch.full((1, 2, 4, 8), float("nan"))
    o, lse = attncc.merge_attention_states([o_a, garbage], [lse_a, torch.full((1, 2, 4), float("-inf"))])
    torch.testing.assert_close(o, o_a)
    torch.testing.assert_close(lse, lse_a)


def test_merge_gradients_match_attention_over_union():
    torch.manual_seed(1)
    B, H, N, M, D = 1, 2, 5, 20, 8
    q = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(B, H, M, D, dtype=torch.float64), torch.randn(B, H, M, D, dtype=torch.float64)
    keep = torch.ones(B, H, N, M, dtype=torch.bool)
    keep[..., 2, :] = False
    first = torch.arange(M) < 8
    parts = [_attend(q, k, v, keep & first), _attend(q, k, v, keep & ~first)]
    o, lse = attncc.merge_attention_states([p[0] for p in parts], [p[1] for p in parts])
    (o.sum() + lse.nan_to_num(neginf=0.0).sum()).backward()
    grad_merged = q.grad.clone()
    q.grad = None
    o_ref, lse_ref = _attend(q, k, v, keep)
    (o_ref.sum() + lse_ref.nan_to_num(neginf=0.0).sum()).backward()
    assert not grad_merged.isnan().any()
    torch.testing.assert_close(grad_merged, q.grad)


def test_merge_of_compiled_halves_matches_reference():
    torch.manual_seed(2)
    B, H, N, M, D = 1, 4, 6, 33, 16
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, H, M, D), torch.randn(B, H, M, D)
    first = attncc.flex_attention(q, k[:, :, :20], v[:, :, :20], return_lse=True)
    second = attncc.flex_attention(q, k[:, :, 20:], v[:, :, 20:], return_lse=True)
    o, _ = attncc.merge_attention_states([first[0], second[0]], [first[1], second[1]])
    torch.testing.assert_close(o.double(), dense_attention(q, k, v)[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "outputs, lses, message",
    [
        ([], [], "at least one part"),
        ([torch.zeros(1, 2, 3)], [], "one lse per output"),
        ([torch.zeros(1, 2, 3)], [torch.zeros(1, 3)], r"lses\[0\] has shape \(1, 3\)"),
        ([torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)], [torch.zeros(1, 2)] * 2, r"outputs\[1\] has shape"),
        ([torch.zeros(1, 2, 3)], [torch.zeros(1, 2, dtype=torch.long)], r"lses\[0\] is Tensor: a float tensor"),
        (["x"], [torch.zeros(1)], r"outputs\[0\] is str"),
    ],
)
def test_merge_bad_input(outputs, lses, message):
    with pytest.raises(attncc.InputError, match=message):
        attncc.merge_attention_states(outputs, lses)
