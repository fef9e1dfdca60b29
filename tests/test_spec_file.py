"""TOML spec files: the examples, the expression whitelist, and hostile input."""

from __future__ import annotations

import builtins
import json
import math
import os
import pathlib
import subprocess
import time

import pytest
import sympy
import torch

from attncc.errors import SpecError
from attncc.frontend import builder, spec_file
from attncc.frontend.mod import TracedMod
from attncc.frontend.spec_file import (
    MASK_NAMES,
    SCORE_NAMES,
    load_spec,
    parse_expression,
    parse_spec_text,
)
from attncc.ir.expr import FloorDiv, b, captured_symbol, h, kind, kv_idx, q_idx, score
from attncc.spec import AttentionSpec

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.toml"))


def write_spec(tmp_path, body: str, name: str = "spec.toml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def spec_with(tmp_path, *, mask=None, score=None, tensors: str = "", extra: str = "") -> AttentionSpec:
    lines = ["[attention]", "num_heads = 4", "head_dim = 16", extra]
    if mask is not None:
        lines.append(f"mask = {json.dumps(mask)}")
    if score is not None:
        lines.append(f"score = {json.dumps(score)}")
    if tensors:
        lines += ["[attention.tensors]", tensors]
    return load_spec(write_spec(tmp_path, "\n".join(lines) + "\n", "hostile.toml"))


# --------------------------------------------------------------------------- examples


def test_the_examples_exist():
    names = {p.name for p in EXAMPLE_FILES}
    assert {
        "gpt2.toml",
        "llama3_8b.toml",
        "mistral_7b.toml",
        "gemma2_9b.toml",
        "bert_base.toml",
        "vit_b16.toml",
        "t5_base.toml",
        "longformer_base.toml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_loads(path):
    spec = load_spec(path)
    assert isinstance(spec, AttentionSpec)
    assert path.read_text(encoding="utf-8").startswith("#"), "each example starts with a header comment"
    for field, mod in (("score", spec.score_mod), ("mask", spec.mask_mod)):
        if mod is not None:
            assert isinstance(mod, TracedMod)
            assert mod.source == f"{path}:attention.{field}"


def test_example_fields():
    gpt2 = load_spec(EXAMPLES / "gpt2.toml")
    assert (gpt2.num_heads, gpt2.num_kv_heads, gpt2.head_dim, gpt2.causal) == (12, 12, 64, True)

    llama = load_spec(EXAMPLES / "llama3_8b.toml")
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.causal) == (32, 8, 128, True)
    assert llama.window is None and llama.groups == 4

    mistral = load_spec(EXAMPLES / "mistral_7b.toml")
    assert (mistral.num_heads, mistral.num_kv_heads, mistral.head_dim) == (32, 8, 128)
    assert mistral.causal is True and mistral.window == (4096, 0)

    gemma = load_spec(EXAMPLES / "gemma2_9b.toml")
    assert (gemma.num_heads, gemma.num_kv_heads, gemma.head_dim) == (16, 8, 256)
    assert gemma.softcap == 50.0 and gemma.scale == 0.0625 and gemma.causal is True
    assert gemma.window == (4095, 0)

    for name in ("bert_base.toml", "vit_b16.toml"):
        spec = load_spec(EXAMPLES / name)
        assert (spec.num_heads, spec.head_dim, spec.causal, spec.mask_mod, spec.score_mod) == (
            12,
            64,
            False,
            None,
            None,
        )

    t5 = load_spec(EXAMPLES / "t5_base.toml")
    assert (t5.num_heads, t5.head_dim, t5.scale, t5.causal, t5.mask_mod) == (12, 64, 1.0, False, None)
    assert "rel_bias" in str(t5.score_mod.expr)
    (rel_bias,) = t5.score_mod.captured
    assert (rel_bias.name, rel_bias.dtype, rel_bias.ndim, rel_bias.value) == ("rel_bias", "f32", 2, None)
    assert rel_bias.shape == (12, 32)

    longformer = load_spec(EXAMPLES / "longformer_base.toml")
    assert longformer.mask_mod.kind == "bool" and longformer.score_mod is None
    (is_global,) = longformer.mask_mod.captured
    assert (is_global.name, is_global.dtype, is_global.ndim, is_global.value, is_global.shape) == (
        "is_global",
        "bool",
        1,
        None,
        (4096,),
    )


# --------------------------------------------------------------------------- T5 buckets


def t5_relative_position_bucket(relative_position: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """transformers' T5Attention._relative_position_bucket for one int, bidirectional."""
    num_buckets //= 2
    bucket = num_buckets if relative_position > 0 else 0
    n = abs(relative_position)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


def test_t5_bucket_matches_transformers():
    t5 = load_spec(EXAMPLES / "t5_base.toml")
    (indexed,) = t5.score_mod.expr.atoms(sympy.Indexed)
    head_index, bucket_index = indexed.indices
    assert head_index == h
    assert kind(bucket_index) == "int"
    q0 = 3000
    rs = [0, 1, -1, 5, -7, 7, 8, -8, 9, 11, -12, 15, 16, -16, 17, 23, 31, -32, 32, 33, 45, -45, 63, 64, -64, 65, 90]
    rs += [100, -100, 127, 128, -128, 129, 500, -2999, 2999]
    buckets = set()
    for r in rs:
        value = bucket_index.subs({q_idx: q0, kv_idx: q0 + r})
        assert value.is_Integer, (r, value)
        assert int(value) == t5_relative_position_bucket(r), r
        buckets.add(int(value))
    assert buckets <= set(range(32))
    # the whole score: score + rel_bias[h, bucket]
    whole = t5.score_mod.expr.subs({q_idx: 10, kv_idx: 4, h: 3})
    assert whole == score + captured_symbol("rel_bias", "f32")[3, t5_relative_position_bucket(-6)]


# --------------------------------------------------------------------------- expressions


def parse_mask(text, captured=None):
    return parse_expression(text, captured or {}, MASK_NAMES, where="test: attention.mask", expect="bool")


def parse_score(text, captured=None):
    return parse_expression(text, captured or {}, SCORE_NAMES, where="test: attention.score", expect="number")


def test_comparisons_and_logic_match_sympy():
    assert parse_mask("q_idx >= kv_idx") == sympy.Ge(q_idx, kv_idx)
    assert parse_mask("0 <= q_idx - kv_idx < 8") == sympy.And(sympy.Le(0, q_idx - kv_idx), sympy.Lt(q_idx - kv_idx, 8))
    assert parse_mask("(q_idx >= kv_idx) & (h != 0)") == sympy.And(sympy.Ge(q_idx, kv_idx), sympy.Ne(h, 0))
    assert parse_mask("q_idx >= kv_idx and not b == 0 or h < 2") == sympy.Or(
        sympy.And(sympy.Ge(q_idx, kv_idx), sympy.Not(sympy.Eq(b, 0))), sympy.Lt(h, 2)
    )
    assert parse_mask("~(q_idx < kv_idx) | (h == 1)") == sympy.Or(sympy.Not(sympy.Lt(q_idx, kv_idx)), sympy.Eq(h, 1))
    assert parse_mask("True") == sympy.true


def test_arithmetic_and_functions_match_sympy():
    assert parse_score("score if q_idx >= kv_idx else -inf") == sympy.Piecewise(
        (score, sympy.Ge(q_idx, kv_idx)), (-sympy.oo, True)
    )
    assert parse_score("where(q_idx >= kv_idx, score, 0)") == sympy.Piecewise(
        (score, sympy.Ge(q_idx, kv_idx)), (0, True)
    )
    assert parse_score("score * 2 - 1") == 2 * score - 1
    assert parse_score("q_idx // 64 + q_idx % 3") == FloorDiv(q_idx, 64) + sympy.Mod(q_idx, 3)
    assert parse_score("min(q_idx, kv_idx) + max(q_idx, 1)") == sympy.Min(q_idx, kv_idx) + sympy.Max(q_idx, 1)
    assert parse_score("clamp(kv_idx - q_idx, min=-8, max=8)") == sympy.Min(sympy.Max(kv_idx - q_idx, -8), 8)
    assert parse_score("clamp(kv_idx - q_idx, -8, 8)") == sympy.Min(sympy.Max(kv_idx - q_idx, -8), 8)
    assert parse_score("50 * tanh(score / 50)") == 50 * sympy.tanh(score / 50)
    assert parse_score("score * pi + e") == score * sympy.pi + sympy.E
    assert parse_score("abs(q_idx - kv_idx) ** 2") == sympy.Abs(q_idx - kv_idx) ** 2
    assert parse_score("(q_idx > kv_idx) * 16") == 16 * sympy.Piecewise((1, sympy.Gt(q_idx, kv_idx)), (0, True))
    # a multi-line expression (a TOML triple-quoted string), with surrounding whitespace
    assert parse_score("\n  (score +\n   1)  ") == score + 1


def test_captured_tensors_index_like_builder():
    doc = builder.CapturedTensor("doc", captured_symbol("doc", "i64"), 1, "i64")
    table = builder.CapturedTensor("table", captured_symbol("table", "f32"), 2, "f32")
    captured = {"doc": doc, "table": table}
    assert parse_mask("doc[q_idx] == doc[kv_idx]", captured) == sympy.Eq(doc.symbol[q_idx], doc.symbol[kv_idx])
    assert parse_score("table[h][kv_idx]", captured) == parse_score("table[h, kv_idx]", captured)
    assert parse_score("score + table[h, doc[kv_idx]]", captured) == score + table.symbol[h, doc.symbol[kv_idx]]


def test_spec_file_round_trip_with_tensors(tmp_path):
    spec = spec_with(
        tmp_path,
        mask="(doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx) | is_global[kv_idx]",
        score="score + bias[h, clamp(kv_idx - q_idx, -8, 8) + 8] + lengths[doc[q_idx]] + doc[0]",
        tensors="\n".join(
            [
                'doc = { dtype = "int64", values = [0, 0, 1, 1, 1] }',
                'bias = { dtype = "float32", shape = [4, 17] }',
                'is_global = { dtype = "bool", shape = [4096] }',
                "lengths = [2, 3]",
            ]
        ),
        extra='causal = "top_left"\nwindow = ["unbounded", 0]\nsoftcap = 20.0\nscale = 0.25',
    )
    assert spec.causal == "top_left" and spec.window == (None, 0) and spec.softcap == 20.0 and spec.scale == 0.25
    score_captured = spec.score_mod.captured_by_name()
    mask_captured = spec.mask_mod.captured_by_name()
    assert [c.name for c in spec.score_mod.captured] == ["bias", "lengths", "doc"]  # order of first use
    assert [c.name for c in spec.mask_mod.captured] == ["doc", "is_global"]
    assert score_captured["doc"].value is mask_captured["doc"].value  # one tensor, shared
    assert torch.equal(score_captured["doc"].value, torch.tensor([0, 0, 1, 1, 1]))
    assert score_captured["lengths"].value.dtype == torch.int64 and score_captured["lengths"].shape == (2,)
    assert score_captured["bias"].value is None and score_captured["bias"].shape == (4, 17)
    assert (mask_captured["is_global"].dtype, mask_captured["is_global"].ndim) == ("bool", 1)
    assert spec.mask_mod.kind == "bool" and spec.score_mod.kind == "float"


def test_tensor_dtype_inference(tmp_path):
    spec = spec_with(
        tmp_path,
        score="score + f[h] + i[h] + x[h, 0]",
        mask="g[kv_idx]",
        tensors="f = [0.5, 1.0]\ni = [1, 2]\ng = [true, false]\nx = { values = [[1, 2], [3, 4]], dtype = 'float16' }",
    )
    by_name = {**spec.score_mod.captured_by_name(), **spec.mask_mod.captured_by_name()}
    assert by_name["f"].value.dtype == torch.float32 and by_name["f"].dtype == "f32"
    assert by_name["i"].value.dtype == torch.int64 and by_name["i"].dtype == "i64"
    assert by_name["g"].value.dtype == torch.bool and by_name["g"].dtype == "bool"
    assert by_name["x"].value.dtype == torch.float16 and by_name["x"].shape == (2, 2)


def test_parse_spec_text_names_its_source():
    spec = parse_spec_text('name = "x"\n[attention]\nnum_heads = 2\nhead_dim = 8\nmask = "q_idx >= kv_idx"\n')
    assert spec.mask_mod.source == "<string>:attention.mask"
    with pytest.raises(SpecError, match="^mine.toml: "):
        parse_spec_text("[attention]\nnum_heads = 0\nhead_dim = 8\n", source="mine.toml")


# --------------------------------------------------------------------------- hostile expressions


@pytest.fixture
def no_side_effects(monkeypatch):
    """Fail the test if anything tries to run a command."""

    def forbidden(*args, **kwargs):
        pytest.fail(f"a spec expression ran a command: {args!r}")

    monkeypatch.setattr(os, "system", forbidden)
    monkeypatch.setattr(os, "popen", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)


HOSTILE_MASKS = [
    ("__import__('os').system('echo hi')", ["call of", "__import__('os').system", "column 1"]),
    ("__import__('os') == 0", ["dunder name", "'__import__'"]),
    ("().__class__", ["attribute access", "().__class__", "column 1"]),
    ("q_idx.real >= 0", ["attribute access", "q_idx.real", "column 1"]),
    ("(lambda: q_idx)() >= 0", ["call of", "lambda: q_idx"]),
    ("(lambda x: x)", ["lambda", "column 2"]),
    ("[q_idx for q_idx in b] == 0", ["list comprehension", "column 1"]),
    ("q_idx == 'abc'", ["string constant", "'abc'", "column 10"]),
    ("f'{q_idx}' == 0", ["f-string", "column 1"]),
    ("(x := q_idx) >= 0", ["assignment expression", "x := q_idx", "column 2"]),
    ("foo >= kv_idx", ["unknown name 'foo'", "allowed names: b, h, q_idx, kv_idx, N, M", "column 1"]),
    ("open(1) == 0", ["unknown function 'open'", "allowed functions:", "column 1"]),
    ("score > 0", ["name 'score' is not available", "allowed names"]),
    ("q_idx - kv_idx", ["mask must be boolean", "'q_idx - kv_idx'"]),
    ("{1: 2}[q_idx] == 0", ["dict display"]),
    ("[1, 2][q_idx] == 0", ["list display"]),
    ("q_idx.__class__.__mro__ == 0", ["attribute access"]),
    ("getattr(q_idx, 'x') == 0", ["unknown function 'getattr'"]),
    ("where(*[q_idx]) == 0", ["starred"]),
    ("abs(q_idx, key=1) == 0", ["keyword argument 'key'"]),
    ("q_idx in (1, 2)", ["comparison 'in'"]),
    ("q_idx is kv_idx", ["comparison 'is'"]),
    ("q_idx @ kv_idx == 0", ["operator '@'"]),
    ("q_idx << 1 == 0", ["operator '<<'"]),
    ("None == q_idx", ["constant None"]),
    ("b'x' == q_idx", ["bytes constant"]),
    ("1j == q_idx", ["complex number"]),
    ("(q_idx, kv_idx) == 0", ["tuple"]),
    ("q_idx[0] == 0", ["only captured tensors"]),
    ("abs == 0", ["function 'abs' must be called"]),
    ("q_idx(1) == 0", ["'q_idx' is not a function"]),
    ("... == q_idx", ["constant Ellipsis"]),
    ("q_idx >= kv_idx\nimport os", ["syntax error", "line 2"]),
    ("await q_idx", ["await"]),
    ("9 ** 9 ** 9 == q_idx", ["out of the float64 range"]),
    ("floor(exp(10 ** 300)) == q_idx", ["out of the float64 range"]),
    ("log(0) == q_idx", ["complex infinity"]),
    ("sqrt(-1) == q_idx", ["complex"]),
    ("inf - inf == q_idx", ["NaN"]),
    ("q_idx / 0 == 1", ["by the constant zero"]),
    ("ｑ_idx >= kv_idx", ["character 'ｑ'", "ASCII"]),
    ("", ["empty"]),
    ("q_idx >= kv_idx\x00", ["character '\\x00'"]),
    ("1" * 5000 + " == q_idx", ["syntax error"]),
]


@pytest.mark.parametrize("text, fragments", HOSTILE_MASKS, ids=[repr(t[:30]) for t, _ in HOSTILE_MASKS])
def test_hostile_mask_is_refused(tmp_path, no_side_effects, text, fragments):
    with pytest.raises(SpecError) as info:
        spec_with(tmp_path, mask=text)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'hostile.toml'}: attention.mask"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_import_never_runs(tmp_path, monkeypatch):
    """`__import__('os').system(...)` is refused without importing or calling anything."""
    calls = []
    real_import = builtins.__import__

    def spy_import(name, *args, **kwargs):
        if name == "os":
            calls.append(("import", name))
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy_import)
    monkeypatch.setattr(os, "system", lambda *a: calls.append(("system", a)) or 0)
    for field in ("mask", "score"):
        with pytest.raises(SpecError, match=r"call of \"__import__\('os'\)\.system\""):
            spec_with(tmp_path, **{field: "__import__('os').system('echo hi')"})
    assert calls == []


def test_score_that_is_boolean_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"attention\.score: 'q_idx >= kv_idx' is a boolean expression"):
        spec_with(tmp_path, score="q_idx >= kv_idx")


def test_score_may_use_score_but_mask_may_not(tmp_path):
    assert spec_with(tmp_path, score="score * 2").score_mod.expr == 2 * score
    with pytest.raises(SpecError, match=r"attention\.mask: name 'score' is not available"):
        spec_with(tmp_path, mask="score > 0")


def test_deep_nesting_is_refused(tmp_path):
    for text, fragment in [
        ("(" * 5000, "nested"),
        ("-" * 5000 + "q_idx >= 0", "nested"),
        ("not " * 2000 + "q_idx >= 0", "nested"),
        ("+".join(["b"] * 3000) + " >= 0", "nested"),
        ("abs(" * 120 + "q_idx" + ")" * 120 + " >= 0", "nested more than 100 levels"),
    ]:
        with pytest.raises(SpecError, match=fragment) as info:
            spec_with(tmp_path, mask=text)
        assert "hostile.toml: attention.mask" in str(info.value)


def test_parentheses_alone_do_not_nest():
    assert parse_mask("(" * 150 + "q_idx" + ")" * 150 + " >= kv_idx") == sympy.Ge(q_idx, kv_idx)


def test_exponential_growth_is_refused(tmp_path):
    # where() on booleans uses its condition twice: the expression doubles at each level
    text = "q_idx > b"
    for i in range(40):
        text = f"where({text}, h > {i}, kv_idx > {i} + b)"
    with pytest.raises(SpecError, match=r"attention\.mask: the expression grows to more than 10000 terms"):
        spec_with(tmp_path, mask=text)


def test_slow_translation_is_cut_off(tmp_path, monkeypatch):
    # sympy folds a Piecewise inside a condition slowly; the parser stops after a time budget
    monkeypatch.setattr(spec_file, "MAX_TRANSLATE_SECONDS", 0.5)
    text = "score"
    for i in range(20):
        text = f"where(0 < ({text}) < 1, score, score * {i + 2})"
    with pytest.raises(SpecError, match=r"attention\.score: the expression is too complex"):
        spec_with(tmp_path, score=text)


def test_expression_too_long(tmp_path):
    text = "q_idx >= kv_idx" + " " * 10_000
    with pytest.raises(SpecError, match=r"hostile\.toml: attention\.mask: the expression is 10015 characters long"):
        spec_with(tmp_path, mask=text)


def test_expression_must_be_a_string(tmp_path):
    with pytest.raises(SpecError, match=r"attention\.mask=3 is invalid: a string"):
        load_spec(write_spec(tmp_path, "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 3\n"))


def test_integer_indices_only(tmp_path):
    with pytest.raises(SpecError, match="indices must be integers"):
        spec_with(tmp_path, score="score + t[q_idx / 2]", tensors="t = [1.0, 2.0]")
    with pytest.raises(SpecError, match="has 1 dimensions, indexed with 2"):
        spec_with(tmp_path, score="score + t[q_idx, 0]", tensors="t = [1.0, 2.0]")
    with pytest.raises(SpecError, match="used with 1 of its 2"):
        spec_with(tmp_path, score="score + t[q_idx]", tensors="t = [[1.0, 2.0]]")


# --------------------------------------------------------------------------- hostile files


HOSTILE_FILES = [
    ("[attention\nnum_heads = 2\n", ["invalid TOML", "line 1"]),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nbogus = 1\n",
        ["unknown key 'bogus' in [attention]", "allowed keys: num_heads"],
    ),
    ("[attention]\nnum_heads = 2\nhead_dim = 8\nmask_mod = 'q_idx >= 0'\n", ["spelled 'mask'"]),
    ("[attention]\nnum_heads = -4\nhead_dim = 8\n", ["num_heads=-4 is invalid", "positive integer"]),
    ("[attention]\nnum_heads = '32'\nhead_dim = 8\n", ["num_heads='32' is invalid"]),
    ("[attention]\nnum_heads = 6\nnum_kv_heads = 4\nhead_dim = 8\n", ["num_kv_heads=4 is invalid"]),
    ("[attention]\nnum_heads = 2\nhead_dim = 8\ncausal = 'sideways'\n", ["causal='sideways' is invalid"]),
    ("[attention]\nnum_heads = 2\nhead_dim = 8\nwindow = [4096]\n", ["window=[4096] is invalid", "unbounded"]),
    ("[attention]\nnum_heads = 2\nhead_dim = 8\nwindow = ['none', 0]\n", ["window left='none' is invalid"]),
    ("[attention]\nnum_heads = 2\nhead_dim = 8\nwindow = [-1, 0]\n", ["window left=-1 is invalid"]),
    ("[attention]\nnum_heads = 2\nhead_dim = 8\nsoftcap = -1.0\n", ["softcap=-1.0 is invalid"]),
    ("[attention]\nhead_dim = 8\n", ["needs the key 'num_heads'"]),
    ("[model]\nnum_heads = 2\n", ["unknown top-level key 'model'"]),
    ("name = 'x'\n", ["the [attention] table is missing"]),
    ("attention = 3\n", ["'attention' must be a table"]),
    ("name = 3\n[attention]\nnum_heads = 2\nhead_dim = 8\n", ["name=3 is invalid"]),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 'q_idx >= 0'\n[attention.tensors]\nt = { dtype = 'int65', shape = [3] }\n",
        ["attention.tensors.t: dtype='int65' is invalid", "allowed dtypes: bool, uint8"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[q_idx, 0] > 0'\n[attention.tensors]\nt = [[1, 2], [3]]\n",
        ["attention.tensors.t: values are ragged"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[q_idx] > 0'\n[attention.tensors]\nt = [[1, 2], 3]\n",
        ["values are ragged"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 'q_idx >= 0'\n[attention.tensors]\nt = [1, 2]\n",
        ["'t' is declared but not used"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 'q_idx >= 0'\n[attention.tensors]\nq_idx = [1, 2]\n",
        ["attention.tensors.q_idx: the name 'q_idx' is reserved"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 'q_idx >= 0'\n[attention.tensors]\nv = [1, 2]\n",
        ["the name 'v' is reserved"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 'q_idx >= 0'\n[attention.tensors]\n'a b' = [1, 2]\n",
        ["'a b' is not a valid tensor name"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[0] > 0'\n[attention.tensors]\nt = { dtype = 'int64', values = [1, 2], shape = [3] }\n",
        ["shape=[3] disagrees with the shape [2]"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[0] > 0'\n[attention.tensors]\nt = { dtype = 'uint8', values = [1, 300] }\n",
        ["value 300 is out of range for uint8"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[0] > 0'\n[attention.tensors]\nt = { dtype = 'int32', values = [1.5] }\n",
        ["value 1.5 is invalid for dtype int32"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[0] > 0'\n[attention.tensors]\nt = ['a']\n",
        ["value 'a' is invalid"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[0] > 0'\n[attention.tensors]\nt = [true, 1]\n",
        ["mix booleans and numbers"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[0] > 0'\n[attention.tensors]\nt = { shape = [3] }\n",
        ["needs a dtype"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[0] > 0'\n[attention.tensors]\nt = { dtype = 'int64', shape = [0] }\n",
        ["shape=[0] is invalid"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[0] > 0'\n[attention.tensors]\nt = []\n",
        ["empty list"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[0] > 0'\n[attention.tensors]\nt = 3\n",
        ["attention.tensors.t=3 is invalid"],
    ),
    (
        "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[0] > 0'\n[attention.tensors]\nt = { dtype = 'int64', value = [1] }\n",
        ["unknown key 'value'", "allowed keys: dtype, values, shape"],
    ),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", ["invalid TOML"]),
]


@pytest.mark.parametrize("body, fragments", HOSTILE_FILES, ids=range(len(HOSTILE_FILES)))
def test_hostile_file_is_refused(tmp_path, no_side_effects, body, fragments):
    path = write_spec(tmp_path, body, "bad.toml")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n[attention]\nnum_heads = 2\nhead_dim = 8\n")
    with pytest.raises(SpecError, match=r"latin1\.toml: the file is not UTF-8 text \(byte 0xe9 at offset 5\)"):
        load_spec(path)


def test_file_too_large(tmp_path):
    path = tmp_path / "huge.toml"
    path.write_bytes(b"[attention]\nnum_heads = 2\nhead_dim = 8\n" + b"#" * spec_file.MAX_FILE_BYTES)
    with pytest.raises(SpecError, match=r"huge\.toml: the spec is larger than 128 KiB, the most a spec file may hold"):
        load_spec(path)


PATTERN = "[attention]\nnum_heads = 2\nhead_dim = 8\n[attention.pattern]\n"
TENSOR = "[attention]\nnum_heads = 2\nhead_dim = 8\nmask = 't[q_idx] > 0'\n[attention.tensors]\n"
# Each of these hung, took minutes, hit torch's allocator or raised a bare ValueError before the caps.
OVERSIZED = {
    "heads of a prime count": (
        "[attention]\nnum_heads = 1000000007\nnum_kv_heads = 2\nhead_dim = 8\n",
        "num_heads=1000000007 is invalid: at most 4096 is allowed",
    ),
    "huge head dim": (
        "[attention]\nnum_heads = 2\nhead_dim = 1000000000\n",
        "head_dim=1000000000 is invalid: at most 4096",
    ),
    "bigbird of one-token blocks": (
        PATTERN + "name = 'bigbird'\nblock_size = 1\nseq_len = 40000\n",
        "attention.pattern: block_size=1, seq_len=40000 is invalid: 40000 blocks; at most 4096 are allowed "
        "(block_size >= 10 for this seq_len)",
    ),
    "longformer of 10**12 tokens": (
        PATTERN + "name = 'longformer'\nwindow = 4\nglobal_tokens = [0]\nseq_len = 1000000000000\n",
        "attention.pattern: seq_len=1000000000000 is invalid: at most 16777216 (2**24) positions are allowed",
    ),
    "a document of 10**12 tokens": (
        PATTERN + "name = 'document'\nlengths = [1000000000000]\n",
        "attention.pattern: lengths=[1000000000000] is invalid: the documents may hold at most 16777216 (2**24) "
        "positions in all",
    ),
    "documents whose total wraps int64": (
        PATTERN + "name = 'document'\nlengths = [" + ", ".join(["4611686018427387904"] * 4) + "]\n",
        "the documents may hold at most 16777216 (2**24) positions in all",
    ),
    "offsets past 2**24": (
        PATTERN + "name = 'document'\noffsets = [0, 3, 1099511627776]\n",
        "the documents may hold at most 16777216 (2**24) positions in all",
    ),
    "float global tokens": (
        PATTERN + "name = 'longformer'\nwindow = 4\nglobal_tokens = [0.5]\nseq_len = 16\n",
        "attention.pattern: global_tokens=[0.5] is invalid: a flat list of integers is allowed",
    ),
    "declared tensor of 10**18 elements": (
        TENSOR + "t = { dtype = 'int64', shape = [1000000, 1000000, 1000000] }\n",
        "attention.tensors.t: shape=[1000000, 1000000, 1000000] has 1000000000000000000 elements; at most "
        "16777216 (2**24) are allowed",
    ),
    "an integer of 5000 digits": (
        "[attention]\nnum_heads = " + "7" * 5000 + "\nhead_dim = 8\n",
        "invalid TOML: a value cannot be read (Exceeds the limit (4300 digits) for integer string conversion: value "
        "has 5000 digits)",
    ),
}


@pytest.mark.parametrize("case", sorted(OVERSIZED))
def test_oversized_specs_end_quickly_with_the_cap_in_the_message(tmp_path, case):
    body, message = OVERSIZED[case]
    path = write_spec(tmp_path, body, "big.toml")
    start = time.process_time()
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert time.process_time() - start < 2
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "index, item, last", [("t[q_idx]", "0,", "0]\n"), ("t[q_idx, 0]", "[0],", "[0]]\n")], ids=["integers", "nested"]
)
def test_the_largest_accepted_file_parses_in_under_two_seconds(tmp_path, index, item, last):
    """One tensor whose values fill the file up to the size cap: the slowest kind of file to parse.

    Counted in CPU seconds of this process, which other processes on the machine do not inflate."""
    head = TENSOR.replace("t[q_idx]", index) + "t = ["
    path = write_spec(tmp_path, head + item * ((spec_file.MAX_FILE_BYTES - len(head) - len(last)) // len(item)) + last)
    assert spec_file.MAX_FILE_BYTES - 8 < path.stat().st_size <= spec_file.MAX_FILE_BYTES
    start = time.process_time()
    spec = load_spec(path)
    assert time.process_time() - start < 2
    assert spec.mask_mod.captured[0].value.numel() > 30_000
    assert spec.mask_mod.captured[0].value.numel() > 20_000


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"nothere\.toml: cannot read the spec file"):
        load_spec(tmp_path / "nothere.toml")


def test_utf8_bom_and_non_ascii_comments_are_fine(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff# Gemma-2 — local layers\n[attention]\nnum_heads = 2\nhead_dim = 8\n".encode())
    assert load_spec(path).num_heads == 2


def test_one_slow_sympy_call_is_cut_off_too(tmp_path, monkeypatch):
    """The parser's time budget holds even inside a single sympy call that never returns."""
    monkeypatch.setattr(spec_file, "MAX_TRANSLATE_SECONDS", 0.3)

    def endless(*args, **kwargs):
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(builder, "binary", endless)
    start = time.perf_counter()
    with pytest.raises(SpecError, match=r"attention\.mask: the expression is too complex: translating it took more"):
        spec_with(tmp_path, mask="q_idx >= kv_idx")
    assert time.perf_counter() - start < 2
