"""Train a tiny GPT whose attention is attncc.nn.Attention on a synthetic copy task.

Each sequence is 16 random tokens followed by the same 16 tokens again. The first
half cannot be predicted; the second half can only be predicted by attending back
16 positions, so the loss on it falls only if attention (causal, GQA, RoPE, all
compiled by attncc, forward and recomputing backward) learns to look there.

    python examples/train_tiny_gpt.py [--steps 100] [--compile]

``--compile`` trains ``torch.compile(model, fullgraph=True)``: attncc's programs are
custom ops, so the whole model is one graph (the first step then includes compiling
it). The default 100 steps take well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from attncc.nn import Attention

VOCAB = 16
HALF = 16


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, num_kv_heads=kv_heads, causal=True, rope=True)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyGPT(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def copy_batch(batch: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(0, VOCAB, (batch, HALF), generator=generator)
    return torch.cat([first, first], dim=1)


def copy_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting the second half (positions HALF..2*HALF-1) from what precedes it."""
    logits = model(tokens[:, :-1])
    predicted = logits[:, HALF - 1 :]
    return nn.functional.cross_entropy(predicted.reshape(-1, VOCAB), tokens[:, HALF:].reshape(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="train torch.compile(model, fullgraph=True)")
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = TinyGPT()
    step_model = torch.compile(model, fullgraph=True) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"chance level: {math.log(VOCAB):.3f}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = copy_loss(step_model, copy_batch(args.batch, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 25 == 0:
            print(f"step {step:4d}  copy loss {loss.item():.3f}  ({time.perf_counter() - start:.1f} s)")
    with torch.no_grad():
        held_out = copy_loss(model, copy_batch(256, torch.Generator().manual_seed(1))).item()
    print(f"held-out copy loss {held_out:.3f} (chance {math.log(VOCAB):.3f})")


if __name__ == "__main__":
    main()
