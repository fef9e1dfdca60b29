"""Tracing FlexAttention-style score_mod / mask_mod callables to IR expressions."""

from __future__ import annotations

import functools
import math

import pytest
import sympy
import torch

from attncc.errors import ModError
from attncc.frontend.builder import constant
from attncc.frontend.mod import TracedMod
from attncc.frontend.trace import expression_key, trace_mask_mod, trace_score_mod
from attncc.ir.expr import FloorDiv, b, captured_symbol, h, kv_idx, q_idx, score

GLOBAL_DOC = torch.tensor([0, 0, 1, 1, 1, 2])


def I64(name):  # noqa: N802 - reads like a type
    return captured_symbol(name, "i64")


def evaluate(traced: TracedMod, s=0.0, bb=0, hh=0, q=0, kv=0):
    """The traced expression at one point, captured tensors replaced by their values."""
    expr = traced.expr.subs({score: s, b: bb, h: hh, q_idx: q, kv_idx: kv})
    values = {c.name: c.value for c in traced.captured}
    for _ in range(8):
        loads = [e for e in expr.atoms(sympy.Indexed) if all(i.is_Integer for i in e.indices)]
        if not loads:
            break
        replacements = {}
        for load in loads:
            item = values[str(load.base.label)][tuple(int(i) for i in load.indices)].item()
            replacements[load] = sympy.sympify(int(item) if isinstance(item, bool) else item)
        expr = expr.xreplace(replacements)
    assert not expr.atoms(sympy.Indexed), expr
    if expr in (sympy.true, sympy.false):
        return bool(expr)
    return float(expr)


def run_original(fn, is_score, s, bb, hh, q, kv):
    idx = [torch.tensor(v) for v in (bb, hh, q, kv)]
    out = fn(torch.tensor(s, dtype=torch.float64), *idx) if is_score else fn(*idx)
    if out.dtype == torch.bool:
        return bool(out)
    return float(out)


def assert_same_values(fn, traced, is_score, points):
    for s, bb, hh, q, kv in points:
        want = run_original(fn, is_score, s, bb, hh, q, kv)
        got = evaluate(traced, s, bb, hh, q, kv)
        if isinstance(want, bool):
            assert got is want, (s, bb, hh, q, kv)
        elif math.isinf(want):
            assert got == want, (s, bb, hh, q, kv)
        else:
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (s, bb, hh, q, kv, got, want)


POINTS = [(s, 0, hh, q, kv) for s in (-3.5, 0.25, 7.0) for hh in (0, 1) for q in range(4) for kv in range(4)]


# --------------------------------------------------------------------------- expressions


def test_causal_mask():
    traced = trace_mask_mod(lambda b, h, q, kv: q >= kv)
    assert traced.expr == sympy.Ge(q_idx, kv_idx)
    assert traced.kind == "bool"
    assert traced.captured == ()
    assert str(traced.expr) == "q_idx >= kv_idx"


def test_parameter_names_do_not_matter():
    def mask(batch, head, i, j):
        return i >= j

    assert trace_mask_mod(mask).expr == sympy.Ge(q_idx, kv_idx)


def test_softcap():
    traced = trace_score_mod(lambda s, b, h, q, kv: 50 * torch.tanh(s / 50))
    assert traced.expr == 50 * sympy.tanh(score / 50)
    assert traced.kind == "float"


def test_alibi_with_exp2():
    num_heads = 8

    def alibi(score, b, h, q_idx, kv_idx):
        slope = torch.exp2(-8 * (h + 1) / num_heads)
        return score + slope * (kv_idx - q_idx)

    traced = trace_score_mod(alibi)
    expected = score + sympy.Pow(2, -8 * (h + 1) / sympy.Integer(num_heads)) * (kv_idx - q_idx)
    assert sympy.simplify(traced.expr - expected) == 0
    assert_same_values(alibi, traced, True, POINTS)


def test_document_mask_with_closure_tensor():
    doc = torch.tensor([0, 0, 1, 1, 2])

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    traced = trace_mask_mod(document_causal)
    d = I64("doc")
    assert traced.expr == sympy.And(sympy.Eq(d[q_idx], d[kv_idx]), sympy.Ge(q_idx, kv_idx))
    (captured,) = traced.captured
    assert (captured.name, captured.dtype, captured.ndim) == ("doc", "i64", 1)
    assert captured.value is doc
    assert_same_values(document_causal, traced, False, POINTS)


def test_nested_indexing():
    doc = torch.tensor([0, 0, 1, 1, 2])
    offsets = torch.tensor([0, 2, 4])

    def prefix_of_document(b, h, q_idx, kv_idx):
        return kv_idx - offsets[doc[kv_idx]] < 1

    traced = trace_mask_mod(prefix_of_document)
    assert traced.expr == sympy.Lt(kv_idx - I64("offsets")[I64("doc")[kv_idx]], 1)
    assert [c.name for c in traced.captured] == ["doc", "offsets"]  # order of first use
    assert traced.captured[1].value is offsets
    assert_same_values(prefix_of_document, traced, False, POINTS)


def test_multidimensional_table_with_clamped_index():
    r = 2
    table = torch.arange(2 * (2 * r + 1), dtype=torch.float32).reshape(2, 2 * r + 1) / 7

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, (kv_idx - q_idx).clamp(-r, r) + r]

    traced = trace_score_mod(relative_bias)
    t = captured_symbol("table", "f32")
    assert traced.expr == score + t[h, sympy.Min(sympy.Max(kv_idx - q_idx, -r), r) + r]
    (captured,) = traced.captured
    assert (captured.name, captured.dtype, captured.ndim) == ("table", "f32", 2)
    assert_same_values(relative_bias, traced, True, POINTS)


def test_chained_partial_indexing():
    owner = torch.tensor([0, 1, 1, 0])
    intervals = torch.tensor([[0, 2], [1, 3]])

    def in_interval(b, h, q_idx, kv_idx):
        return (q_idx >= intervals[owner[kv_idx]][0]) & (q_idx <= intervals[owner[kv_idx]][1])

    traced = trace_mask_mod(in_interval)
    iv, ow = I64("intervals"), I64("owner")
    assert traced.expr == sympy.And(sympy.Ge(q_idx, iv[ow[kv_idx], 0]), sympy.Le(q_idx, iv[ow[kv_idx], 1]))
    assert {c.name: c.ndim for c in traced.captured} == {"intervals": 2, "owner": 1}
    assert_same_values(in_interval, traced, False, POINTS)


def test_bool_captured_tensor_compares_with_zero():
    valid = torch.tensor([True, False, True, True])
    traced = trace_mask_mod(lambda b, h, q_idx, kv_idx: valid[kv_idx])
    assert traced.expr == sympy.Ne(captured_symbol("valid", "bool")[kv_idx], 0)
    assert traced.captured[0].dtype == "bool"
    assert str(traced.expr) == "Ne(valid[kv_idx], 0)"


def test_where_with_python_number_and_minus_inf():
    def causal_score(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))

    traced = trace_score_mod(causal_score)
    assert traced.expr == sympy.Piecewise((score, sympy.Ge(q_idx, kv_idx)), (-sympy.oo, True))
    assert_same_values(causal_score, traced, True, POINTS)

    def bonus(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx == kv_idx, 3, score)

    traced = trace_score_mod(bonus)
    assert traced.expr == sympy.Piecewise((3, sympy.Eq(q_idx, kv_idx)), (score, True))
    assert_same_values(bonus, traced, True, POINTS)


def test_floordiv_mod_abs_minimum_maximum():
    def blocks(b, h, q_idx, kv_idx):
        return (q_idx // 2 == kv_idx // 2) | (abs(q_idx - kv_idx) % 3 == 0)

    traced = trace_mask_mod(blocks)
    assert str(traced.expr) == "Eq(FloorDiv(q_idx, 2), FloorDiv(kv_idx, 2)) | Eq(Mod(Abs(kv_idx - q_idx), 3), 0)"
    assert_same_values(blocks, traced, False, POINTS)

    def minmax(score, b, h, q_idx, kv_idx):
        return torch.minimum(score, torch.maximum(q_idx, kv_idx) - 1) + torch.abs(score)

    traced = trace_score_mod(minmax)
    assert traced.expr == sympy.Min(score, sympy.Max(q_idx, kv_idx) - 1) + sympy.Abs(score)
    assert_same_values(minmax, traced, True, POINTS)


def test_tensor_methods_and_torch_functions_agree():
    fns = [
        lambda s, b, h, q, kv: torch.clamp(s, -1, 1),
        lambda s, b, h, q, kv: s.clamp(min=-1, max=1),
        lambda s, b, h, q, kv: torch.clamp_max(torch.clamp_min(s, -1), 1),
        lambda s, b, h, q, kv: s.clamp_min(-1).clamp_max(1),
    ]
    exprs = {trace_score_mod(fn).expr for fn in fns}
    assert exprs == {sympy.Min(sympy.Max(score, -1), 1)}
    div = trace_score_mod(lambda s, b, h, q, kv: s + torch.div(q, 2, rounding_mode="floor") + q.div(kv + 1))
    assert div.expr == score + FloorDiv(q_idx, 2) + q_idx / (kv_idx + 1)
    assert str(trace_mask_mod(lambda b, h, q, kv: torch.remainder(q, 3) == torch.floor_divide(kv, 2)).expr) == (
        "Eq(Mod(q_idx, 3), FloorDiv(kv_idx, 2))"
    )
    logical = trace_mask_mod(
        lambda b, h, q, kv: torch.logical_or(torch.logical_and(q >= kv, kv > 0), torch.logical_not(q < 2))
    )
    assert logical.expr == sympy.Or(sympy.And(sympy.Ge(q_idx, kv_idx), sympy.Gt(kv_idx, 0)), sympy.Ge(q_idx, 2))


def test_sigmoid():
    def gate(score, b, h, q_idx, kv_idx):
        return score * torch.sigmoid(score)

    traced = trace_score_mod(gate)
    assert traced.expr == score / (1 + sympy.exp(-score))
    assert_same_values(gate, traced, True, POINTS)


def test_float_cast_of_a_boolean_is_one_or_zero():
    def bias(score, b, h, q_idx, kv_idx):
        return score + (q_idx >= kv_idx).float() * 2

    traced = trace_score_mod(bias)
    assert traced.expr == score + 2 * sympy.Piecewise((1, sympy.Ge(q_idx, kv_idx)), (0, True))
    assert_same_values(bias, traced, True, POINTS)
    assert trace_score_mod(lambda s, b, h, q, kv: s.float() + q.to(torch.float32)).expr == score + q_idx


def test_integer_casts_of_integers_are_allowed():
    traced = trace_mask_mod(lambda b, h, q, kv: torch.floor(q / 2).long() == kv.int())
    assert traced.expr == sympy.Eq(sympy.floor(q_idx / 2), kv_idx)


def test_closure_over_python_float():
    cap = 30.5

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    traced = trace_score_mod(softcap)
    c = constant(cap)  # the builder decides how a Python float becomes a sympy number
    assert traced.expr == c * sympy.tanh(score / c)
    assert_same_values(softcap, traced, True, POINTS)


def test_math_on_python_numbers_is_a_constant():
    traced = trace_score_mod(lambda s, b, h, q, kv: s * math.log2(math.e))
    assert traced.expr.free_symbols == {score}
    assert math.isclose(float(traced.expr.subs(score, 1)), math.log2(math.e))


def test_document_numbers_through_global_tensor():
    def mask(b, h, q_idx, kv_idx):
        return GLOBAL_DOC[q_idx] == GLOBAL_DOC[kv_idx]

    traced = trace_mask_mod(mask)
    assert traced.captured[0].name == "GLOBAL_DOC"
    assert traced.captured[0].value is GLOBAL_DOC


def test_captured_tensor_names_avoid_reserved_names_and_collisions():
    q = torch.tensor([0, 1, 1, 2])
    doc = torch.tensor([5, 6, 7, 8])

    def helper(i):
        return GLOBAL_DOC[i]

    def mask(b, h, q_idx, kv_idx):
        return (q[q_idx] == q[kv_idx]) & (doc[q_idx] > helper(kv_idx))

    traced = trace_mask_mod(mask)
    assert [c.name for c in traced.captured] == ["q_", "doc", "GLOBAL_DOC"]
    assert traced.captured[0].value is q

    other = torch.tensor([1, 2])

    def make(doc_value):
        def inner(i):
            return doc_value[i]

        return inner

    first = make(other)

    def two_docs(b, h, q_idx, kv_idx):
        return first(q_idx) == doc[kv_idx]

    names = {c.name for c in trace_mask_mod(two_docs).captured}
    assert names == {"doc", "doc_value"}


def test_bound_method_default_argument_and_partial():
    class DocumentMask:
        def __init__(self, doc):
            self.doc = doc

        def __call__(self, b, h, q_idx, kv_idx):
            return self.doc[q_idx] == self.doc[kv_idx]

        def mask(self, b, h, q_idx, kv_idx):
            return self.doc[q_idx] == self.doc[kv_idx]

    doc = torch.tensor([0, 0, 1])
    expected = sympy.Eq(I64("doc")[q_idx], I64("doc")[kv_idx])
    for fn in (DocumentMask(doc), DocumentMask(doc).mask):
        traced = trace_mask_mod(fn)
        assert traced.expr == expected
        assert traced.captured[0].value is doc

    def with_default(b, h, q_idx, kv_idx, lengths=torch.tensor([2, 3])):  # noqa: B008
        return kv_idx < lengths[b]

    traced = trace_mask_mod(with_default)
    assert traced.expr == sympy.Lt(kv_idx, I64("lengths")[b])

    def general(table, b, h, q_idx, kv_idx):
        return table[q_idx] == table[kv_idx]

    traced = trace_mask_mod(functools.partial(general, doc))
    assert traced.captured[0].value is doc
    assert traced.expr == sympy.Eq(I64("table")[q_idx], I64("table")[kv_idx])  # named by the parameter


def test_captured_parameters_and_buffers_of_a_module():
    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.slopes = torch.nn.Parameter(torch.tensor([0.5, 0.25]))
            self.register_buffer("offsets", torch.tensor([1.0, 2.0]))

        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score + self.slopes[h] * (kv_idx - q_idx) + self.offsets[h]

    module = Bias()
    traced = trace_score_mod(module.score_mod)
    f32 = functools.partial(captured_symbol, dtype="f32")
    assert traced.expr == score + f32("slopes")[h] * (kv_idx - q_idx) + f32("offsets")[h]
    assert [c.name for c in traced.captured] == ["slopes", "offsets"]
    assert traced.captured[0].value is module.slopes
    with torch.no_grad():
        assert_same_values(module.score_mod, traced, True, POINTS)


def test_constant_index_into_captured_tensor_stays_symbolic():
    lengths = torch.tensor([3, 5])
    traced = trace_mask_mod(lambda b, h, q_idx, kv_idx: kv_idx < lengths[1])
    assert traced.expr == sympy.Lt(kv_idx, I64("lengths")[1])
    assert traced.captured[0].value is lengths


def test_zero_dim_captured_tensor_is_a_constant():
    limit = torch.tensor(3)
    traced = trace_mask_mod(lambda b, h, q_idx, kv_idx: kv_idx < limit)
    assert traced.expr == sympy.Lt(kv_idx, 3)
    assert traced.captured == ()


def test_varargs_and_traced_mod_passthrough():
    traced = trace_mask_mod(lambda *args: args[2] >= args[3])
    assert traced.expr == sympy.Ge(q_idx, kv_idx)
    assert trace_mask_mod(traced) is traced
    score_traced = trace_score_mod(lambda s, *rest: s * 2)
    assert trace_score_mod(score_traced) is score_traced


def test_source_names_the_function():
    def my_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    assert "my_mask" in trace_mask_mod(my_mask).source


def test_expression_key():
    key1 = expression_key(trace_mask_mod(lambda b, h, q, kv: q - kv < 4))
    key2 = expression_key(trace_mask_mod(lambda b, h, i, j: i - j < 4))
    assert key1 == key2
    window = 5
    key3 = expression_key(trace_mask_mod(lambda b, h, q, kv: q - kv < window))
    assert key3 != key1
    doc_a = torch.tensor([0, 1])
    doc_b = torch.tensor([1, 1, 2])
    keys = {
        expression_key(trace_mask_mod(lambda b, h, q, kv: doc_a[q] == doc_a[kv])),
    }
    doc_a = doc_b  # a new value of the same captured tensor does not change the key
    keys.add(expression_key(trace_mask_mod(lambda b, h, q, kv: doc_a[q] == doc_a[kv])))
    assert len(keys) == 1
    table = torch.tensor([0.5, 1.0])
    key_float = expression_key(trace_score_mod(lambda s, b, h, q, kv: s + table[q]))
    table = torch.tensor([1, 2])
    key_int = expression_key(trace_score_mod(lambda s, b, h, q, kv: s + table[q]))
    assert key_float != key_int  # the captured dtype is part of the key
    assert "table:f32:1" in key_float


# --------------------------------------------------------------------------- errors


def _raises(fn, trace, *fragments):
    with pytest.raises(ModError) as info:
        trace(fn)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_if_on_traced_value():
    def branchy(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return q_idx > 0
        return kv_idx > 0

    message = _raises(branchy, trace_mask_mod, "branchy", "`if`", "torch.where")
    assert "if q_idx > kv_idx" in message  # the offending source line


def test_and_on_traced_value():
    def window(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx and q_idx - kv_idx < 4

    _raises(window, trace_mask_mod, "window", "`and`", "& | ~")


def test_python_conversions_and_builtins():
    _raises(lambda b, h, q, kv: q > int(kv), trace_mask_mod, "Python number", ".long()")
    _raises(lambda b, h, q, kv: q > max(q, kv), trace_mask_mod, "max()", "torch.maximum")


def test_wrong_arity():
    def four(b, h, q_idx, kv_idx):
        return q_idx

    message = _raises(four, trace_score_mod, "four", "score_mod(score, b, h, q_idx, kv_idx)", "takes 4")
    assert "mask_mod" in message

    def five(score, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    _raises(five, trace_mask_mod, "five", "mask_mod(b, h, q_idx, kv_idx)", "takes 5")


def test_mask_returning_a_number():
    _raises(lambda b, h, q, kv: q - kv, trace_mask_mod, "mask_mod must return a boolean", "the int expression")


def test_score_mod_returning_a_bool():
    _raises(lambda s, b, h, q, kv: s > 0, trace_score_mod, "score_mod", "must return a number", "boolean")


def test_reduction():
    def total(b, h, q_idx, kv_idx):
        return q_idx < torch.sum(kv_idx)

    _raises(total, trace_mask_mod, "torch.sum is not supported in a mask_mod", "reductions", "total", "supported:")


def test_slicing_captured_tensor():
    doc = torch.tensor([0, 0, 1, 1])
    _raises(lambda b, h, q, kv: doc[:3][q] == 0, trace_mask_mod, "'doc'", "slic")
    _raises(lambda b, h, q, kv: doc[q:] == 0, trace_mask_mod, "slic")


def test_float_index():
    doc = torch.tensor([0, 0, 1, 1])
    _raises(lambda b, h, q, kv: doc[q / 2] == 0, trace_mask_mod, "'doc'", "float", "integer")


def test_float_to_int_cast():
    _raises(lambda s, b, h, q, kv: s.long(), trace_score_mod, "float", "integer", "floor")
    _raises(lambda s, b, h, q, kv: s.to(torch.int32), trace_score_mod, "floor")


def test_trunc_division():
    _raises(lambda s, b, h, q, kv: torch.div(q, 2, rounding_mode="trunc") + s, trace_score_mod, "trunc")


def test_not_callable():
    _raises(3, trace_mask_mod, "callable", "int")
    _raises("q_idx >= kv_idx", trace_score_mod, "callable")


def test_tensor_created_inside_mod():
    _raises(lambda b, h, q, kv: torch.arange(8)[q] == kv, trace_mask_mod, "created inside", "capture it")
    _raises(lambda b, h, q, kv: torch.tensor([1, 2, 3])[q] == kv, trace_mask_mod, "created inside")


def test_unsupported_dtype():
    phases = torch.tensor([1j, 2j])
    _raises(lambda s, b, h, q, kv: s + phases[q], trace_score_mod, "'phases'", "complex")


def test_in_place_and_random_and_item():
    _raises(lambda s, b, h, q, kv: s.add_(1), trace_score_mod, "in-place")
    _raises(lambda s, b, h, q, kv: s + torch.rand_like(s), trace_score_mod, "random")
    _raises(lambda s, b, h, q, kv: s + q.item(), trace_score_mod, "item")


def test_partially_indexed_tensor():
    table = torch.zeros(3, 4, dtype=torch.int64)
    _raises(lambda b, h, q, kv: table[q] > 0, trace_mask_mod, "'table'", "1 of its 2")


def test_indexing_a_scalar_argument():
    _raises(lambda b, h, q, kv: q[0] > 0, trace_mask_mod, "only captured tensors can be indexed")


# --------------------------------------------------------------------------- the trace memo

MEMO_WINDOW = 3


def _window_mask(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (kv_idx >= q_idx - MEMO_WINDOW)


def test_a_function_is_traced_once_while_what_it_reads_is_unchanged():
    first = trace_mask_mod(_window_mask)
    assert trace_mask_mod(_window_mask) is first  # memo hit: no second trace
    global MEMO_WINDOW
    MEMO_WINDOW = 5  # a global number it reads changed: traced again
    try:
        second = trace_mask_mod(_window_mask)
        assert second is not first and second.expr == (kv_idx <= q_idx) & (kv_idx >= q_idx - 5)
    finally:
        MEMO_WINDOW = 3
    assert trace_mask_mod(_window_mask) is first  # the old value's trace again


def test_closure_values_decide_the_memo():
    def make(width, table):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[(q_idx - kv_idx) % width]

        return score_mod

    table = torch.randn(8)
    a, same, wider = make(8, table), make(8, table), make(9, table)
    assert trace_score_mod(same) is trace_score_mod(a)  # same code, same closure values
    assert trace_score_mod(wider) is not trace_score_mod(a)
    replaced = torch.randn(8)
    fresh = trace_score_mod(make(8, replaced))  # another tensor: traced again, and it is the one captured
    assert fresh is not trace_score_mod(a) and fresh.captured[0].value is replaced
    table.mul_(2)  # in place: values are read at call time, the trace stays
    assert trace_score_mod(a) is trace_score_mod(same)


def test_what_the_memo_cannot_judge_is_traced_every_time():
    scale = torch.tensor(2.0)  # 0-d: read at trace time, so a new value must give a new expression

    def scaled(score, b, h, q_idx, kv_idx):
        return score * scale

    assert trace_score_mod(scaled) is not trace_score_mod(scaled)
    scale.fill_(3.0)
    assert trace_score_mod(scaled).expr == 3 * score
    offsets = [1, 2]  # a list may change in place

    def listed(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offsets[0]

    assert trace_mask_mod(listed) is not trace_mask_mod(listed)
    offsets[0] = 4
    assert trace_mask_mod(listed).expr == (kv_idx <= q_idx + 4)


def test_helper_functions_are_part_of_the_fingerprint():
    from attncc.frontend.trace import trace_fingerprint

    def helper(q):
        return q - MEMO_WINDOW

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx >= helper(q_idx)

    key = trace_fingerprint(mask_mod)
    assert key is not None and trace_fingerprint(mask_mod) == key
    global MEMO_WINDOW
    MEMO_WINDOW = 7
    try:
        assert trace_fingerprint(mask_mod) != key and trace_mask_mod(mask_mod).expr == (kv_idx >= q_idx - 7)
    finally:
        MEMO_WINDOW = 3
    assert trace_fingerprint(functools.partial(mask_mod, 0)) is None
