"""Batched greedy decoding of requests of different lengths on a paged KV cache.

A tiny Llama-shaped model (RMSNorm, grouped-query attention with rotary embeddings,
SwiGLU MLP; random weights) whose attention layers are ``attncc.nn.Attention``. Each
request's prompt is prefilled into its own pages of a shared ``attncc.PagedKVCache``
(one per layer); then every step decodes one token for all requests at once, each
attending to its own keys only, read through the page table. A finished request
frees its pages for the next one waiting, which is prefilled and joins the batch.

The tokens are checked against the same model run without a cache on each whole
sequence (prompt and generated tokens): they must agree.

    python examples/serve_decode.py [--requests 6] [--slots 3] [--new-tokens 12] [--page-size 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import attncc
from attncc.nn import Attention

VOCAB = 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int):
        super().__init__()
        self.attention_norm = RMSNorm(dim)
        self.attention = Attention(dim, heads, num_kv_heads=kv_heads, causal=True, rope=True, rope_base=500000.0)
        self.mlp_norm = RMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, cache=None, sequences=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cache, sequences=sequences)
        h = self.mlp_norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 8, kv_heads: int = 2, layers: int = 2, hidden: int = 344):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embedding = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor, caches=None, sequences=None) -> torch.Tensor:
        x = self.embedding(tokens)
        for index, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[index], sequences)
        return self.head(self.norm(x))


def serve(model: TinyLlama, prompts: list[torch.Tensor], slots: int, new_tokens: int, page_size: int):
    """Greedy decoding of every prompt, ``slots`` requests at a time; returns each request's new tokens."""
    pages = slots * -(-(max(len(p) for p in prompts) + new_tokens) // page_size)
    caches = [attncc.PagedKVCache(pages, page_size, slots, model.kv_heads, model.head_dim) for _ in model.blocks]
    waiting = list(range(len(prompts)))
    active: dict[int, int] = {}  # slot -> request
    generated: dict[int, list[int]] = {r: [] for r in waiting}
    next_tokens = torch.zeros(slots, dtype=torch.long)
    steps = 0
    while waiting or active:
        for slot in range(slots):  # admit waiting requests into free slots: prefill their prompts
            if slot not in active and waiting:
                request = waiting.pop(0)
                active[slot] = request
                logits = model(prompts[request].unsqueeze(0), caches, sequences=[slot])
                next_tokens[slot] = logits[0, -1].argmax()
                generated[request].append(int(next_tokens[slot]))
        # one step for every slot; an idle slot decodes a dummy token that is never read
        logits = model(next_tokens.unsqueeze(1), caches)
        steps += 1
        next_tokens = logits[:, -1].argmax(-1)
        for slot, request in list(active.items()):
            generated[request].append(int(next_tokens[slot]))
            if len(generated[request]) == new_tokens:
                del active[slot]
        for slot in set(range(slots)) - set(active):  # finished and idle slots free their pages
            for cache in caches:
                cache.erase(slot)
    return generated, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--slots", type=int, default=3, help="requests decoded together")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--page-size", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyLlama().eval()
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 40, (args.requests,), generator=generator).tolist()
    prompts = [torch.randint(0, VOCAB, (length,), generator=generator) for length in lengths]

    with torch.no_grad():
        start = time.perf_counter()
        generated, steps = serve(model, prompts, args.slots, args.new_tokens, args.page_size)
        seconds = time.perf_counter() - start
        agree = True
        for request, prompt in enumerate(prompts):
            tokens = prompt.tolist()
            for token in generated[request][:-1]:
                tokens.append(token)
            logits = model(torch.tensor([tokens]))  # no cache: the whole sequence at once
            expected = logits[0, len(prompt) - 1 :].argmax(-1).tolist()
            same = expected == generated[request]
            agree &= same
            print(
                f"request {request}: prompt {len(prompt):2d} tokens -> {generated[request]}  same as no cache: {same}"
            )
    print(f"{args.requests} requests, {args.slots} slots, pages of {args.page_size}: {steps} batched steps "
          f"in {seconds:.2f} s; all tokens as without a cache: {agree}")  # fmt: skip
    if not agree:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
