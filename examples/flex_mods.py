"""FlexAttention-style mods compiled by attncc: packed documents with a learned relative bias.

Run: python examples/flex_mods.py
"""

import torch

import attncc

torch.manual_seed(0)
heads, head_dim, radius = 8, 64, 32

# Three documents packed into one sequence; a token sees earlier tokens of its own document.
lengths = torch.tensor([300, 212, 512])
doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
# A T5/Swin-style bias table per head, indexed by the clamped relative position.
bias = 0.1 * torch.randn(heads, 2 * radius + 1)


def mask_mod(b, h, q_idx, kv_idx):
    return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)


def score_mod(score, b, h, q_idx, kv_idx):
    return score + bias[h, (kv_idx - q_idx).clamp(-radius, radius) + radius]


n = int(lengths.sum())
q, k, v = (torch.randn(1, heads, n, head_dim) for _ in range(3))

# Drop-in for torch.nn.attention.flex_attention.
o, lse = attncc.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, return_lse=True)
print(f"flex_attention: o {tuple(o.shape)} {o.dtype}, lse {tuple(lse.shape)}")

# The same as a compiled module: inspect its IR, then check it against the float64 reference.
spec = attncc.AttentionSpec(num_heads=heads, head_dim=head_dim, score_mod=score_mod, mask_mod=mask_mod)
attn = attncc.compile(spec)
print(attn.graph)
assert torch.equal(attn(q, k, v), o)

# Captured tensors are runtime inputs: a new packing reuses the compiled program.
other = torch.repeat_interleave(torch.arange(2), torch.tensor([512, 512]))
o2 = attn(q, k, v, doc=other)
print(f"new document layout, same program: max |o2 - o| = {float((o2 - o).abs().max()):.3f}")

report = attncc.validate(spec)
print("validated against the float64 reference:", "ok" if report.ok else "MISMATCH")
