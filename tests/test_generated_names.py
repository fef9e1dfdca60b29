"""User-chosen names never meet generated names: captured tensors live in a namespace of their own.

The property: whatever a captured tensor is called (any identifier a backend's generated
source uses, a Python keyword or builtin, or a Unicode spelling that Python's NFKC
normalisation turns into one of those), every backend computes what the reference does.
"""

from __future__ import annotations

import builtins
import functools
import keyword
import os
import unicodedata

import pytest
import sympy
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attncc
from attncc.backends import BACKENDS
from attncc.backends.source import CapturedNames, python_names
from attncc.frontend.mod import Captured, TracedMod
from attncc.ir.expr import captured_symbol, h, kv_idx, q_idx, score
from tests.reference import assert_attention_matches, dense_attention
from tests.test_fuzz import why_not_runnable

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

N, M = 5, 7
# Triton's interpreter runs each program in Python; the cuda backend builds each for its host emulation
EXAMPLES = {"triton": 4, "cuda": 3}
REPORTED = ["k_f", "ｋ_f", "masked", "ctx", "cls", "out", "torch", "rows", "keep", "float", "s"]


def fullwidth(name: str) -> str:
    """The same name in fullwidth letters and digits, which NFKC (and so Python) reads as ``name``."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in name)


def qkv(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 2, N, 16, generator=generator),
        torch.randn(1, 2, M, 16, generator=generator),
        torch.randn(1, 2, M, 16, generator=generator),
    )


def program(bias_name: str, doc_name: str, backend: str):
    """A score_mod adding ``bias[h, kv_idx]`` and a document mask over ``doc``, under the given names."""
    bias = torch.randn(2, M, generator=torch.Generator().manual_seed(1))
    doc = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    bias_symbol, doc_symbol = captured_symbol(bias_name, "f32"), captured_symbol(doc_name, "i64")
    score_mod = TracedMod(score + bias_symbol[h, kv_idx], (Captured(bias_name, "f32", 2, bias, (2, M)),))
    mask_mod = TracedMod(sympy.Eq(doc_symbol[q_idx], doc_symbol[kv_idx]), (Captured(doc_name, "i64", 1, doc, (M,)),))
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, score_mod=score_mod, mask_mod=mask_mod)
    reference = {
        "score_mod": lambda s, b, h, i, j: s + bias.double()[h, j],
        "mask_mod": lambda b, h, i, j: doc[i] == doc[j],
    }
    return attncc.compile(spec, backend=backend), reference


@functools.cache
def generated_identifiers(backend: str) -> list[str]:
    """Every name the backend's generated source for a representative program uses."""
    attn, _ = program("bias", "doc", backend)
    return sorted(python_names(attn.source) - {"bias", "doc"})


def candidate_names(backend: str) -> list[str]:
    # q, k and v label the graph's own inputs; the frontends rename captured tensors so called (q_).
    plain = sorted({*generated_identifiers(backend), *keyword.kwlist, *dir(builtins)} - {"q", "k", "v"})
    return plain + [fullwidth(name) for name in plain if fullwidth(name) != name]


def runnable(backend: str) -> str:
    reason = why_not_runnable(backend)
    if reason is not None:
        pytest.skip(reason)
    return backend


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_any_captured_name_computes_the_reference(backend):
    runnable(backend)
    names = candidate_names(backend)
    if backend == "pytorch":  # the generated locals of the reported cases are among the candidates
        assert {"k_f", "masked", "out", "ctx", "cls", "rows", "keep", "s", "torch", "float"} <= set(names)

    @settings(max_examples=EXAMPLES.get(backend, 15), derandomize=True, database=None, deadline=None)
    @given(pair=st.lists(st.sampled_from(names), min_size=2, max_size=2, unique=True))
    @example(pair=["k_f", "ｋ_f"])
    @example(pair=["masked", "out"])
    @example(pair=["tl", "s"])
    def run(pair):
        attn, reference = program(*pair, backend)
        q, k, v = qkv(seed=len(pair[0]))
        o, lse = attn(q, k, v, return_lse=True)
        assert_attention_matches(o, lse, *dense_attention(q, k, v, **reference), torch.float32)

    run()


@pytest.mark.parametrize("name", REPORTED)
def test_reported_names_in_a_closure(name):
    """The reported cases as users write them: a tensor captured by a closure under that name."""
    namespace = {}
    exec(
        f"def make(t):\n    {name} = t\n    return lambda x_s, x_b, x_h, x_i, x_j: x_s + {name}[x_b, x_h, x_j, 0]",
        namespace,
    )
    table = torch.randn(1, 2, M, 1, generator=torch.Generator().manual_seed(2))
    score_mod = namespace["make"](table)
    q, k, v = qkv(seed=3)
    o, lse = attncc.flex_attention(q, k, v, score_mod=score_mod, return_lse=True, backend="pytorch")
    assert_attention_matches(o, lse, *dense_attention(q, k, v, score_mod=score_mod), torch.float32)


def test_spec_file_tensor_named_like_a_generated_local(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(
        "[attention]\nnum_heads = 2\nhead_dim = 16\nscore = 'score + k_f[kv_idx]'\n"
        "[attention.tensors]\nk_f = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 3.0]\n",
        encoding="utf-8",
    )
    attn = attncc.compile(attncc.load_spec(path))
    k_f = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 3.0])
    q, k, v = qkv(seed=4)
    o, lse = attn(q, k, v, return_lse=True)
    reference = dense_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + k_f.double()[j])
    assert_attention_matches(o, lse, *reference, torch.float32)


def test_captured_tensor_named_like_a_module_method_is_a_buffer():
    attn, _ = program("float", "to", "pytorch")
    assert attn.captured["float"].dtype == torch.float32 and attn.captured["to"].dtype == torch.int64
    assert attn.captured.to is not attn.captured["to"]  # nn.Module's method stays


def test_the_naming_rule():
    names = CapturedNames(["k_f", "ｋ_f", "δ"])
    assert names.identifiers == {"k_f": "cap0_k_f", "ｋ_f": "cap1_k_f", "δ": "cap2__"}
    assert names.derived("ｋ_f", "ptr") == "cap1_k_f_ptr"
    assert unicodedata.normalize("NFKC", "ｋ_f") == "k_f"


def test_collision_check_refuses_a_generator_name_of_the_reserved_form():
    names = CapturedNames(["doc"])
    names.check(["cap0_doc", "cap0_doc_ptr", "cap0_doc_stride0", "capture", "scores"])
    for name in ("cap1_x", "cap0_other", "cap0_docs"):
        with pytest.raises(attncc.BackendError, match="reserved for captured tensors"):
            names.check([name])


def test_labels_that_are_not_identifiers_are_refused():
    with pytest.raises(attncc.BackendError, match="not a Python identifier"):
        CapturedNames(['x"""'])
