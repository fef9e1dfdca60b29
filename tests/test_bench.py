"""attncc bench: what it counts, how it measures memory, that the baselines compute the same attention.

No assertion here is about speed; timings are for docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import pytest
import torch

import attncc
from attncc import AttnccError, bench
from attncc.bench import BenchCase, CaseSource
from attncc.cli import main
from attncc.passes import PIPELINES

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def case(n=6, m=6, heads=2, kv_heads=None, batch=1, head_dim=8, v_head_dim=None, **fields):
    spec = attncc.AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim,
                                **fields)  # fmt: skip
    return BenchCase("test", bench.describe_mask(spec), spec, batch, n, m)


def brute_force_pairs(batch, heads, n, m, keep) -> int:
    return sum(bool(keep(b, h, i, j)) for b in range(batch) for h in range(heads) for i in range(n) for j in range(m))


DOC = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
VISIBLE_CASES = {
    "dense": ({}, lambda b, h, i, j: True),
    "causal square": ({"causal": True}, lambda b, h, i, j: j <= i),
    "causal bottom right": ({"causal": True, "n": 4, "m": 9}, lambda b, h, i, j: j <= i + 5),
    "causal top left": ({"causal": "top_left", "n": 9, "m": 4}, lambda b, h, i, j: j <= i),
    "window": ({"causal": True, "window": (2, 0), "n": 10, "m": 10}, lambda b, h, i, j: i - 2 <= j <= i),
    "documents": ({"mask_mod": bench.document_causal_mask(DOC), "n": 10, "m": 10},
                  lambda b, h, i, j: DOC[i] == DOC[j] and j <= i),
    "per head": ({"mask_mod": lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + h, "heads": 3, "batch": 2},
                 lambda b, h, i, j: j <= i + h),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(VISIBLE_CASES))
def test_visible_pairs_count_what_the_mask_keeps(name):
    fields, keep = VISIBLE_CASES[name]
    sizes = {key: fields.pop(key) for key in ("n", "m", "heads", "batch") if key in fields}
    c = case(**sizes, **fields)
    expected = brute_force_pairs(c.batch, c.spec.num_heads, c.n, c.m, keep)
    assert bench.visible_pairs(c) == expected
    assert bench.useful_flops(c) == expected * 2 * (c.spec.head_dim + c.spec.v_head_dim)


def test_useful_flops_ignore_the_score_mod_and_count_dv():
    plain = case(n=5, m=7, causal=True, head_dim=8, v_head_dim=4)
    modded = case(n=5, m=7, causal=True, head_dim=8, v_head_dim=4, softcap=5.0)
    assert bench.useful_flops(plain) == bench.useful_flops(modded) == bench.visible_pairs(plain) * 2 * (8 + 4)


def test_document_ids_fill_the_sequence_with_nonempty_documents():
    ids = bench.document_ids(1024, 8, seed=3)
    lengths = torch.bincount(ids)
    assert ids.shape == (1024,) and len(lengths) == 8 and (lengths >= 1).all()
    assert (ids[1:] >= ids[:-1]).all()
    assert torch.equal(ids, bench.document_ids(1024, 8, seed=3))
    assert not torch.equal(ids, bench.document_ids(1024, 8, seed=4))


def test_the_suites_are_the_issues_workloads():
    cpu = bench.SUITES["cpu"](torch.device("cpu"))
    assert [c.name for c in cpu] == [f"{mask} N=M={n}" for n in (1024, 4096)
                                     for mask in ("dense", "causal", "sliding window 256", "document (8 docs)")]  # fmt: skip
    for c in cpu:
        assert (c.batch, c.spec.num_heads, c.spec.head_dim, c.dtype, c.n) == (1, 8, 64, torch.float32, c.m)
        assert c.implementations is None  # everything available on the device
    window = next(c for c in cpu if c.mask == "sliding window 256")
    assert window.spec.window == (256, 0) and window.spec.causal
    passes = bench.SUITES["passes"](torch.device("cpu"))
    assert [(c.name, c.implementations) for c in passes] == [
        ("causal N=M=8192", ("attncc-pytorch", "naive")),
        ("causal N=M=16384", ("attncc-pytorch", "naive")),
        ("dense N=M=8192", ("attncc-pytorch", "sdpa")),
    ]


def test_naive_memory_formula_at_16384_is_what_the_guard_compares():
    big = bench.SUITES["passes"](torch.device("cpu"))[1]
    scores = 8 * 16384 * 16384 * 4
    assert bench.naive_extra_bytes(big) == 2 * scores + 8 * 16384 * 64 * 4
    assert bench.mask_bytes(big) == 16384 * 16384
    needs = bench.naive_extra_bytes(big) + bench.input_bytes(big) + bench.mask_bytes(big)
    assert 16 * bench.GIB < needs < 17 * bench.GIB


def test_memory_guard_skips_and_reports_the_need():
    c = case(n=64, m=64, causal=True)
    row = bench.measure(c, "naive", bench.peers._setup_naive, "cpu", memory_limit=1024)
    assert row["status"] == "skipped"
    needs = bench.naive_extra_bytes(c) + bench.input_bytes(c) + bench.mask_bytes(c)
    assert row["needs_bytes"] == needs
    assert row["note"] == f"out of memory / skipped (needs {needs / bench.GIB:.1f} GiB, limit 0.0 GiB)"
    assert "median_s" not in row


def test_measured_peak_memory_follows_the_naive_formula():
    """Naive attention at N=M=2048 holds two [8, 2048, 2048] fp32 tensors: 256 MiB, measured in this process."""
    c = case(n=2048, m=2048, heads=8, head_dim=64, causal=True)
    rows = bench.run_benchmarks([c], "cpu", ["attncc-pytorch", "naive"], warmup=0, repeats=1)
    naive, compiled = (next(r for r in rows if r["implementation"] == name) for name in ("naive", "attncc-pytorch"))
    if naive["peak_bytes"] is None:
        pytest.skip("peak memory needs Linux's /proc/self/clear_refs")
    expected = bench.naive_extra_bytes(c)
    assert 0.85 * expected <= naive["peak_bytes"] <= 1.25 * expected
    assert compiled["peak_bytes"] < naive["peak_bytes"] / 4  # streaming: no [N, M] score matrix
    assert naive["max_abs_diff"] < 1e-5 and compiled["compared_to"] is None


def write_spec(tmp_path: Path, body: str) -> str:
    path = tmp_path / "bench.toml"
    path.write_text("[attention]\n" + body, encoding="utf-8")
    return str(path)


SPEC_FILES = {
    "gqa causal window, N < M": ("num_heads = 4\nnum_kv_heads = 2\nhead_dim = 16\ncausal = true\nwindow = [7, 0]\n",
                                 (24, 40)),
    "alibi causal": ("num_heads = 4\nhead_dim = 16\ncausal = true\nalibi = true\n", (24, 24)),
    "softcap and window both sides": ("num_heads = 2\nhead_dim = 16\nsoftcap = 5.0\nwindow = [4, 3]\n", (20, 28)),
    "mask expression with a tensor": ("num_heads = 2\nhead_dim = 16\nmask = 'doc[q_idx] == doc[kv_idx]'\n"
                                      "[attention.tensors]\ndoc = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3]\n",
                                      (16, 16)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SPEC_FILES))
def test_every_baseline_computes_the_same_attention(name, tmp_path):
    body, (n, m) = SPEC_FILES[name]
    source = CaseSource(spec_path=write_spec(tmp_path, body), lengths=((n, m),))
    names = ["attncc-pytorch", "sdpa-math", "sdpa-flash", "naive", "flex-eager"]
    rows = bench.run_benchmarks(source, "cpu", names, warmup=0, repeats=1, isolate=False)
    assert [row["implementation"] for row in rows] == names
    by_name = {row["implementation"]: row for row in rows}
    assert by_name["attncc-pytorch"]["compared_to"] is None
    for row in rows[1:]:
        if row["status"] == "n/a":
            assert row["implementation"].startswith("sdpa") and "softcap" in name
            assert row["note"] == "SDPA cannot apply a score_mod or softcap"
            continue
        assert row["status"] == "ok", row
        assert row["compared_to"] == "attncc-pytorch" and row["max_abs_diff"] < 1e-5, row
        assert row["useful_flops"] == bench.useful_flops(source.cases("cpu")[0])


def test_time_calls_counts_warmup_and_repeats():
    calls = []
    first, times = bench.time_calls(lambda: calls.append(1), warmup=2, repeats=4, budget_s=1e9, batch_s=0.0)
    assert len(calls) == 1 + 2 + 4 and len(times) == 4 and first >= 0
    calls.clear()
    _, times = bench.time_calls(lambda: calls.append(1), warmup=0, repeats=10, budget_s=0.0, batch_s=0.0)
    assert len(times) == 3 and len(calls) == 4  # over budget: three timed calls are enough for a median


def test_time_calls_times_short_calls_in_batches():
    """A call shorter than batch_s is timed as the mean of a batch lasting about batch_s; a longer one alone."""
    calls = []

    def short():
        calls.append(1)
        time.sleep(0.001)

    _, times = bench.time_calls(short, warmup=1, repeats=3, budget_s=1e9, batch_s=0.02)
    batch = (len(calls) - 2) // 3
    assert len(calls) == 2 + 3 * batch and 5 <= batch <= 20 and len(times) == 3
    assert all(0.001 <= t < 0.02 for t in times)  # per call, not per batch
    calls.clear()
    bench.time_calls(short, warmup=1, repeats=3, budget_s=1e9, batch_s=0.0005)
    assert len(calls) == 2 + 3


def test_rounds_alternate_and_merge_into_one_row_per_implementation(tmp_path):
    body, (n, m) = SPEC_FILES["gqa causal window, N < M"]
    source = CaseSource(spec_path=write_spec(tmp_path, body), lengths=((n, m),))
    seen = []
    rows = bench.run_benchmarks(source, "cpu", ["attncc-pytorch", "naive"], warmup=0, repeats=2, isolate=False,
                                rounds=3, progress=lambda done, total, row: seen.append((done, total, row["implementation"])))  # fmt: skip
    assert [name for _, _, name in seen] == ["attncc-pytorch", "naive"] * 3 and seen[-1][:2] == (6, 6)
    assert [row["implementation"] for row in rows] == ["attncc-pytorch", "naive"]
    for row in rows:
        assert len(row["round_medians_s"]) == 3 and len(row["times_s"]) == 6
        assert row["median_s"] == statistics.median(row["round_medians_s"])
    first, naive = rows
    assert first["versus_first"] == 1.0 and naive["max_abs_diff"] < 1e-5
    ratios = [b / a for a, b in zip(first["round_medians_s"], naive["round_medians_s"])]
    assert naive["versus_first"] == pytest.approx(statistics.median(ratios))
    assert f"{naive['versus_first']:.2f}x" in bench.results_table(rows)
    with pytest.raises(AttnccError, match="rounds=0 is invalid"):
        bench.run_benchmarks(source, "cpu", ["naive"], rounds=0)


def test_failures_and_missing_implementations_are_rows(tmp_path):
    path = write_spec(tmp_path, "num_heads = 2\nhead_dim = 8\nmask = 'doc[q_idx] == doc[kv_idx]'\n"
                                "[attention.tensors]\ndoc = { dtype = 'int64', shape = [64] }\n")  # fmt: skip
    rows = bench.run_benchmarks(CaseSource(spec_path=path, lengths=((8, 8),)), "cpu",
                                ["attncc-pytorch", "sdpa-cudnn"], repeats=1, isolate=False)  # fmt: skip
    assert rows[0]["status"] == "failed"
    assert "validation cannot invent integer values for captured tensor 'doc'" in rows[0]["note"]
    assert (rows[1]["status"], rows[1]["note"]) == ("n/a", "not available on cpu")
    assert rows[0]["useful_flops"] is None  # the mask reads values only a call supplies
    table = bench.results_table(rows)
    assert "failed: InputError" in table and "n/a: not available on cpu" in table


def test_cli_runs_workers_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", str(EXAMPLES / "llama3_8b.toml"), "--seq", "32", "--kv-seq", "48", "--impl", "attncc-pytorch",
            "--impl", "naive", "--warmup", "0", "--repeats", "2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "useful FLOP/s" in printed.out and f"wrote {out}" in printed.out
    assert "llama3_8b N=32 M=48 | naive" in printed.err  # progress, one line per run
    report = json.loads(out.read_text())
    assert report["command"] == (f"attncc bench {EXAMPLES / 'llama3_8b.toml'} --impl attncc-pytorch --impl naive "
                                 f"--seq 32 --kv-seq 48 --warmup 0 --repeats 2 --json {out}")  # fmt: skip
    assert report["machine"]["cores"] >= 1 and report["device"] == "cpu"
    compiled, naive = report["results"]
    assert compiled["status"] == naive["status"] == "ok"
    assert len(compiled["times_s"]) == 2 and compiled["median_s"] > 0 and compiled["compile_s"] > 0
    assert compiled["compile_warm_s"] > 0 and compiled["peak_bytes"] is not None
    assert naive["max_abs_diff"] < 1e-5
    pairs = 32 * sum(i + 48 - 32 + 1 for i in range(32))  # 32 heads; bottom-right causal: query i sees i + 17 keys
    assert compiled["useful_flops"] == pairs * 2 * (128 + 128)
    assert compiled["flops_per_s"] == pytest.approx(compiled["useful_flops"] / compiled["median_s"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench"], "give a spec file or --suite NAME"),
        (["bench", "x.toml", "--suite", "cpu"], "give a spec file or --suite NAME"),
        (["bench", "--suite", "gpus"], "suite='gpus' is unknown; known suites: cpu, passes, sparsity, gpu"),
        (["bench", "--suite", "gpu", "--case", "diagonal"], "case 'diagonal' is not in suite 'gpu'; its cases: dense,"),
        (["bench", "--suite", "gpu", "--seq", "100"], "no case of suite 'gpu' has the lengths [(100, 100)]"),
        (["bench", str(EXAMPLES / "gpt2.toml"), "--case", "causal"], "--case and --head-dim narrow a suite"),
        (["bench", str(EXAMPLES / "gpt2.toml"), "--impl", "attncc-triton@64x64"],
         "'attncc-triton@64x64' is invalid: attncc-triton@BLOCK_MxBLOCK_NxWARPSxSTAGES"),
        (["bench", str(EXAMPLES / "gpt2.toml"), "--seq", "0"], "--seq='0' is invalid: positive integers"),
        (["bench", str(EXAMPLES / "gpt2.toml"), "--seq", "8,16", "--kv-seq", "1,2,3"], "--kv-seq has 3 lengths"),
        (["bench", str(EXAMPLES / "gpt2.toml"), "--impl", "fastest"], "implementation 'fastest' is unknown; known:"),
        (["bench", str(EXAMPLES / "gpt2.toml"), "--repeats", "0"], "repeats >= 1"),
        (["bench", str(EXAMPLES / "gpt2.toml"), "--rounds", "0"], "rounds >= 1"),
    ],
)
def test_cli_argument_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"mask": mask, "implementation": name, "n": n, "median_s": n * scale * 1e-6}
        for mask in ("dense", "causal")
        for name, scale in (("attncc-pytorch", 2.0), ("naive", 3.0))
        for n in (1024, 4096)
    ] + [{"mask": "causal", "implementation": "naive", "n": 16384, "median_s": None}]
    path = tmp_path / "bench.png"
    bench.plot_results(rows, str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_formatting():
    assert bench.format_quantity(1.5e9, "FLOP/s") == "1.5 GFLOP/s"
    assert bench.format_quantity(3 * 2**30, "B", binary=True) == "3 GiB"
    assert bench.format_quantity(1020 * 2**20, "B", binary=True) == "0.996 GiB"
    assert bench.format_quantity(None, "B") == "-"
    assert bench.format_seconds(0.0123) == "12.3 ms" and bench.format_seconds(2.5) == "2.5 s"
    assert math.isclose(bench.GIB, 2**30)


def test_t5_bucket_boundary_matches_the_reference():
    """Found by attncc bench's max |o - first| column (fixed in ee9bad0): at |kv_idx - q_idx| = 64 the reference
    interpreter computed T5's bucket as 8 * (1 / log 16) * log 8 = 5.999999999999999 and floored it to 5."""
    report = attncc.validate(attncc.load_spec(EXAMPLES / "t5_base.toml"), dtypes=[torch.float32], shapes=[(1, 1, 65)],
                             verbose=False)  # fmt: skip
    assert report.ok


def test_gpu_suite_cases():
    cases = bench.SUITES["gpu"](torch.device("cpu"))
    assert len(cases) == 7 * 3 * 2
    assert all(c.backward and c.dtype == torch.bfloat16 and c.batch == 4 and c.spec.num_heads == 32 for c in cases)
    assert {c.mask for c in cases} == {"dense", "causal", "sliding window 1024", "gqa 32/8 causal", "document (8 docs)",
                                       "alibi causal", "softcap 50 causal"}  # fmt: skip
    narrowed = CaseSource(suite="gpu", lengths=((8192, 8192),), masks=("causal", "dense"), head_dims=(128,))
    assert [c.name for c in narrowed.cases("cpu")] == ["dense D=128 N=M=8192", "causal D=128 N=M=8192"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_gpu_suite_needs_cuda(capsys):
    assert main(["bench", "--suite", "gpu", "--device", "cuda", "--case", "causal", "--seq", "4096"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_tile_variant_reaches_the_tile_pass(monkeypatch):
    assert bench.peers.tile_variant("sdpa") is None
    compiled = []
    real_compile = attncc.compile
    monkeypatch.setattr(attncc, "compile", lambda spec, **options: compiled.append(options) or real_compile(spec, **options))
    bench.peers.tile_variant("attncc-triton@64x32x4x2")(case(n=5, m=7), "cpu")
    bench.peers.tile_variant("attncc-triton@64x32x4x2/32x64x2x1")(case(n=5, m=7), "cpu")
    assert compiled[0]["backend"] == "triton"
    assert compiled[0]["pipeline"] == [*PIPELINES["triton"][:-1],
                                       "tile{target=triton,block_m=64,block_n=32,num_warps=4,num_stages=2}"]  # fmt: skip
    assert compiled[1]["pipeline"][-1] == ("tile{target=triton,block_m=64,block_n=32,num_warps=4,num_stages=2,"
                                           "bwd_block_m=32,bwd_block_n=64,bwd_num_warps=2,bwd_num_stages=1}")  # fmt: skip
    for bad in ("attncc-triton@64x32x4", "attncc-triton@64x32x4x2/1x2", "attncc-triton@1x1x1x1/1x1x1x1/1x1x1x1"):
        with pytest.raises(AttnccError, match="is invalid: attncc-triton@BLOCK_MxBLOCK_NxWARPSxSTAGES"):
            bench.peers.tile_variant(bad)


def test_backward_timing_and_validation_in_one_run():
    """--backward adds forward + backward columns; --validate checks outputs and gradients against float64."""
    cases = [case(n=9, m=13, heads=4, kv_heads=2, causal=True), case(n=7, m=7, window=(2, 1), softcap=5.0)]
    cases = [dataclasses.replace(c, name=f"test {i}", backward=True) for i, c in enumerate(cases)]
    rows = bench.run_benchmarks(cases, "cpu", ["attncc-pytorch", "naive"], warmup=0, repeats=2, validate=True)
    for row in rows:
        assert row["status"] == "ok" and row["validation"].startswith("ok ("), row
        assert row["fwd_bwd_median_s"] > 0 and len(row["fwd_bwd_times_s"]) == 2
        assert row["fwd_bwd_flops_per_s"] == pytest.approx(3.5 * row["useful_flops"] / row["fwd_bwd_median_s"])
    assert rows[1]["versus_first_fwd_bwd"] > 0
    table = bench.results_table(rows)
    assert "fwd+bwd / first" in table and "validation" in table and "ok (" in table


def test_validation_catches_a_wrong_implementation():
    c = dataclasses.replace(case(n=8, m=8, causal=True), backward=True)

    def wrong_scale(bench_case, device):
        def bind(q, k, v):
            return lambda: bench.naive_attention(q, k, v, 0.9, ~bench.cases.keep_mask(bench_case, device))

        return bench.peers.Setup(bind)

    verdict = bench.check.check_implementation(c, wrong_scale, "cpu", bench.runner.make_inputs)
    assert verdict.startswith("FAIL (")
    right = bench.check.check_implementation(c, bench.peers._setup_naive, "cpu", bench.runner.make_inputs)
    assert right.startswith("ok (")


def test_decode_suite_cases():
    from attncc.bench.cases import kv_bytes

    cases = bench.SUITES["decode"](torch.device("cpu"))
    assert [(c.name, c.mask) for c in cases][:2] == [("decode B=1 M=1024", "B=1"), ("decode B=1 M=16384", "B=1")]
    assert [(c.batch, c.m) for c in cases] == [(b, m) for b in (1, 8, 64) for m in (1024, 16384, 131072)]
    for c in cases:
        spec = c.spec
        assert (c.n, spec.num_heads, spec.num_kv_heads, spec.head_dim, c.dtype) == (1, 32, 8, 128, torch.float32)
        assert c.bandwidth and c.implementations == bench.suites.DECODE_IMPLEMENTATIONS["cpu"]
    assert kv_bytes(cases[0]) == 2 * 8 * 1024 * 128 * 4
    gpu = bench.SUITES["decode"](torch.device("cuda"))  # the cases only, no device needed
    assert {(c.dtype, c.implementations[:2]) for c in gpu} == {(torch.bfloat16, ("attncc-triton", "attncc-triton-paged"))}


def test_paged_cache_of_the_decode_suite_holds_the_keys_scattered():
    from attncc.bench.peers import paged_cache

    k, v = torch.randn(3, 2, 23, 8), torch.randn(3, 2, 23, 8)
    cache = paged_cache(k, v, page_size=5)
    assert cache.page_table[0, :3].tolist() == [0, 3, 6]  # the sequences' pages interleave
    gathered_k, gathered_v = cache.gather()
    assert torch.equal(gathered_k, k) and torch.equal(gathered_v, v)


def test_decode_rows_report_kv_bytes_per_second_against_the_bandwidth(monkeypatch):
    from attncc.bench import runner
    from attncc.bench.cases import kv_bytes

    rates = iter([1e9, 2e9])
    monkeypatch.setattr(runner, "memory_bandwidth", lambda device: next(rates))
    spec = attncc.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16)
    case = BenchCase("decode B=2 M=300", "B=2", spec, 2, 1, 300, bandwidth=True)
    rows = bench.run_benchmarks([case], "cpu", ["attncc-pytorch", "attncc-pytorch-paged", "sdpa"], warmup=0,
                                repeats=2, rounds=2)  # fmt: skip
    moved = kv_bytes(case)
    for row in rows:
        assert row["status"] == "ok" and row["memory_bandwidths"] == [1e9, 2e9]
        assert row["kv_bytes_per_s"] == pytest.approx(moved / row["median_s"])
        first, second = row["round_medians_s"]
        assert row["bandwidth_fraction"] == pytest.approx((moved / first / 1e9 + moved / second / 2e9) / 2)
    assert rows[1]["max_abs_diff"] < 1e-5 and rows[2]["max_abs_diff"] < 1e-5
    table = bench.results_table(rows)
    assert "K/V read" in table and "of bandwidth" in table
