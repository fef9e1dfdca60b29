"""The CUDA backend against the float64 reference, without a GPU and with one.

Without a GPU the generated source runs in attncc's host emulation (the exact source compiled
by the host C++ compiler against ``include/attncc_emulation.h``): every numerics variant, forward
and backward, at small tiles (2 warps, 32 x 16) so that loops run over several tiles. ``nvcc``
compiles every variant at the default tiles for sm_80 and sm_90 and must report no spills, and
builds the standalone export example. Tests that need a CUDA device run where one is present.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sympy
import torch

import attncc
from attncc.backends import cuda
from attncc.backends.cuda import comment, cuda_source
from attncc.backends.cuda_runtime import emulation_library
from attncc.cli import main
from attncc.passes import PIPELINES
from tests.reference import assert_attention_matches, dense_attention
from tests.test_numerics import MOD_CASES, SPEC_CASES, random_qkv
from tests.test_triton import SHAPES, check_forward_backward

HOST_COMPILER = shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++")
NVCC = shutil.which("nvcc")
requires_host_compiler = pytest.mark.skipif(HOST_COMPILER is None, reason="needs a C++20 host compiler (g++)")
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="needs the CUDA compiler nvcc")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL_TILES = [*PIPELINES["cuda"][:-1], "tile{target=cuda,block_m=32,block_n=16,num_warps=2}"]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def variant_spec(case: str):
    """(spec, reference options) of a numerics variant at the shapes of SHAPES."""
    _, heads, kv_heads, _, _, d = SHAPES[case]
    if case in SPEC_CASES:
        fields, options, _ = SPEC_CASES[case]
    else:
        score_mod, mask_mod, _ = MOD_CASES[case]
        fields = {"score_mod": score_mod, "mask_mod": mask_mod}
        options = {"score_mod": score_mod, "mask_mod": mask_mod}
    return attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, **fields), options


@functools.cache
def compiled_variant(case: str, pipeline: tuple[str, ...] = tuple(SMALL_TILES)):
    spec, options = variant_spec(case)
    return attncc.compile(spec, backend="cuda", pipeline=list(pipeline)), options


@pytest.fixture(scope="module")
def emulated_variants():
    """Every variant compiled for the host emulation up front, two compilers at a time."""
    sources = [compiled_variant(case)[0].module.CUDA_SOURCE for case in sorted(SHAPES)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(emulation_library, sources))


def run_variant(case: str, dtype, device="cpu"):
    attn, options = compiled_variant(case)
    attn = attn.to(device)
    batch, heads, kv_heads, n, m, d = SHAPES[case]
    q, k, v = random_qkv(batch, heads, kv_heads, n, m, d, attn.spec.v_head_dim, dtype, seed=len(case))
    check_forward_backward(attn, options, q.to(device), k.to(device), v.to(device), seed=len(case))


@requires_host_compiler
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_variant_forward_and_backward_in_emulation(case, dtype, emulated_variants):
    run_variant(case, dtype)


@requires_host_compiler
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_tiles_in_emulation(dtype):
    # 4 warps, 64 x 64 tiles (24 x 40 head dims pad to 32 x 48); N, M not multiples of a tile
    spec = attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=24, v_head_dim=40, causal=True)
    attn = attncc.compile(spec, backend="cuda")
    assert "constexpr int BLOCK_N = 64;" in attn.module.CUDA_SOURCE
    q, k, v = random_qkv(1, 4, 2, 70, 131, 24, 40, dtype, seed=2)
    check_forward_backward(attn, {"causal": True}, q, k, v)


@requires_host_compiler
def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_gradients(emulated_variants):
    attn, options = compiled_variant("fully_masked_rows")
    q, k, v = random_qkv(1, 2, 2, 23, 23, 16, seed=1)
    dq, _, _ = check_forward_backward(attn, options, q, k, v)
    o, lse = attn(q, k, v, return_lse=True)
    empty = torch.arange(23) % 5 == 0
    assert torch.equal(o[:, :, empty], torch.zeros_like(o[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all() and torch.isfinite(lse[:, :, ~empty]).all()
    assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))


@requires_host_compiler
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_take_the_element_path(dtype):
    # q in [B, N, H, D] layout, k every other key, v transposed: no 16-byte rows for cp.async
    spec = attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, window=(6, 2))
    attn = attncc.compile(spec, backend="cuda", pipeline=SMALL_TILES)
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, 21, 4, 16, generator=generator).to(dtype).transpose(1, 2)
    k = torch.randn(2, 2, 50, 16, generator=generator).to(dtype)[:, :, ::2]
    v = torch.randn(2, 2, 16, 50, generator=generator).to(dtype).transpose(2, 3)[:, :, 1::2]
    check_forward_backward(attn, {"window": (6, 2)}, q, k, v)


@requires_host_compiler
def test_python_floor_division_and_modulo_of_negative_numbers():
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + 0.25 * ((kv_idx - q_idx) // 3) - 0.5 * ((q_idx - kv_idx) % 4) + 0.1 * ((kv_idx - 7) % -5)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx - q_idx) // 4 != -2

    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, score_mod=score_mod, mask_mod=mask_mod)
    attn = attncc.compile(spec, backend="cuda", pipeline=SMALL_TILES)
    assert "floor_div(" in attn.module.CUDA_SOURCE and "floor_mod(" in attn.module.CUDA_SOURCE
    q, k, v = random_qkv(1, 2, 2, 27, 30, 16, seed=5)
    check_forward_backward(attn, {"score_mod": score_mod, "mask_mod": mask_mod}, q, k, v)


@requires_host_compiler
def test_nested_and_multidimensional_captured_tensors():
    owner = torch.tensor([0] * 7 + [1] * 12 + [2] * 11)
    intervals = torch.tensor([[0, 7], [3, 19], [19, 30]], dtype=torch.int32)
    table = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(2))
    gate = torch.tensor([True, False, True])

    def mask_mod(b, h, q_idx, kv_idx):
        start = intervals[owner[kv_idx]][0]
        return (q_idx >= start) & ((q_idx < intervals[owner[kv_idx], 1]) | gate[owner[q_idx]])

    def reference_mask(b, h, q_idx, kv_idx):
        start = intervals[owner[kv_idx], 0]
        return (q_idx >= start) & ((q_idx < intervals[owner[kv_idx], 1]) | gate[owner[q_idx]])

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, owner[q_idx], owner[kv_idx]]

    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, score_mod=score_mod, mask_mod=mask_mod)
    attn = attncc.compile(spec, backend="cuda", pipeline=SMALL_TILES)
    source = attn.module.CUDA_SOURCE
    assert "const int32_t* cap1_intervals;" in source and "const bool* cap0_gate;" in source
    q, k, v = random_qkv(1, 2, 2, 30, 30, 16, seed=6)
    check_forward_backward(attn, {"score_mod": score_mod, "mask_mod": reference_mask}, q, k, v)
    # new captured values are runtime inputs: no recompile
    other = torch.tensor([0] * 10 + [2] * 20)
    o = attn(q, k, v, owner=other)
    expected, _ = dense_attention(
        q, k, v, mask_mod=lambda b, h, i, j: (i >= intervals[other[j], 0]) & ((i < intervals[other[j], 1]) | gate[other[i]]),
        score_mod=lambda s, b, h, i, j: s + table[h, other[i], other[j]],
    )  # fmt: skip
    torch.testing.assert_close(o.double(), expected, atol=2e-6, rtol=2e-6)


@requires_host_compiler
def test_natural_exp_region_without_fold_scale():
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, softcap=4.0, causal=True)
    pipeline = ["canonicalize", "group-kv", "online-softmax", "tile{target=cuda,block_m=16,block_n=16,num_warps=1}"]
    attn = attncc.compile(spec, backend="cuda", pipeline=pipeline)
    assert "return expf(x);" in attn.module.CUDA_SOURCE
    q, k, v = random_qkv(1, 2, 2, 20, 26, 16, seed=8)
    check_forward_backward(attn, {"softcap": 4.0, "causal": True}, q, k, v)


@requires_host_compiler
@pytest.mark.parametrize("n, m", [(1, 1), (1, 40), (40, 1), (32, 16)])
def test_any_lengths(n, m):
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, causal=True), backend="cuda",
                          pipeline=SMALL_TILES)  # fmt: skip
    q, k, v = random_qkv(1, 2, 2, n, m, 16, seed=n + m)
    check_forward_backward(attn, {"causal": True}, q, k, v)


@requires_host_compiler
def test_torch_compile_custom_op_and_flex_attention_drop_in():
    q, k, v = random_qkv(1, 2, 1, 20, 24, 16, seed=10)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - 0.1 * abs(q_idx - kv_idx)

    o, lse = attncc.flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True, return_lse=True, backend="cuda")
    assert_attention_matches(o, lse, *dense_attention(q, k, v, score_mod=score_mod), torch.float32)
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=16, causal=True), backend="cuda")
    compiled = torch.compile(lambda q, k, v: attn(q, k, v) * 2, fullgraph=True, backend="eager")
    expected, _ = dense_attention(q, k, v, causal=True)
    torch.testing.assert_close(compiled(q, k, v).double(), 2 * expected, atol=4e-6, rtol=4e-6)


def test_generated_source_names_captured_tensors_by_identifier():
    lengths = torch.tensor([5, 9])
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16, mask_mod=lambda b, h, i, j: j < lengths[b])
    attn = attncc.compile(spec, backend="cuda")
    source = attn.module.CUDA_SOURCE
    assert "const int64_t* cap0_lengths;" in source and "//   cap0_lengths: int64_t [1 dims]  // lengths" in source
    assert "cap.cap0_lengths[" in source and "// mask = kv_idx < cap0_lengths[b]" in source
    # the user's label itself appears in comments only (the printed IR, the Captured note)
    code = [line for line in source.splitlines() if not line.lstrip().startswith("//")]
    assert not [line for line in code if re.search(r"\blengths\b", line)]
    assert attn.module.CUDA_HEADER.count("const void* cap0_lengths, const int64_t* cap0_lengths_strides") == 2
    assert "\\" not in source and "TODO" not in source


def test_captured_names_follow_the_shared_rule():
    out = torch.tensor([1.0, 2.0])  # a label that would collide with generated names is numbered

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + out[b]

    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=16, score_mod=score_mod), backend="cuda")
    assert attn.module.CAPTURED_NAMES == ("cap0_out",)
    code = [line for line in attn.module.CUDA_SOURCE.splitlines() if not line.lstrip().startswith("//")]
    assert "    const float* cap0_out;" in code and not [line for line in code if re.search(r"\bout\b", line)]


def test_comments_cannot_splice_lines_or_break_out():
    assert comment("name\\") == "name?" and comment("a\nb\x00") == "a?b?"


def test_tiles_must_fit_the_warps():
    spec = attncc.AttentionSpec(num_heads=2, head_dim=16)
    with pytest.raises(attncc.BackendError, match=r"block_m = 16 \* num_warps \(64\) is allowed"):
        attncc.compile(spec, backend="cuda", pipeline=["online-softmax", "tile{target=cuda,block_m=32}"])
    with pytest.raises(attncc.BackendError, match="a positive multiple of 16 is allowed"):
        attncc.compile(spec, backend="cuda", pipeline=["online-softmax", "tile{target=cuda,block_n=24}"])
    with pytest.raises(attncc.BackendError, match="bwd_block_n=32 are invalid for cuda"):
        attncc.compile(spec, backend="cuda", pipeline=["online-softmax", "tile{target=cuda,bwd_block_n=32}"])
    with pytest.raises(attncc.BackendError, match="one fused flash_attention region"):
        attncc.compile(spec, backend="cuda", pipeline=["canonicalize"])


def test_missing_host_compiler_is_a_backend_error(monkeypatch):
    from attncc.backends import cuda_runtime, host_library

    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(host_library.shutil, "which", lambda name: None)
    with pytest.raises(attncc.BackendError, match=r"C\+\+20 compiler"):
        cuda_runtime.host_compiler()


# -- nvcc: every variant at the default tiles, for sm_80 and sm_90
PTXAS_KERNEL = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
ARCHITECTURES = ("sm_80", "sm_90")


def ptxas_report(source: str, directory: Path) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(kernel, arch) -> (stack frame, spill stores, spill loads) bytes, from nvcc -Xptxas -v.

    One nvcc run generates the PTX (compute_80, the source has no architecture branches) and
    ptxas assembles it for each architecture in parallel.
    """
    cu = directory / "attention.cu"
    cu.write_text(source, encoding="utf-8")
    ptx = directory / "attention.ptx"
    subprocess.run([NVCC, "-std=c++17", "-ptx", "-arch=compute_80", "-x", "cu", str(cu), "-o", str(ptx)], check=True,
                   capture_output=True, text=True)  # fmt: skip
    commands = [["ptxas", "-v", f"-arch={arch}", str(ptx), "-o", str(directory / f"{arch}.cubin")]
                for arch in ARCHITECTURES]  # fmt: skip
    with ThreadPoolExecutor(len(commands)) as pool:
        results = list(pool.map(lambda c: subprocess.run(c, check=True, capture_output=True, text=True), commands))
    report = {}
    for result in results:
        kernel = None
        for line in result.stderr.splitlines():
            if match := PTXAS_KERNEL.search(line):
                kernel = match.groups()
            elif (match := PTXAS_SPILLS.search(line)) and kernel is not None:
                report[kernel] = tuple(int(x) for x in match.groups())
    return report


@requires_nvcc
def test_every_variant_compiles_for_sm80_and_sm90_without_spills():
    sources = {case: compiled_variant(case, tuple(PIPELINES["cuda"]))[0].module.CUDA_SOURCE for case in SHAPES}
    kernels = {f"attncc_{k}_{d}" for k in ("forward", "backward_delta", "backward_dkdv", "backward_dq")
               for d in ("f16", "bf16", "f32")}  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, ThreadPoolExecutor(max(1, (os.cpu_count() or 2) // 2)) as pool:
        directories = [Path(root) / case for case in sources]
        for directory in directories:
            directory.mkdir()
        reports = dict(zip(sources, pool.map(ptxas_report, sources.values(), directories)))
    seconds = time.perf_counter() - start
    for case, report in reports.items():
        assert set(report) == {(k, arch) for k in kernels for arch in ARCHITECTURES}, case
        spilled = {key: value for key, value in report.items() if value != (0, 0, 0)}
        assert not spilled, f"{case}: stack frame / spill stores / spill loads in {spilled}"
    print(f"nvcc + ptxas for {len(sources)} variants x {len(ARCHITECTURES)} architectures: {seconds:.1f} s")


@requires_nvcc
def test_rope_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    """RoPE turns tiles in shared memory and stages dQ / dK to turn them back: no register spills. cosf / sinf
    keep a 32-byte stack frame for their slow argument reduction (angles beyond about 1e5), used only there."""
    rope = attncc.RoPE(theta=500000.0, rotary_dim=96, scaling={"rope_type": "linear", "factor": 4.0})
    spec = attncc.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=128, rope=rope, causal=True)
    attn = attncc.compile(spec, backend="cuda").with_positions(("kv", "q"))
    report = ptxas_report(attn.module.CUDA_SOURCE, tmp_path)
    assert len(report) == 4 * 3 * len(ARCHITECTURES)
    assert all(spill_stores == spill_loads == 0 and frame <= 32 for frame, spill_stores, spill_loads in report.values())


@requires_nvcc
def test_export_example_builds_and_runs_where_a_gpu_is(tmp_path, capsys):
    source = tmp_path / "attn.cu"
    assert (
        main(["compile", str(EXAMPLES / "cuda_host" / "attention.toml"), "--backend", "cuda", "-o", str(source)]) == 0
    )
    assert "attn.h" in capsys.readouterr().out and (tmp_path / "attn.h").exists()
    assert '#include "attncc_emulation.h"' in source.read_text()  # only under -DATTNCC_EMULATION
    shutil.copy(EXAMPLES / "cuda_host" / "main.cpp", tmp_path)
    binary = tmp_path / "attention_host"
    subprocess.run([NVCC, "-std=c++17", "-arch=sm_80", "main.cpp", "attn.cu", "-o", str(binary)], cwd=tmp_path,
                   check=True, capture_output=True, text=True)  # fmt: skip
    if torch.cuda.is_available():
        result = subprocess.run([str(binary)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@requires_host_compiler
def test_exported_source_runs_through_its_c_abi_in_emulation(tmp_path):
    """The exported file, compiled alone against the emulation header, called through the documented C ABI."""
    import ctypes

    from attncc.backends.cuda_runtime import EMULATION_FLAGS, INCLUDE_DIR

    spec = attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=True)
    attn = attncc.compile(spec, backend="cuda")
    source = tmp_path / "attn.cu"
    source.write_text(cuda_source(attn.graph).source)
    library_path = tmp_path / "attn.so"
    subprocess.run([HOST_COMPILER, *EMULATION_FLAGS, "-I", str(INCLUDE_DIR), "-x", "c++", str(source), "-o",
                    str(library_path)], check=True)  # fmt: skip
    library = ctypes.CDLL(str(library_path))
    q, k, v = (t.half() for t in random_qkv(1, 4, 2, 9, 12, 16, seed=3))
    o = torch.empty_like(q)
    lse = torch.empty(1, 4, 9)

    def strides(t):
        return (ctypes.c_int64 * 4)(*t.stride())

    pointer = ctypes.c_void_p
    status = library.attncc_attention_forward(
        0, pointer(q.data_ptr()), strides(q), pointer(k.data_ptr()), strides(k), pointer(v.data_ptr()), strides(v),
        pointer(o.data_ptr()), strides(o), pointer(lse.data_ptr()), 1, 4, 9, 12, None,
    )  # fmt: skip
    assert status == 0
    assert_attention_matches(o, lse, *dense_attention(q, k, v, causal=True), torch.float16)
    assert (
        library.attncc_attention_forward(
            0, None, strides(q), None, strides(k), None, strides(v), None, strides(o), None, 1, 3, 9, 12, None
        )
        != 0
    )  # 3 heads: not a multiple of 2 groups


# -- on a GPU
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_variant_on_cuda(case, dtype):
    run_variant(case, dtype, device="cuda")


@requires_cuda
def test_cuda_output_tolerances_hold_at_default_tiles():
    spec = attncc.AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=128, causal=True)
    attn = attncc.compile(spec, backend="cuda")
    q, k, v = random_qkv(2, 8, 2, 517, 777, 128, dtype=torch.bfloat16, seed=3)
    check_forward_backward(attn, {"causal": True}, q.cuda(), k.cuda(), v.cuda())


@requires_cuda
def test_cuda_runs_on_the_current_stream():
    attn = attncc.compile(attncc.AttentionSpec(num_heads=2, head_dim=64, causal=True), backend="cuda")
    q, k, v = (t.cuda() for t in random_qkv(1, 2, 2, 300, 300, 64, dtype=torch.float16, seed=4))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        o = attn(q, k, v)
    stream.synchronize()
    torch.testing.assert_close(o.cpu().double(), dense_attention(q.cpu(), k.cpu(), v.cpu(), causal=True)[0],
                               atol=1e-3, rtol=5e-4)  # fmt: skip


@requires_host_compiler
def test_printer_keeps_the_precedence_of_sums_under_division_powers_and_modulo():
    """Finding P (fuzzing the CPU decoding kernel): 1 / (1 + exp(x)) printed as ``1.0f / 1 + expf(x)``; powers
    with a sum in the exponent and float // and % of sums had the same fault. Compiled C++ against sympy."""
    from attncc.backends.host_library import build_library
    from attncc.ir.expr import FloorDiv

    x, y = sympy.symbols("x y", real=True)
    expressions = [1 / (1 + sympy.exp(x)), x ** (y + 1), 3 ** (x + y), sympy.Mod(x + 1, y + 2), FloorDiv(x + 1, y + 2),
                   (x + y) ** -1 * (x - y)]  # fmt: skip
    printer = cuda.CudaPrinter()
    functions = "".join(
        f'extern "C" float expression{i}(float x, float y) {{ return {printer.doprint(e)}; }}\n'
        for i, e in enumerate(expressions)
    )
    library = build_library("#include <cmath>\n" + functions, ("-O1", "-shared", "-fPIC"), "printer-test", "a test")
    for i, expression in enumerate(expressions):
        function = getattr(library, f"expression{i}")
        function.restype, function.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
        for point in ((0.7, 1.3), (2.5, -0.4)):
            expected = float(expression.subs(dict(zip((x, y), point))))
            assert function(*point) == pytest.approx(expected, rel=1e-5), (expression, point)
