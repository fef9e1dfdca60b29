"""Robustness: a catalogue of malformed specs, mods and inputs; extreme and non-finite inputs; a shared cache.

Every catalogue entry raises a named error type whose message says what is wrong
(tests/test_errors.py covers the spec fields and the compiled module's q, k, v
checks; this file covers other entry points). Extreme inputs follow
docs/robustness.md.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import attncc
from attncc.api import InputTypeError
from attncc.frontend.spec_file import parse_spec_text
from tests.reference import OUTPUT_TOLERANCE, dense_attention


def spec(**fields):
    return attncc.AttentionSpec(**{"num_heads": 2, "head_dim": 8, **fields})


def qkv(heads=2, kv_heads=2, n=5, m=7, d=8, dv=8, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, n, d, generator=generator),
        torch.randn(batch, kv_heads, m, d, generator=generator),
        torch.randn(batch, kv_heads, m, dv, generator=generator),
    )


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


TABLE = torch.randn(2, 16)
DOC = torch.zeros(16, dtype=torch.int64)
COMPLEX = torch.zeros(16, dtype=torch.complex64)
FLOAT64 = torch.zeros(16, dtype=torch.float64)


def flex(*args, **kwargs):
    return lambda: attncc.flex_attention(*args, **kwargs)


def block_mask(*args, **kwargs):
    return lambda: attncc.create_block_mask(*args, **kwargs)


def compile_with(**options):
    return lambda: attncc.compile(spec(), **options)


def compile_and_call(fields: dict, **captured):
    return lambda: attncc.compile(spec(**fields))(*qkv(), **captured)


def load(text: str):
    """Load a spec file with this text (written to a temporary directory by the test)."""
    return ("toml", text)


FULL_PIPELINE = ["canonicalize", "fold-scale", "group-kv", "online-softmax"]
HEADER = "[attention]\nnum_heads = 2\nhead_dim = 8\n"


@dataclass(frozen=True)
class Malformed:
    """One malformed call: ``run`` raises ``error`` with every fragment of ``message`` in its text."""

    name: str
    run: object
    error: type
    message: tuple[str, ...]


def malformed(name, run, error, *message):
    return Malformed(name, run, error, message)


q, k, v = qkv()
CATALOGUE = [
    # -- flex_attention arguments
    malformed("flex query is a list", flex([1.0], k, v), InputTypeError, "query is list: a 4-D tensor"),
    malformed("flex query is 3-D", flex(q[0], k, v), InputTypeError, "query is (2, 5, 8): a 4-D tensor [batch, heads"),
    malformed("flex key is 5-D", flex(q, k[None], v), InputTypeError, "key is (1, 1, 2, 7, 8)"),
    malformed("flex value shorter than key", flex(q, k, v[:, :, :3]), attncc.InputError,
              "k has 7 keys and v has 3 values: they must be equal"),  # fmt: skip
    malformed("flex head dims differ", flex(q, k[..., :4], v), attncc.InputError,
              "k has 4 head dim (shape (1, 2, 7, 4)); the spec's head_dim is 8"),  # fmt: skip
    malformed("flex block_mask of another type", flex(q, k, v, block_mask={}), InputTypeError,
              "block_mask is a dict: an attncc.BlockMask is allowed"),  # fmt: skip
    malformed("flex mask_mod and block_mask", lambda: attncc.flex_attention(
        q, k, v, block_mask=attncc.create_block_mask(causal, None, None, 5, 7), mask_mod=causal),
        attncc.ModError, "pass mask_mod or block_mask, not both"),  # fmt: skip
    malformed("flex heads not a multiple", flex(*qkv(heads=3, kv_heads=2), enable_gqa=True), attncc.InputError,
              "query has 3 heads, not a multiple of key's 2 heads"),  # fmt: skip
    malformed("flex more kv heads than heads", flex(*qkv(heads=2, kv_heads=4), enable_gqa=True), attncc.InputError,
              "query has 2 heads, not a multiple of key's 4 heads"),  # fmt: skip
    malformed("flex scale NaN", flex(q, k, v, scale=math.nan), attncc.SpecError,
              "scale=nan is invalid: a finite number is allowed"),  # fmt: skip
    malformed("flex scale string", flex(q, k, v, scale="0.1"), attncc.SpecError, "scale='0.1' is invalid"),
    malformed("flex unknown backend", flex(q, k, v, backend="tpu"), attncc.BackendError,
              "backend='tpu' is unknown; available backends: pytorch"),  # fmt: skip
    malformed("flex mask_mod given as score_mod", flex(q, k, v, score_mod=causal), attncc.ModError,
              "a score_mod takes 5 positional arguments", "it looks like a mask_mod: pass it as mask_mod="),  # fmt: skip
    malformed("flex score_mod given as mask_mod", flex(q, k, v, mask_mod=lambda score, b, h, q_idx, kv_idx: score),
              attncc.ModError, "a mask_mod takes 4 positional arguments", "it looks like a score_mod"),  # fmt: skip
    malformed("flex score_mod not callable", flex(q, k, v, score_mod=3), attncc.ModError,
              "score_mod must be a callable score_mod(score, b, h, q_idx, kv_idx), got 3 of type int"),  # fmt: skip
    malformed("flex mask_mod is a string", flex(q, k, v, mask_mod="q_idx >= kv_idx"), attncc.ModError,
              "got 'q_idx >= kv_idx' of type str"),  # fmt: skip
    malformed("flex score_mod returns a tuple",
              flex(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: (score, score)), attncc.ModError,
              "a score_mod returns one value, not a tuple"),  # fmt: skip
    # -- create_block_mask arguments
    malformed("block mask of a number", block_mask(3, None, None, 5, 7), attncc.ModError,
              "mask_mod must be a callable mask_mod(b, h, q_idx, kv_idx), got 3"),  # fmt: skip
    malformed("block mask B=True", block_mask(causal, True, None, 5, 7), attncc.InputError,
              "B=True is invalid: a positive integer or None is allowed"),  # fmt: skip
    malformed("block mask H=2.0", block_mask(causal, None, 2.0, 5, 7), attncc.InputError, "H=2.0 is invalid"),
    malformed("block mask Q_LEN=5.0", block_mask(causal, None, None, 5.0, 7), attncc.InputError,
              "Q_LEN=5.0 is invalid: a positive integer is allowed"),  # fmt: skip
    malformed("block mask KV_LEN=None", block_mask(causal, None, None, 5, None), attncc.InputError,
              "KV_LEN=None is invalid"),  # fmt: skip
    malformed("block mask of a score_mod", block_mask(lambda score, b, h, q_idx, kv_idx: score, None, None, 5, 7),
              attncc.ModError, "it looks like a score_mod"),  # fmt: skip
    malformed("block mask of a number-valued mod", block_mask(lambda b, h, q_idx, kv_idx: q_idx * 2, None, None, 5, 7),
              attncc.ModError, "mask_mod must return a boolean", "returned the int expression 2*q_idx"),  # fmt: skip
    # -- compile options
    malformed("compile backend=None", compile_with(backend=None), attncc.BackendError,
              "backend=None is unknown; available backends: pytorch"),  # fmt: skip
    malformed("compile unknown pipeline", compile_with(pipeline="fastest"), attncc.AttnccError,
              "pipeline 'fastest' is unknown; known pipelines: pytorch"),  # fmt: skip
    malformed("compile unknown pass", compile_with(pipeline=["canonicalize", "fuse-everything"]), attncc.AttnccError,
              "pass 'fuse-everything' is unknown; known passes: canonicalize, fold-scale"),  # fmt: skip
    malformed("compile unknown pass option", compile_with(pipeline=[*FULL_PIPELINE, "tile{target=pytorch,warp=4}"]),
              attncc.AttnccError, "pass 'tile'", "unexpected keyword argument 'warp'"),  # fmt: skip
    malformed("compile unclosed pass options", compile_with(pipeline=[*FULL_PIPELINE, "tile{target=pytorch"]),
              attncc.AttnccError, "pass options 'tile{target=pytorch' must end with '}'"),  # fmt: skip
    malformed("compile pass option without a value", compile_with(pipeline=[*FULL_PIPELINE, "tile{pytorch}"]),
              attncc.AttnccError, "pass option 'pytorch' in 'tile{pytorch}' is not key=value"),  # fmt: skip
    malformed("compile negative tile size", compile_with(pipeline=[*FULL_PIPELINE, "tile{target=pytorch,block_m=-4}"]),
              attncc.IRError, "tile and launch sizes must be >= 0, got -4"),  # fmt: skip
    malformed("compile unknown tile target", compile_with(pipeline=[*FULL_PIPELINE, "tile{target=tpu}"]),
              attncc.BackendError, "tile: target='tpu' is unknown; known targets: pytorch"),  # fmt: skip
    # -- captured tensors
    malformed("captured complex tensor", lambda: attncc.compile(spec(score_mod=lambda s, b, h, q_idx, kv_idx: s + COMPLEX[kv_idx])),
              attncc.ModError, "captured tensor 'COMPLEX' has dtype torch.complex64, which is not supported"),  # fmt: skip
    malformed("captured tensor sliced", lambda: attncc.compile(spec(score_mod=lambda s, b, h, q_idx, kv_idx: s + TABLE[:, kv_idx])),
              attncc.ModError, "slicing captured tensor 'TABLE' is not supported"),  # fmt: skip
    malformed("captured tensor indexed partly", lambda: attncc.compile(spec(score_mod=lambda s, b, h, q_idx, kv_idx: s + TABLE[kv_idx])),
              attncc.ModError, "captured tensor 'TABLE' is used with 1 of its 2 indices"),  # fmt: skip
    malformed("captured tensor indexed by a float",
              lambda: attncc.compile(spec(score_mod=lambda s, b, h, q_idx, kv_idx: s + TABLE[h, kv_idx / 2])),
              attncc.ModError, "index kv_idx/2 into captured tensor 'TABLE' is a float expression"),  # fmt: skip
    malformed("captured tensor indexed from the end",
              lambda: attncc.compile(spec(score_mod=lambda s, b, h, q_idx, kv_idx: s + TABLE[h, -1])),
              attncc.ModError, "negative index -1 into captured tensor 'TABLE' is not supported"),  # fmt: skip
    malformed("tensor made inside a mod",
              lambda: attncc.compile(spec(mask_mod=lambda b, h, q_idx, kv_idx: torch.arange(16)[q_idx] > 0)),
              attncc.ModError, "that is not captured from outside the mod"),  # fmt: skip
    malformed("captured float64 replaced by float32", compile_and_call(
        {"score_mod": lambda s, b, h, q_idx, kv_idx: s + FLOAT64[kv_idx]}, FLOAT64=torch.zeros(16)),
        attncc.InputError, "captured tensor 'FLOAT64' is torch.float32 with 1 dims; the program was compiled for f64"),  # fmt: skip
    malformed("captured replaced by a string", compile_and_call(
        {"mask_mod": lambda b, h, q_idx, kv_idx: DOC[q_idx] == DOC[kv_idx]}, DOC="x"),
        InputTypeError, "captured tensor DOC=str is invalid: a torch.Tensor is allowed"),  # fmt: skip
    malformed("captured integer tensor without values", lambda: attncc.compile(
        parse_spec_text(HEADER + "mask = 'doc[q_idx] == doc[kv_idx]'\n[attention.tensors]\n"
                                                  "doc = { dtype = 'int64', shape = [16] }\n"), validate_each=True),
        attncc.InputError, "validation cannot invent integer values for captured tensor 'doc'"),  # fmt: skip
    # -- call-time inputs (beyond tests/test_errors.py)
    malformed("call with a numpy array", lambda: attncc.compile(spec())(q.numpy(), k, v), InputTypeError,
              "q is a ndarray: a torch.Tensor is allowed"),  # fmt: skip
    malformed("call with complex q", lambda: attncc.compile(spec())(q.to(torch.complex64), k, v), InputTypeError,
              "q has dtype torch.complex64: float16, bfloat16 or float32 are allowed"),  # fmt: skip
    malformed("call with boolean q", lambda: attncc.compile(spec())(q > 0, k, v), InputTypeError,
              "q has dtype torch.bool"),  # fmt: skip
    malformed("call with k on another device", lambda: attncc.compile(spec())(q, k.to("meta"), v), attncc.InputError,
              "q, k, v are on cpu, meta, cpu: they must be on one device"),  # fmt: skip
    # -- TOML spec files through attncc.load_spec (beyond tests/test_spec_file.py)
    malformed("toml scale = nan", load(HEADER + "scale = nan\n"), attncc.SpecError,
              "scale=nan is invalid: a finite number is allowed"),  # fmt: skip
    malformed("toml scale = -inf", load(HEADER + "scale = -inf\n"), attncc.SpecError, "scale=-inf is invalid"),
    malformed("toml scale is a date", load(HEADER + "scale = 1979-05-27\n"), attncc.SpecError,
              "scale=datetime.date(1979, 5, 27) is invalid: a finite number is allowed"),  # fmt: skip
    malformed("toml softcap = inf", load(HEADER + "softcap = inf\n"), attncc.SpecError,
              "softcap=inf is invalid: a finite number"),  # fmt: skip
    malformed("toml head_dim = 1e3", load("[attention]\nnum_heads = 2\nhead_dim = 1e3\n"), attncc.SpecError,
              "head_dim=1000.0 is invalid: a positive integer is allowed"),  # fmt: skip
    malformed("toml causal = 1", load(HEADER + "causal = 1\n"), attncc.SpecError,
              "causal=1 is invalid: allowed are False, True, 'bottom_right', 'top_left'"),  # fmt: skip
    malformed("toml causal in capitals", load(HEADER + "causal = 'TOP_LEFT'\n"), attncc.SpecError,
              "causal='TOP_LEFT' is invalid"),  # fmt: skip
    malformed("toml window as a table", load(HEADER + "window = { left = 4, right = 0 }\n"), attncc.SpecError,
              "window={'left': 4, 'right': 0} is invalid: an array [left, right]"),  # fmt: skip
    malformed("toml window side true", load(HEADER + "window = [true, 0]\n"), attncc.SpecError,
              "window left=True is invalid"),  # fmt: skip
    malformed("toml duplicate key", load(HEADER + "num_heads = 4\n"), attncc.SpecError,
              "invalid TOML: Cannot overwrite a value (at line 4"),  # fmt: skip
    malformed("toml [attention] twice", load(HEADER + "[attention]\nhead_dim = 16\n"), attncc.SpecError,
              "invalid TOML: Cannot declare ('attention',) twice"),  # fmt: skip
    malformed("toml empty file", load(""), attncc.SpecError, "the [attention] table is missing"),
    malformed("toml tensors not a table", load(HEADER + "tensors = 3\n"), attncc.SpecError,
              "attention.tensors must be a table ([attention.tensors]), got int"),  # fmt: skip
    malformed("toml tensor shape of floats",
              load(HEADER + "mask = 't[kv_idx] > 0'\n[attention.tensors]\nt = { dtype = 'int64', shape = [3.0] }\n"),
              attncc.SpecError, "attention.tensors.t: shape=[3.0] is invalid: a list of 1 to 8 positive integers"),  # fmt: skip
    malformed("toml tensor of 9 dimensions",
              load(HEADER + "mask = 't[0, 0, 0, 0, 0, 0, 0, 0, kv_idx] > 0'\n[attention.tensors]\nt = [[[[[[[[[1]]]]]]]]]\n"),
              attncc.SpecError, "attention.tensors.t: values have more than 8 dimensions"),  # fmt: skip
    malformed("toml path is a directory", ("path", "."), attncc.SpecError, "cannot read the spec file: Is a directory"),
]  # fmt: skip

# Found by this catalogue and fixed in ee9bad0; kept as regressions.
FIXED = [
    malformed("block mask BLOCK_SIZE=0", block_mask(causal, None, None, 5, 7, BLOCK_SIZE=0), attncc.InputError,
              "BLOCK_SIZE=0 is invalid: a positive integer or a pair of them is allowed"),
    malformed("block mask BLOCK_SIZE=-1", block_mask(causal, None, None, 5, 7, BLOCK_SIZE=-1), attncc.InputError,
              "BLOCK_SIZE=-1 is invalid"),
    malformed("block mask BLOCK_SIZE=(128,)", block_mask(causal, None, None, 5, 7, BLOCK_SIZE=(128,)),
              attncc.InputError, "BLOCK_SIZE=(128,) is invalid"),
    malformed("compile print_after an unknown pass", compile_with(print_after=("tiles",)), attncc.AttnccError,
              "print_after='tiles' names no pass of this pipeline; its passes: canonicalize"),
    malformed("compile pipeline of the wrong type", compile_with(pipeline=3), attncc.AttnccError,
              "pipeline=3 is invalid: a target name (pytorch"),
    malformed("captured index past the end at call time", compile_and_call(
        {"score_mod": lambda s, b, h, q_idx, kv_idx: s + TABLE[h, kv_idx + 10]}), attncc.InputError,
        "an index into a captured tensor (TABLE) is out of range for these inputs"),
    malformed("toml float16 value out of range",
              load(HEADER + "score = 'score + t[0]'\n[attention.tensors]\nt = { dtype = 'float16', values = [1e6] }\n"),
              attncc.SpecError, "attention.tensors.t: value 1000000.0 is out of range for float16 (largest 65504)"),
    # A negative index counts once from the end, as torch's (tests/test_mod_values.py); below -size is an error.
    malformed("captured index below -size at call time", compile_and_call(
        {"score_mod": lambda s, b, h, q_idx, kv_idx: s + TABLE[h, kv_idx - q_idx - 16]}), attncc.InputError,
        "an index into a captured tensor (TABLE) is out of range for these inputs"),
]  # fmt: skip
CATALOGUE += FIXED


def _run(entry: Malformed, tmp_path: Path):
    if isinstance(entry.run, tuple):
        kind, text = entry.run
        if kind == "path":
            return attncc.load_spec(tmp_path / text)
        path = tmp_path / "spec.toml"
        path.write_text(text, encoding="utf-8")
        return attncc.load_spec(path)
    return entry.run()


@pytest.mark.parametrize("entry", CATALOGUE, ids=[entry.name for entry in CATALOGUE])
def test_malformed_input_raises_a_named_error(entry, tmp_path):
    with pytest.raises(entry.error) as info:
        _run(entry, tmp_path)
    assert isinstance(info.value, attncc.AttnccError)
    for fragment in entry.message:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_catalogue_size():
    assert len(CATALOGUE) >= 30
    assert len({entry.name for entry in CATALOGUE}) == len(CATALOGUE)


def test_integer_division_by_a_runtime_zero_raises_torchs_error():
    """Documented: ``q_idx % kv_idx`` is 0 at kv_idx = 0; the pytorch backend raises torch's error, not NaN."""
    attn = attncc.compile(spec(mask_mod=lambda b, h, q_idx, kv_idx: q_idx % kv_idx == 0))
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        attn(*qkv())


# --------------------------------------------------------------------------- extreme and non-finite inputs


def unit_rows(t):
    return t / t.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["plus", "minus"])
def test_logits_around_1e4(sign):
    """fp32 logits of magnitude 1e4: finite results; lse within fp32's relative rounding of the logits."""
    q, k, v = qkv(n=37, m=53, d=16, dv=16, seed=1)
    q = sign * 1e4 * math.sqrt(16) * unit_rows(q)
    k = unit_rows(k)
    attn = attncc.compile(spec(head_dim=16, causal=True))
    o, lse = attn(q, k, v, return_lse=True)
    reference_o, reference_lse = dense_attention(q, k, v, causal=True)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert reference_lse.abs().max() > 1e3  # the logits really are large
    # scores carry fp32 rounding of about 2^-24 * 1e4 each: lse within that, relative
    torch.testing.assert_close(lse.double(), reference_lse, rtol=3e-7, atol=0.0)
    torch.testing.assert_close(o.double(), reference_o, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_logits_in_half_precision(dtype):
    """Inputs representable in fp16 / bf16 whose logits reach about 1e4: scores are fp32, results finite."""
    q, k, v = qkv(n=20, m=20, d=16, dv=16, seed=2)
    q, k, v = (400 * unit_rows(q)).to(dtype), (100 * unit_rows(k)).to(dtype), v.to(dtype)
    o, lse = attncc.compile(spec(head_dim=16))(q, k, v, return_lse=True)
    reference_o, reference_lse = dense_attention(q, k, v)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(lse.double(), reference_lse, rtol=3e-7, atol=0.0)
    torch.testing.assert_close(o.double(), reference_o, **OUTPUT_TOLERANCE[dtype])


def test_overflowing_half_inputs_give_nan_rows_not_errors():
    """1e30 overflows fp16 to inf: every row reading it is NaN; nothing raises."""
    q, k, v = qkv(n=6, m=6, seed=3)
    o, lse = attncc.compile(spec())((q * 1e30).half(), k.half(), v.half(), return_lse=True)
    assert torch.isnan(o).all() and torch.isnan(lse).all()


def rows_seeing(key: int, n: int, m: int) -> torch.Tensor:
    """Query rows of a bottom-right causal mask that see ``key``."""
    return torch.arange(n) + (m - n) >= key


def test_nan_in_a_query_row_stays_in_that_row():
    q, k, v = qkv(n=11, m=13, seed=4)
    q[0, 1, 4, 2] = math.nan
    o, lse = attncc.compile(spec(causal=True))(q, k, v, return_lse=True)
    reference_o, reference_lse = dense_attention(q, k, v, causal=True)
    assert torch.isnan(o[0, 1, 4]).all() and torch.isnan(lse[0, 1, 4])
    others = torch.ones(2, 11, dtype=torch.bool)
    others[1, 4] = False
    torch.testing.assert_close(o[0][others].double(), reference_o[0][others], **OUTPUT_TOLERANCE[torch.float32])
    torch.testing.assert_close(lse[0][others].double(), reference_lse[0][others], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_key_reaches_only_rows_that_see_it(value):
    """A NaN or infinite key changes only the rows whose mask keeps it; masked rows are exact."""
    n, m, key = 11, 13, 9
    q, k, v = qkv(n=n, m=m, seed=5)
    k[0, 0, key, 3] = value
    o, lse = attncc.compile(spec(causal=True))(q, k, v, return_lse=True)
    reference_o, reference_lse = dense_attention(q, k, v, causal=True)
    blind = ~rows_seeing(key, n, m)
    assert blind.any() and (~blind).any()
    torch.testing.assert_close(o[0, 0, blind].double(), reference_o[0, 0, blind], **OUTPUT_TOLERANCE[torch.float32])
    torch.testing.assert_close(lse[0, 0, blind].double(), reference_lse[0, 0, blind], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(o[0, 1].double(), reference_o[0, 1], **OUTPUT_TOLERANCE[torch.float32])
    seeing = o[0, 0, ~blind]
    if math.isnan(value):
        assert torch.isnan(seeing).all() and torch.isnan(lse[0, 0, ~blind]).all()
    else:
        # a +inf score gives NaN (inf - inf in the softmax); a -inf score just drops the key
        scores = (q[0, 0, ~blind] @ k[0, 0, key]) / math.sqrt(8)
        assert torch.isnan(seeing[scores == math.inf]).all()
        finite_rows = scores == -math.inf
        assert torch.isfinite(seeing[finite_rows]).all()


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_value_never_raises(value):
    """A NaN or inf in v may reach any row of its KV tile (0 * NaN = NaN), but the rows that see it are non-finite."""
    n, m, key = 11, 13, 9
    q, k, v = qkv(n=n, m=m, seed=6)
    v[0, 0, key, 0] = value
    o = attncc.compile(spec(causal=True))(q, k, v)
    assert not torch.isfinite(o[0, 0, rows_seeing(key, n, m), 0]).any()
    assert torch.isfinite(o[0, 1]).all()


def test_score_mod_producing_nan_gives_nan_rows():
    """sqrt of a negative number inside a score_mod is NaN for those elements, and NaN for their rows."""
    attn = attncc.compile(spec(score_mod=lambda score, b, h, q_idx, kv_idx: score + torch.sqrt(q_idx - kv_idx)))
    o, lse = attn(*qkv(n=6, m=6), return_lse=True)
    assert torch.isnan(lse[0, :, :5]).all()  # rows 0..4 have a key kv_idx > q_idx
    assert torch.isfinite(lse[0, :, 5]).all()  # the last row sees only kv_idx <= q_idx


# --------------------------------------------------------------------------- the on-disk cache under concurrency

COMPILER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torch
    import attncc

    go = Path(sys.argv[1])
    while not go.exists():  # start together
        time.sleep(0.005)
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    specs = [
        attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, causal=True),
        attncc.AttentionSpec(num_heads=2, head_dim=8, window=(3, 1)),
        attncc.AttentionSpec(num_heads=2, head_dim=8, mask_mod=lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]),
    ]
    generator = torch.Generator().manual_seed(0)
    results = []
    for spec in specs:
        attn = attncc.compile(spec)
        q = torch.randn(1, spec.num_heads, 9, 8, generator=generator)
        k = torch.randn(1, spec.num_kv_heads, 9, 8, generator=generator)
        v = torch.randn(1, spec.num_kv_heads, 9, 8, generator=generator)
        results.append((attn.path.name, q, k, v, attn(q, k, v)))
    torch.save(results, sys.argv[2])
    """
)


def test_processes_compiling_together_share_the_cache(tmp_path):
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(cache)}
    workers = [
        subprocess.Popen([sys.executable, "-c", COMPILER, str(go), str(tmp_path / f"result{i}.pt")], env=env)
        for i in range(3)
    ]
    time.sleep(0.5)
    go.touch()
    assert [worker.wait(timeout=300) for worker in workers] == [0, 0, 0]
    results = [torch.load(tmp_path / f"result{i}.pt") for i in range(3)]
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    references = [
        {"causal": True},
        {"window": (3, 1)},
        {"mask_mod": lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]},
    ]
    for result in results:
        assert [name for name, *_ in result] == [name for name, *_ in results[0]]  # one file per spec
        for (_, q, k, v, o), options in zip(result, references):
            reference_o, _ = dense_attention(q, k, v, **options)
            torch.testing.assert_close(o.double(), reference_o, **OUTPUT_TOLERANCE[torch.float32])
    files = {path.name for path in cache.iterdir()}
    assert {name for name, *_ in results[0]} <= files
    assert not [name for name in files if name.startswith(".") or name.endswith(".tmp")]  # no temporary files left
    for name, *_ in results[0]:
        source = (cache / name).read_text(encoding="utf-8")
        compile(source, name, "exec")  # every file is whole
