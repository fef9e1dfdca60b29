"""Linear attention: the quadratic graph, the linearize pass, both backends and the state, against float64.

Every compiled result is compared with the float64 reference of the unoptimized quadratic
graph (feature maps, QK^T, mask by zero, row sums, AV) on fresh random inputs. Small
chunks (and, for pytorch, small steps) put many chunk and step boundaries into tiny shapes.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import attncc
from attncc.bench import BenchCase
from attncc.frontend.feature_map import FEATURE_MAPS, feature_map_expr
from attncc.frontend.lower import lower_linear
from attncc.interpreter import run_linear_region, run_reference
from attncc.ir import ops
from attncc.ir.cost import graph_cost
from attncc.ir.expr import kv_idx, q_idx
from attncc.linear import compile_linear
from attncc.passes import LINEAR_PIPELINES, PassManager, pipeline
from attncc.passes.rewrite import rebuild
from attncc.validation import TOLERANCES

TRITON = importlib.util.find_spec("triton")
if TRITON is not None:
    INTERPRETER_PROBLEM = importlib.import_module("attncc.backends.triton").interpreter_problem()
requires_triton = pytest.mark.skipif(
    TRITON is None or INTERPRETER_PROBLEM is not None, reason="triton is not installed or cannot interpret here"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL_CHUNKS = ["canonicalize", "group-kv", "linearize{chunk=4}"]


def spec(causal=True, feature_map="elu+1", normalize=True, heads=4, kv_heads=2, dim=8, v_dim=6, **fields):
    return attncc.AttentionSpec(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, v_head_dim=v_dim, causal=causal, kind="linear",
        feature_map=feature_map, normalize=normalize, **fields,
    )  # fmt: skip


def small_steps(attn, rows=8):
    """Shrink the pytorch program's step so that tiny inputs take several steps."""
    attn._function.__globals__["ROWS"] = rows
    return attn


def qkv(s, batch, n, m, dtype=torch.float32, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, s.num_heads, n, s.head_dim), (batch, s.num_kv_heads, m, s.head_dim),
              (batch, s.num_kv_heads, m, s.v_head_dim)]  # fmt: skip
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_(requires_grad) for shape in shapes]


def reference(attn, q, k, v):
    return run_reference(attn.unoptimized_graph, q.double(), k.double(), v.double())["o"]


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * max(scale, 1.0), rtol=rtol)


# --------------------------------------------------------------------------- IR and the pass


def test_quadratic_graph_and_its_linearization_print():
    attn = attncc.compile(spec(causal=True))
    assert str(attn.unoptimized_graph) == (
        "graph(%q: T[B, 4, N, 8], %k: T[B, 2, M, 8], %v: T[B, 2, M, 6]) {\n"
        "  %0 = feature_map(%q) {phi = Piecewise((x + 1, x > 0), (exp(x), True))} : f32[B, 4, N, 8]\n"
        "  %1 = feature_map(%k) {phi = Piecewise((x + 1, x > 0), (exp(x), True))} : f32[B, 2, M, 8]\n"
        "  %2 = repeat_kv(%1) {groups = 2} : f32[B, 4, M, 8]\n"
        "  %3 = repeat_kv(%v) {groups = 2} : T[B, 4, M, 6]\n"
        "  %4 = matmul(%0, %2) {transpose_b = true} : f32[B, 4, N, M]\n"
        "  %5 = scale(%4) {factor = sqrt(2)/4} : f32[B, 4, N, M]\n"
        "  %6 = mask_zero(%5) {predicate = kv_idx <= M - N + q_idx} : f32[B, 4, N, M]\n"
        "  %7 = normalize_rows(%6) {eps = 9.9999999999999995e-7} : f32[B, 4, N, M]\n"
        "  %8 = matmul(%7, %3) {transpose_b = false} : f32[B, 4, N, 6]\n"
        "  output(%8) {names = (o,)}\n"
        "}"
    )
    assert str(attn.graph) == (
        "graph(%q: T[B, 4, N, 8], %k: T[B, 2, M, 8], %v: T[B, 2, M, 6]) {\n"
        "  %0 = linear_attention(%q, %k, %v) {causal = true, chunk = 64, eps = 9.9999999999999995e-7, "
        "form = chunked, groups = 2, normalize = true, phi = Piecewise((x + 1, x > 0), (exp(x), True)), "
        "scale = sqrt(2)/4} : f32[B, 4, N, 6]\n"
        "  output(%0) {names = (o,)}\n"
        "}"
    )
    assert attn.pass_records[-1].stats == {"chunked": 1}


@pytest.mark.parametrize("feature_map", list(FEATURE_MAPS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_linearize_is_translation_validated(feature_map, causal, normalize):
    s = spec(causal=causal, feature_map=feature_map, normalize=normalize)
    manager = PassManager(pipeline(SMALL_CHUNKS), validate_each=True)
    graph = manager.run(lower_linear(s, feature_map_expr(feature_map)))
    (region,) = graph.nodes_of(ops.LinearAttention)
    assert region.op.form == ("chunked" if causal else "parallel")
    assert manager.records[-1].max_change < 1e-12


def test_linearize_leaves_other_graphs_alone():
    def windowed(node, inputs, builder):  # a sliding window instead of causality: not the pass's pattern
        if isinstance(node.op, ops.MaskZero):
            return builder.add(ops.MaskZero(kv_idx >= q_idx - 3), *inputs)
        return None

    graph = rebuild(lower_linear(spec(causal=True), feature_map_expr("relu")), windowed)
    manager = PassManager(pipeline(["linearize"]))
    assert manager.run(graph) is graph
    assert manager.records[0].stats == {"not_linearized": 1}


def test_reference_chunked_region_is_the_recurrence_at_chunk_one():
    s = spec(causal=True)
    region = ops.LinearAttention(groups=2, phi=FEATURE_MAPS["elu+1"], scale=s.head_dim**-0.5, causal=True,
                                 normalize=True, eps=attncc.ir.expr.number(1e-6), form="chunked", chunk=1)  # fmt: skip
    q, k, v = (t.double() for t in qkv(s, 1, 9, 13))
    o, state = run_linear_region(region, q, k, v)
    # decoding: one query and one key at a time, the state carried
    prefix = run_linear_region(region, q[:, :, :0], k[:, :, :4], v[:, :, :4])[1]
    steps = []
    for i in range(9):
        step, prefix = run_linear_region(region, q[:, :, i : i + 1], k[:, :, 4 + i : 5 + i], v[:, :, 4 + i : 5 + i],
                                         prefix)  # fmt: skip
        steps.append(step)
    torch.testing.assert_close(torch.cat(steps, 2), o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(prefix[0], state[0], atol=1e-12, rtol=1e-12)


def test_cost_model_goes_from_quadratic_to_linear():
    attn = attncc.compile(spec(causal=True, heads=8, kv_heads=8, dim=64, v_dim=64))
    for graph, ratio in ((attn.unoptimized_graph, 64), (attn.graph, 8)):
        small, large = (graph_cost(graph).at({"B": 1, "N": n, "M": n}) for n in (4096, 32768))
        assert float(large.flops) / float(small.flops) == pytest.approx(ratio, rel=0.05)
    linear = graph_cost(attn.graph).at({"B": 1, "N": 262144, "M": 262144})
    inputs = 3 * 8 * 262144 * 64 * 2
    assert float(linear.peak_memory) < 2 * inputs  # o (f32) and the states, never N x M
    assert "linearize" in attn.explain()


# --------------------------------------------------------------------------- pytorch backend


@pytest.mark.parametrize("feature_map", list(FEATURE_MAPS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_pytorch_matches_the_quadratic_graph(feature_map, causal, normalize):
    if feature_map == "identity" and normalize:
        pytest.skip("identity features make row sums cross zero: normalising them is ill-conditioned")
    attn = small_steps(attncc.compile(spec(causal, feature_map, normalize), pipeline=SMALL_CHUNKS))
    for batch, n, m in ((2, 37, 53), (1, 29, 11), (1, 8, 8), (1, 1, 6)):
        q, k, v = qkv(attn.spec, batch, n, m, seed=n)
        assert_close(attn(q, k, v), reference(attn, q, k, v), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pytorch_dtypes_and_default_pipeline(dtype):
    attn = attncc.compile(spec(causal=True))
    q, k, v = qkv(attn.spec, 2, 70, 75, dtype)
    o = attn(q, k, v)
    assert o.dtype == dtype
    assert_close(o, reference(attn, q, k, v), dtype)


def test_validate_reports_linear_attention():
    report = attncc.validate(spec(causal=True, feature_map="relu"), verbose=False)
    assert report.ok and len(report.rows) == 6


def test_user_feature_map_is_traced_and_differentiated():
    phi = lambda x: torch.nn.functional.elu(x) + 1 + 0.5 * torch.relu(x) ** 2  # noqa: E731
    attn = small_steps(attncc.compile(spec(causal=True, feature_map=phi), pipeline=SMALL_CHUNKS))
    assert "Piecewise" in str(attn.graph) and "def phi_grad(x)" in attn.source
    q, k, v = qkv(attn.spec, 1, 21, 21, requires_grad=True)
    o = attn(q, k, v)
    grads = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(reference(attn, q64, k64, v64), (q64, k64, v64), torch.ones_like(o).double())
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_pytorch_gradients_match_the_quadratic_graph(causal, normalize):
    attn = small_steps(attncc.compile(spec(causal, normalize=normalize), pipeline=SMALL_CHUNKS))
    for batch, n, m in ((2, 19, 30), (1, 17, 9)):
        q, k, v = qkv(attn.spec, batch, n, m, seed=n, requires_grad=True)
        o = attn(q, k, v)
        grad_o = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, k, v), grad_o)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        expected = torch.autograd.grad(reference(attn, q64, k64, v64), (q64, k64, v64), grad_o.double())
        for actual, wanted in zip(grads, expected):
            assert_close(actual, wanted, torch.float32)


def test_backward_stores_no_n_by_m_matrix():
    attn = attncc.compile(spec(causal=True, heads=2, kv_heads=2, dim=16, v_dim=16))
    q, k, v = qkv(attn.spec, 1, 1024, 1024, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        o = attn(q, k, v)
    assert max(saved) <= q.numel()  # q, k, v, o, row divisors: nothing of size N x M
    o.sum().backward()
    assert q.grad.shape == q.shape


# --------------------------------------------------------------------------- state carry


@pytest.mark.parametrize("causal", [False, True])
def test_two_calls_with_a_state_are_one_call(causal):
    attn = small_steps(attncc.compile(spec(causal), pipeline=SMALL_CHUNKS))
    q, k, v = qkv(attn.spec, 2, 23, 31)
    whole, state = attn(q, k, v, return_state=True)
    if causal:  # queries 0..10 see keys up to 10 + 8: the first call takes those keys
        first, carried = attn(q[:, :, :11], k[:, :, :19], v[:, :, :19], return_state=True)
        second, final = attn(q[:, :, 11:], k[:, :, 19:], v[:, :, 19:], initial_state=carried, return_state=True)
        assert_close(torch.cat([first, second], 2), whole, torch.float32)
    else:  # all keys visible: a state of the first keys, then the rest
        _, carried = attn(q[:, :, :1], k[:, :, :12], v[:, :, :12], return_state=True)
        second, final = attn(q, k[:, :, 12:], v[:, :, 12:], initial_state=carried, return_state=True)
        assert_close(second, whole, torch.float32)
    assert_close(final.kv, state.kv, torch.float32)
    assert_close(final.k_sum, state.k_sum, torch.float32)


def test_decoding_token_by_token_matches_the_full_sequence():
    attn = attncc.compile(spec(causal=True))
    q, k, v = qkv(attn.spec, 1, 20, 20)
    full = attn(q, k, v)
    prompt, state = attn(q[:, :, :8], k[:, :, :8], v[:, :, :8], return_state=True)
    outputs = [prompt]
    for i in range(8, 20):
        o, state = attn(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], initial_state=state,
                        return_state=True)  # fmt: skip
        outputs.append(o)
    assert_close(torch.cat(outputs, 2), full, torch.float32)


def test_gradients_flow_through_the_state():
    attn = small_steps(attncc.compile(spec(causal=True), pipeline=SMALL_CHUNKS))
    q, k, v = qkv(attn.spec, 1, 14, 22, requires_grad=True)
    _, state = attn(q[:, :, :4], k[:, :, :12], v[:, :, :12], return_state=True)
    o = attn(q[:, :, 4:], k[:, :, 12:], v[:, :, 12:], initial_state=state)
    grad_o = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), grad_o)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(reference(attn, q64, k64, v64)[:, :, 4:], (q64, k64, v64), grad_o.double())
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted, torch.float32)


# --------------------------------------------------------------------------- functional API and errors


def test_linear_attention_function_with_gqa():
    q = torch.randn(2, 6, 33, 8)
    k, v = torch.randn(2, 3, 33, 8), torch.randn(2, 3, 33, 5)
    o, state = attncc.linear_attention(q, k, v, causal=True, enable_gqa=True, return_state=True)
    attn = attncc.compile(spec(causal=True, heads=6, kv_heads=3, v_dim=5))
    assert_close(o, reference(attn, q, k, v), torch.float32)
    assert state.kv.shape == (2, 3, 8, 5) and state.k_sum.shape == (2, 3, 8)
    with pytest.raises(attncc.InputError, match="enable_gqa=True"):
        attncc.linear_attention(q, k, v)


def test_a_row_without_visible_keys_gives_zero():
    q, k, v = torch.randn(1, 1, 9, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    o = attncc.linear_attention(q, k, v, causal=True, eps=0.0)
    assert torch.equal(o[:, :, :5], torch.zeros(1, 1, 5, 4))  # queries 0..4 sit before key 0
    assert torch.isfinite(o).all() and o[:, :, 5:].abs().sum() > 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(feature_map="softmax"), "feature_map='softmax' is invalid: allowed are 'elu+1', 'relu', 'identity'"),
        (dict(feature_map=3), "feature_map=3 is invalid"),
        (dict(eps=-1.0), "eps=-1.0 is invalid"),
        (dict(eps=float("nan")), "eps=nan is invalid"),
        (dict(window=(4, 0)), "window=(4, 0) is invalid for kind='linear'"),
        (dict(causal="top_left"), "causal='top_left' is invalid for kind='linear'"),
        (dict(normalize="yes"), "normalize='yes' is invalid"),
    ],
)
def test_spec_errors(fields, message):
    with pytest.raises(attncc.SpecError) as error:
        spec(**{"causal": True, **fields})
    assert message in str(error.value)


def test_linear_fields_need_kind_linear():
    with pytest.raises(attncc.SpecError, match="feature_map='relu' is invalid for kind='softmax'"):
        attncc.AttentionSpec(num_heads=2, head_dim=8, feature_map="relu")
    with pytest.raises(attncc.SpecError, match="kind='lin' is invalid: allowed are 'softmax', 'linear'"):
        attncc.AttentionSpec(num_heads=2, head_dim=8, kind="lin")


def test_feature_map_callables_that_cannot_be_traced():
    table = torch.randn(8)
    with pytest.raises(attncc.ModError, match="reads the captured tensor"):
        attncc.compile(spec(feature_map=lambda x: x * table[(x > 0).long()]))
    with pytest.raises(attncc.ModError, match="must return a number"):
        attncc.compile(spec(feature_map=lambda x: x > 0))
    with pytest.raises(attncc.ModError, match="is not supported in a feature_map"):
        attncc.compile(spec(feature_map=lambda x: torch.softmax(x, -1)))
    with pytest.raises(attncc.ModError, match="cannot be traced"):
        attncc.compile(spec(feature_map=lambda x: x if x > 0 else -x))


def test_state_errors():
    attn = attncc.compile(spec(causal=True))
    q, k, v = qkv(attn.spec, 1, 4, 4)
    with pytest.raises(attncc.InputError, match=r"initial_state.kv has shape \(1, 2, 6, 8\); these inputs need"):
        attn(q, k, v, initial_state=(torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 8)))
    with pytest.raises(attncc.InputError, match="a LinearAttentionState"):
        attn(q, k, v, initial_state=torch.zeros(1, 2, 8, 6))
    with pytest.raises(attncc.InputError, match="initial_state.k_sum is int"):
        attn(q, k, v, initial_state=(torch.zeros(1, 2, 8, 6), 3))


def test_spec_file_with_a_feature_map_expression(tmp_path):
    path = tmp_path / "linear.toml"
    path.write_text(
        '[attention]\nnum_heads = 2\nhead_dim = 8\nkind = "linear"\ncausal = true\n'
        'feature_map = "where(x > 0, x + 1, exp(x))"\nnormalize = true\neps = 0.0001\n'
    )
    s = attncc.load_spec(path)
    attn = attncc.compile(s)
    assert "phi = Piecewise((x + 1, x > 0), (exp(x), True))" in str(attn.graph)
    q, k, v = qkv(s, 1, 10, 12)
    assert_close(attn(q, k, v), reference(attn, q, k, v), torch.float32)
    bad = tmp_path / "bad.toml"
    bad.write_text('[attention]\nnum_heads = 2\nhead_dim = 8\nkind = "linear"\nfeature_map = "x + q_idx"\n')
    with pytest.raises(attncc.SpecError, match="attention.feature_map"):
        attncc.load_spec(bad)
    bad.write_text('[attention]\nnum_heads = 2\nhead_dim = 8\nkind = "linear"\nfeature_map = "__import__(\'os\')"\n')
    with pytest.raises(attncc.SpecError, match="attention.feature_map"):
        attncc.load_spec(bad)


def test_linear_pipelines_name_the_pass():
    assert LINEAR_PIPELINES["pytorch"][-1].startswith("linearize")
    attn = compile_linear(spec(causal=False))
    assert "form = parallel" in str(attn.graph)


# --------------------------------------------------------------------------- triton backend (interpreter)


@requires_triton
@pytest.mark.parametrize("causal", [False, True])
def test_triton_forward_backward_and_state(causal):
    s = spec(causal, heads=4, kv_heads=2, dim=8, v_dim=6)
    attn = attncc.compile(s, backend="triton")
    q, k, v = qkv(s, 1, 37, 21 if causal else 40, requires_grad=True)
    kv0 = torch.rand(1, 2, 8, 6, requires_grad=True)
    k_sum0 = torch.rand(1, 2, 8, requires_grad=True)
    o, state = attn(q, k, v, initial_state=(kv0, k_sum0), return_state=True)
    grad_o, grad_kv = torch.randn_like(o), torch.randn_like(state.kv)
    loss = (o * grad_o).sum() + (state.kv * grad_kv).sum() + state.k_sum.sum()
    grads = torch.autograd.grad(loss, (q, k, v, kv0, k_sum0))
    # the pytorch backend is checked against the quadratic graph above; state included
    ref = attncc.compile(s)
    o_ref, state_ref = ref(q, k, v, initial_state=(kv0, k_sum0), return_state=True)
    loss_ref = (o_ref * grad_o).sum() + (state_ref.kv * grad_kv).sum() + state_ref.k_sum.sum()
    expected = torch.autograd.grad(loss_ref, (q, k, v, kv0, k_sum0))
    assert_close(o, o_ref, torch.float32)
    for actual, wanted in zip((*grads, state.kv), (*expected, state_ref.kv)):
        assert_close(actual, wanted, torch.float32)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_the_quadratic_graph(dtype):
    s = spec(True, feature_map="relu", normalize=dtype != torch.float32, heads=2, kv_heads=1, dim=5, v_dim=7)
    attn = attncc.compile(s, backend="triton")
    q, k, v = qkv(s, 1, 35, 35, dtype)
    o = attn(q, k, v)
    assert o.dtype == dtype
    assert_close(o, reference(attn, q, k, v), dtype)


# --------------------------------------------------------------------------- benchmark suite


def test_linear_bench_suite_and_its_peers():
    from attncc import bench
    from attncc.bench import peers

    cases = bench.SUITES["linear"](torch.device("cpu"))
    assert [c.n for c in cases] == [1024, 4096, 8192, 32768, 262144]
    assert cases[-1].n == 8 * cases[-2].n and cases[-1].implementations == ("attncc-pytorch",)
    assert cases[0].implementations == ("attncc-pytorch", "sdpa-softmax", "attncc-pytorch-softmax", "naive-linear")
    small = BenchCase("small", "causal elu+1", cases[0].spec.replace(num_kv_heads=4), 1, 40, 52)
    names = ["attncc-pytorch", "naive-linear", "sdpa-softmax"]
    rows = bench.run_benchmarks([small], "cpu", names, warmup=0, repeats=1, budget_s=1)
    assert [r["status"] for r in rows] == ["ok"] * 3
    naive = next(r for r in rows if r["implementation"] == "naive-linear")
    assert naive["max_abs_diff"] < 1e-5  # the same linear attention, quadratic and eager
    with pytest.raises(peers.Unsupported, match="not kind='linear'"):
        peers._setup_naive_linear(BenchCase("softmax", "causal", attncc.AttentionSpec(num_heads=2, head_dim=8), 1, 4, 4),
                                  "cpu")  # fmt: skip


def test_command_line_compiles_and_validates_a_linear_spec(tmp_path, capsys):
    from attncc.cli import main

    spec_path = tmp_path / "linear.toml"
    spec_path.write_text('[attention]\nnum_heads = 2\nhead_dim = 8\nkind = "linear"\ncausal = true\n')
    assert main(["compile", str(spec_path), "-o", str(tmp_path / "out.py")]) == 0
    assert "attention(q, k, v, kv=None, k_sum=None) -> (o, kv, k_sum)" in capsys.readouterr().out
    assert "class LinearAttention(torch.autograd.Function)" in (tmp_path / "out.py").read_text()
    assert main(["inspect", str(spec_path)]) == 0
    assert "linear_attention(%q, %k, %v)" in capsys.readouterr().out


def test_backends_without_linear_attention_say_so():
    with pytest.raises(attncc.BackendError, match="backend='cuda' does not compile linear attention"):
        attncc.compile(spec(), backend="cuda")
