"""Hugging Face transformers with attn_implementation="attncc": logits, greedy generation and gradients vs eager.

Models are built from small configs with random weights (no downloads). transformers is
an optional extra; without it these tests are skipped.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional extra: pip install 'attncc[transformers]'"
)

import attncc  # noqa: E402
from attncc.integrations import transformers as attncc_transformers  # noqa: E402
from attncc.integrations.chain import Step  # noqa: E402

# attncc against transformers' eager attention, both float32, through two layers: the two
# softmaxes round differently and nothing else differs.
FLOAT32 = dict(atol=1e-5, rtol=1e-5)

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
             initializer_range=0.2)  # large enough weights that attention is far from uniform  # fmt: skip

DECODERS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral-sliding-window": lambda: transformers.MistralConfig(**SMALL, sliding_window=4),
    "gemma2-softcap-sliding-window": lambda: transformers.Gemma2Config(
        **SMALL,
        head_dim=8,
        sliding_window=4,
        attn_logit_softcapping=2.0,
        query_pre_attn_scalar=8,
        final_logit_softcapping=None,
    ),  # fmt: skip
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    return attncc_transformers.register()


def decoder(name: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(DECODERS[name](), attn_implementation="eager")


def left_padded_batch(vocab_size: int, length: int = 10, padding: int = 3):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[0, :padding] = 0
    return input_ids, attention_mask


def run_both(model, run):
    """run(model) with eager attention, then with attncc."""
    model.set_attn_implementation("eager")
    eager = run(model)
    model.set_attn_implementation("attncc")
    return eager, run(model)


def test_register_installs_the_attention_function_and_sdpa_masks(registered):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert registered == "attncc"
    assert "attncc" in ALL_ATTENTION_FUNCTIONS and ALL_MASK_ATTENTION_FUNCTIONS["attncc"] is sdpa_mask


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_logits_with_padding_match_eager(name):
    model = decoder(name).eval()
    input_ids, attention_mask = left_padded_batch(model.config.vocab_size)
    with torch.no_grad():
        eager, ours = run_both(model, lambda m: m(input_ids=input_ids, attention_mask=attention_mask).logits)
    valid = attention_mask.bool()  # padded queries see no key: eager averages garbage, attncc gives zeros
    torch.testing.assert_close(ours[valid], eager[valid], **FLOAT32)
    assert float((eager[valid] - eager[valid].mean()).abs().max()) > 0.1  # the logits are not trivially flat


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generation_with_the_kv_cache_gives_the_same_tokens_and_logits(name):
    model = decoder(name).eval()
    input_ids, attention_mask = left_padded_batch(model.config.vocab_size)

    def generate(m):
        return m.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)  # fmt: skip

    eager, ours = run_both(model, generate)
    assert ours.sequences.shape == (2, 18)
    assert torch.equal(ours.sequences, eager.sequences)
    assert len(ours.logits) == 8  # prefill, then seven single-token steps against the cache
    for step, (logits, eager_logits) in enumerate(zip(ours.logits, eager.logits)):
        torch.testing.assert_close(logits, eager_logits, **FLOAT32, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("name", ["llama", "gemma2-softcap-sliding-window"])
def test_one_training_step_gives_the_same_gradients(name):
    model = decoder(name).train()
    input_ids, attention_mask = left_padded_batch(model.config.vocab_size)
    # Token t is predicted at position t - 1: leave out what padded positions predict (a padded query
    # sees no key, where eager attention averages every value and attncc gives zeros).
    from_padding = torch.zeros_like(attention_mask, dtype=torch.bool)
    from_padding[:, 1:] = attention_mask[:, :-1] == 0
    labels = input_ids.masked_fill(from_padding | (attention_mask == 0), -100)

    def gradients(m):
        m.zero_grad()
        m(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    eager, ours = run_both(model, gradients)
    assert eager.keys() == ours.keys() and len(eager) > 10
    for parameter, grad in eager.items():
        torch.testing.assert_close(ours[parameter], grad, **FLOAT32, msg=lambda m, p=parameter: f"{p}: {m}")


def test_bert_with_padding_matches_eager_in_inference_and_training():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     initializer_range=0.2)  # fmt: skip
    model = transformers.BertForMaskedLM._from_config(config, attn_implementation="eager")
    input_ids, attention_mask = left_padded_batch(64)
    attention_mask = attention_mask.flip(-1)  # right padding, as BERT tokenizers do
    labels = input_ids.masked_fill(attention_mask == 0, -100)

    def run(m):
        m.zero_grad()
        output = m(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        output.loss.backward()
        return output.logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    (eager_logits, eager_grads), (logits, grads) = run_both(model, run)
    torch.testing.assert_close(logits, eager_logits, **FLOAT32)
    for parameter, grad in eager_grads.items():
        torch.testing.assert_close(grads[parameter], grad, **FLOAT32, msg=lambda m, p=parameter: f"{p}: {m}")


def test_masks_map_to_specs():
    q, k, v = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8)
    none = attncc_transformers.attention_spec(q, k, v, None, 0.5, None, True)
    assert (none.causal, none.scale, none.masks, none.steps) == ("top_left", 0.5, (), ())
    single_query = attncc_transformers.attention_spec(q[:, :, :1], k, v, None, None, None, True)
    assert single_query.causal is False and single_query.scale == 8**-0.5
    boolean = attncc_transformers.attention_spec(q, k, v, torch.ones(1, 1, 3, 5, dtype=torch.bool), None, 2.0, False)
    assert (boolean.masks, boolean.softcap, boolean.steps) == (((0, True),), 2.0, ())
    additive = attncc_transformers.attention_spec(q, k, v, torch.zeros(1, 1, 3, 5), None, 2.0, False)
    assert additive.steps == (Step("softcap", 2.0), Step("add_tensor", tensor=0)) and additive.softcap is None


def test_unsupported_arguments_raise_clear_errors():
    q, k, v = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8)
    module = torch.nn.Module()
    with pytest.raises(attncc.AttnccError, match="attention dropout=0.1 is not supported by attncc"):
        attncc_transformers.attention_forward(module, q, k, v, None, dropout=0.1)
    with pytest.raises(attncc.AttnccError, match=r"attention sinks \(s_aux\) is not supported"):
        attncc_transformers.attention_forward(module, q, k, v, None, s_aux=torch.zeros(4))
    with pytest.raises(attncc.InputError, match=r"attention_mask has shape \(3, 5\): a 4-D mask"):
        attncc_transformers.attention_forward(module, q, k, v, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(attncc.InputError, match="attention_mask has dtype torch.int64: a boolean"):
        attncc_transformers.attention_forward(module, q, k, v, torch.ones(1, 1, 3, 5, dtype=torch.long))
    with pytest.raises(attncc.BackendError, match="backend='nope' is unknown"):
        attncc_transformers.register(backend="nope")


def test_generation_steps_run_the_decoding_path(monkeypatch):
    """generate(): the single-token steps run the program's decoding path (split keys, packed heads)."""
    from attncc.integrations import chain

    model = decoder("llama").eval()
    model.set_attn_implementation("attncc")
    input_ids, attention_mask = left_padded_batch(model.config.vocab_size)

    def generate():
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                              pad_token_id=0)  # fmt: skip

    first = generate()  # compiles the programs
    query_lengths = []
    for program in chain._PROGRAMS.values():
        decoding = getattr(program.module, "FlashAttentionDecode", None)
        if decoding is not None:
            apply = decoding.apply
            monkeypatch.setattr(
                decoding, "apply", lambda q, *rest, run=apply: query_lengths.append(q.shape[2]) or run(q, *rest)
            )
    assert torch.equal(generate(), first)
    assert query_lengths == [1] * 3 * model.config.num_hidden_layers  # three steps after the prefill, per layer
