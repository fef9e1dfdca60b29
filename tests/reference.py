"""An independent dense float64 attention written for the tests, straight from DESIGN.md.

It calls the user's mods on broadcast index tensors (no tracing, no sympy), so it
shares nothing with attncc's frontends, interpreter or backends.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(heads: int) -> torch.Tensor:
    """Press et al.'s slopes, including their rule for a head count that is not a power of two."""

    def power_of_two(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two(closest)
    if closest != heads:
        slopes += power_of_two(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


def rope_frequencies(head_dim: int, theta: float, rotary_dim=None, scaling=None) -> torch.Tensor:
    """inv_freq of each rotated pair in float64, with transformers' ``rope_parameters`` scalings."""
    dim = head_dim if rotary_dim is None else rotary_dim
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rope_type = (scaling or {}).get("rope_type")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        smooth = (context / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelength < context / high, inv_freq,
                           torch.where(wavelength > context / low, inv_freq / factor, blended))  # fmt: skip
    return inv_freq


def rotate(x, positions, theta: float, rotary_dim=None, interleaved=False, scaling=None, angle_dtype=torch.float64):
    """x [B, H, L, D] turned by RoPE at positions [B or 1, L]: pairs (i, i + dim/2), or (2i, 2i + 1) interleaved,
    of the first ``rotary_dim`` columns rotate by the angle position * inv_freq[i]; the other columns stay.

    ``angle_dtype=torch.float32``: the angle is the float32 product of float32 position and frequency, as
    attncc's kernels compute it (at position p its rounding moves the angle by up to p * 2^-24, more than
    float32 attention's tolerance once p is a few tens); cos, sin and the rotation stay float64.
    """
    dim = x.shape[-1] if rotary_dim is None else rotary_dim
    frequencies = rope_frequencies(x.shape[-1], theta, rotary_dim, scaling).to(angle_dtype)
    angles = (positions.to(angle_dtype)[:, None, :, None] * frequencies).double()
    cos, sin = torch.cos(angles), torch.sin(angles)
    turned, rest = x[..., :dim], x[..., dim:]
    if interleaved:
        first, second = turned[..., 0::2], turned[..., 1::2]
        pairs = torch.stack((first * cos - second * sin, second * cos + first * sin), dim=-1)
        turned = pairs.flatten(-2)
    else:
        first, second = turned[..., : dim // 2], turned[..., dim // 2 :]
        turned = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return torch.cat((turned, rest), dim=-1)


def turn_q_and_k(q, k, rope: dict, q_positions=None, kv_positions=None):
    """q [B, H, N, D] and k [B, Hkv, M, D] turned by RoPE (``rotate``'s keywords) in float64, at the given
    positions or by default query i at M - N + i and key j at j."""
    n, m = q.shape[2], k.shape[2]
    q_positions = torch.arange(m - n, m)[None] if q_positions is None else q_positions
    kv_positions = torch.arange(m)[None] if kv_positions is None else kv_positions
    return rotate(q.double(), q_positions, **rope), rotate(k.double(), kv_positions, **rope)


def dense_attention(q, k, v, *, scale=None, score_mod=None, mask_mod=None, causal=False, top_left=False,
                    window=None, softcap=None, alibi=False, rope=None, q_positions=None, kv_positions=None,
                    rotated_dtype=None):  # fmt: skip
    """o [B, H, N, Dv] and lse [B, H, N] in float64.

    ``rope``: a dict of ``rotate``'s keywords; q and k turn at ``q_positions`` [B, N] and
    ``kv_positions`` [B, M], by default query i at M - N + i and key j at j. ``rotated_dtype``:
    the turned q and k are rounded to it (as a kernel that feeds them to q . k in the input dtype).
    """
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, n, d = q.shape
    m = k.shape[2]
    if rope is not None:
        q, k = turn_q_and_k(q, k, rope, q_positions, kv_positions)
        if rotated_dtype is not None:
            q, k = q.to(rotated_dtype).double(), k.to(rotated_dtype).double()
    groups = heads // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    i = torch.arange(n).view(1, 1, -1, 1)
    j = torch.arange(m).view(1, 1, 1, -1)
    scores = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(d) if scale is None else scale)
    position = i if top_left else i + (m - n)
    if alibi:
        scores = scores - alibi_slopes(heads).view(1, -1, 1, 1) * (position - j).abs()
    if score_mod is not None:
        scores = torch.broadcast_to(score_mod(scores, b, h, i, j), scores.shape).double()
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keep = torch.ones(1, 1, n, m, dtype=torch.bool)
    if causal:
        keep = keep & (j <= position)
    if window is not None:
        left, right = window
        keep = keep & (j >= position - left) & (j <= position + right)
    if mask_mod is not None:
        keep = keep & mask_mod(b, h, i, j)
    scores = scores.masked_fill(~torch.broadcast_to(keep, scores.shape), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v, lse


# |out - ref| <= atol + rtol * |ref| per input dtype, against the reference on the same
# (already rounded) inputs. fp32 accumulates a few ulps of rounding; fp16 / bf16 outputs
# are in addition rounded to 11 / 8 significant bits (relative error <= 2^-12 / 2^-9).
OUTPUT_TOLERANCE = {
    torch.float32: dict(atol=2e-6, rtol=2e-6),
    torch.float16: dict(atol=1e-3, rtol=5e-4),
    torch.bfloat16: dict(atol=8e-3, rtol=4e-3),
}
# lse is float32 whatever the input dtype.
LSE_TOLERANCE = dict(atol=2e-6, rtol=2e-6)


def assert_attention_matches(o, lse, reference_o, reference_lse, dtype):
    """o in the input dtype within its tolerance; lse within fp32's, -inf exactly where the reference has it."""
    assert o.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), reference_o, **OUTPUT_TOLERANCE[dtype])
    torch.testing.assert_close(lse.double(), reference_lse, **LSE_TOLERANCE)
