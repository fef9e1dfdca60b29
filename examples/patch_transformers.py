"""Run a Hugging Face transformers model with attncc attention and compare it with eager attention.

    python examples/patch_transformers.py                   # a tiny random Llama (GQA), no download
    python examples/patch_transformers.py --config mistral  # sliding window; also gemma2 (soft-capping), qwen2
    python examples/patch_transformers.py --pretrained PATH_OR_ID   # a real checkpoint you have access to

It registers the ``attncc`` attention implementation, switches the model to it with
``model.set_attn_implementation("attncc")``, and prints the largest logit
difference on a left-padded batch and both greedy continuations.
Needs ``pip install 'attncc[transformers]'``.
"""

from __future__ import annotations

import argparse

import torch
import transformers

import attncc.integrations.transformers

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)  # fmt: skip

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=8),
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0, query_pre_attn_scalar=16
    ),  # fmt: skip
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
}


def load(args) -> transformers.PreTrainedModel:
    if args.pretrained:
        return transformers.AutoModelForCausalLM.from_pretrained(args.pretrained, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[args.config](), attn_implementation="eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llama")
    parser.add_argument("--pretrained", help="a local path or hub id; the tiny random config is used otherwise")
    parser.add_argument("--new-tokens", type=int, default=12)
    args = parser.parse_args()

    name = attncc.integrations.transformers.register()
    model = load(args).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0  # left padding: the first sequence is 5 tokens shorter

    results = {}
    for implementation in ("eager", name):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        tokens = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=args.new_tokens,
                                do_sample=False, pad_token_id=0)  # fmt: skip
        results[implementation] = (logits, tokens[:, input_ids.shape[1] :])

    (eager_logits, eager_tokens), (logits, tokens) = results["eager"], results[name]
    valid = attention_mask.bool()  # padded positions see no key; their outputs are not used
    print(f"model: {type(model).__name__}, attention implementation {name!r}")
    print(f"max |logits - eager logits| on non-padded positions: {(logits - eager_logits)[valid].abs().max():.3g}")
    for row in range(tokens.shape[0]):
        print(f"greedy continuation {row}: eager  {eager_tokens[row].tolist()}")
        print(f"greedy continuation {row}: attncc {tokens[row].tolist()}")
    print("same tokens" if torch.equal(tokens, eager_tokens) else "the continuations differ")


if __name__ == "__main__":
    main()
