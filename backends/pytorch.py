"""The PyTorch backend: generates plain torch source for a graph; runs on any device."""

from __future__ import annotations

import sympy
from attncc.backends.source import GeneratedSource, SourceWriter, unique_names
from sympy.printing.pycode import PythonCodePrinter

import attncc
from attncc.ir import ops
from attncc.ir.expr import INDEX_SYMBOLS, score
from attncc.ir.graph import Graph
from attncc.ir.printer import format_node, print_graph, value_names

name = "pytorch"
devices = ("cpu", "cuda", "mps", "xpu")

_TENSOR_SYMBOLS = {str(s) for s in (*INDEX_SYMBOLS, score)}


def is_tensor(expr) -> bool:
    """Whether an expression is a tensor in generated code (it reads an index, the score or a captured tensor)."""
    return bool(expr.atoms(sympy.Indexed)) or any(s.name in _TENSOR_SYMBOLS for s in expr.atoms(sympy.Symbol))


class TorchPrinter(PythonCodePrinter):
    """Prints IR expressions as torch code over broadcast index grids; plain Python where all is scalar."""

    def _print_Indexed(self, expr):
        indices = ", ".join(self._print(i) for i in expr.indices)
        return f"{self._print(expr.base.label)}[{indices}]"

    def _print_FloorDiv(self, expr):
        a, c = expr.args
        return f"({self.parenthesize(a, 40)} // {self.parenthesize(c, 40)})"

    def _print_Mod(self, expr):
        a, c = expr.args
        return f"({self.parenthesize(a, 40)} % {self.parenthesize(c, 40)})"

    def _tensor_call(self, expr, torch_fn: str, math_fn: str):
        (arg,) = expr.args
        if is_tensor(arg):
            return f"torch.{torch_fn}({self._print(arg)})"
        return f"math.{math_fn}({self._print(arg)})"

    def _print_exp(self, expr):
        return self._tensor_call(expr, "exp", "exp")

    def _print_log(self, expr):
        return self._tensor_call(expr, "log", "log")

    def _print_tanh(self, expr):
        return self._tensor_call(expr, "tanh", "tanh")

    def _print_Abs(self, expr):
        return f"abs({self._print(expr.args[0])})"

    def _rounding(self, expr, torch_fn: str, math_fn: str):
        (arg,) = expr.args
        if arg.is_integer:
            return self._print(arg)
        if is_tensor(arg):
            return f"torch.{torch_fn}({self._print(arg)}).long()"
        return f"math.{math_fn}({self._print(arg)})"

    def _print_floor(self, expr):
        return self._rounding(expr, "floor", "floor")

    def _print_ceiling(self, expr):
        return self._rounding(expr, "ceil", "ceil")

    def _print_Pow(self, expr, rational=False):
        base, exponent = expr.args
        if not is_tensor(expr):
            return f"({self._print(base)}) ** ({self._print(exponent)})"
        if exponent == sympy.Rational(1, 2):
            return f"torch.sqrt({self._print(base)})"
        if exponent == -1:
            return f"(1 / {self.parenthesize(base, 50)})"
        if exponent == -sympy.Rational(1, 2):
            return f"torch.rsqrt({self._print(base)})"
        if base.is_Number:
            # 2 ** tensor: a float base keeps integer tensors from integer powers.
            return f"({float(base)!r} ** {self.parenthesize(exponent, 60)})"
        if base.is_integer and not (exponent.is_integer and exponent.is_nonnegative):
            return f"({self.parenthesize(base, 60)}).double() ** {self.parenthesize(exponent, 60)}"
        return f"{self.parenthesize(base, 60)} ** {self.parenthesize(exponent, 60)}"

    def _min_max(self, expr, torch_fn: str, python_fn: str):
        tensors = [a for a in expr.args if is_tensor(a)]
        scalars = [a for a in expr.args if not is_tensor(a)]
        if not tensors:
            return f"{python_fn}({', '.join(self._print(a) for a in scalars)})"
        result = self._print(tensors[0])
        for arg in tensors[1:]:
            result = f"torch.{torch_fn}({result}, {self._print(arg)})"
        if scalars:
            bound = (
                self._print(scalars[0])
                if len(scalars) == 1
                else f"{python_fn}({', '.join(self._print(a) for a in scalars)})"
            )
            keyword = "max" if torch_fn == "minimum" else "min"
            result = f"torch.clamp({result}, {keyword}={bound})"
        return result

    def _print_Min(self, expr):
        return self._min_max(expr, "minimum", "min")

    def _print_Max(self, expr):
        return self._min_max(expr, "maximum", "max")

    def _print_Piecewise(self, expr):
        *pieces, (otherwise, last_condition) = expr.args
        if last_condition is not sympy.true:
            raise ValueError(f"Piecewise without a default branch: {expr}")
        result = self._print(otherwise)
        for value, condition in reversed(pieces):
            if is_tensor(condition):
                result = f"torch.where({self._print(condition)}, {self._print(value)}, {result})"
            else:
                result = f"({self._print(value)} if {self._print(condition)} else {result})"
        return result

    def _logical(self, expr, symbol: str, word: str):
        operator = f" {symbol} " if is_tensor(expr) else f" {word} "
        return "(" + operator.join(self._print(a) for a in expr.args) + ")"

    def _print_And(self, expr):
        return self._logical(expr, "&", "and")

    def _print_Or(self, expr):
        return self._logical(expr, "|", "or")

    def _print_Xor(self, expr):
        return self._logical(expr, "^", "!=")

    def _print_Not(self, expr):
        (arg,) = expr.args
        return f"(~{self._print(arg)})" if is_tensor(arg) else f"(not {self._print(arg)})"

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"


def print_expr(expr) -> str:
    return TorchPrinter({"fully_qualified_modules": False, "standard": "python3"}).doprint(expr)


_BASE_NAMES = {
    ops.Matmul: lambda op: "scores" if op.transpose_b else "o",
    ops.Softmax: lambda op: "probs",
    ops.LogSumExp: lambda op: "lse",
}


def _value_name(node) -> str:
    if isinstance(node.op, ops.Input):
        return node.op.label
    if isinstance(node.op, ops.RepeatKV):
        return node.inputs[0].op.label + "_rep" if isinstance(node.inputs[0].op, ops.Input) else "kv_rep"
    return _BASE_NAMES.get(type(node.op), lambda op: "scores")(node.op)


def _grid_lines(expr, w: SourceWriter, defined: set[str]) -> None:
    """Define the index grids an expression reads, once each."""
    shapes = {"b": "-1, 1, 1, 1", "h": "1, -1, 1, 1", "q_idx": "1, 1, -1, 1", "kv_idx": "1, 1, 1, -1"}
    sizes = {"b": "B", "h": "H", "q_idx": "N", "kv_idx": "M"}
    for symbol in ("b", "h", "q_idx", "kv_idx"):
        if symbol in defined or not any(s.name == symbol for s in expr.atoms(sympy.Symbol)):
            continue
        w.line(f"{symbol} = torch.arange({sizes[symbol]}, device=q.device).view({shapes[symbol]})")
        defined.add(symbol)


def generate(graph: Graph) -> GeneratedSource:
    """Python source defining ``attention(q, k, v, *captured) -> (o, lse)`` for the graph."""
    ir_names = value_names(graph)
    nodes = [n for n in graph.nodes if n.type is not None]
    names = dict(zip(nodes, unique_names(_value_name(n) for n in nodes)))
    captured = [n.op.label for n in graph.captured]

    w = SourceWriter()
    w.line(f'"""Attention generated by attncc {attncc.__version__} (backend: pytorch).')
    w.line()
    w.line(
        "Inputs: q [B, H, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] (fp16, bf16 or fp32)"
        + (f", captured tensors {', '.join(captured)}." if captured else ".")
    )
    w.line("Returns (o [B, H, N, Dv] in q's dtype, lse [B, H, N] in float32, natural log).")
    w.line("Scores are accumulated in float32. Generated from this IR:")
    w.line()
    for row in print_graph(graph).splitlines():
        w.line("    " + row)
    w.line('"""')
    w.line()
    w.line("import math")
    w.line()
    w.line("import torch")
    w.line()
    w.line()
    w.line(f"def attention({', '.join(['q', 'k', 'v', *captured])}):")
    w.indent = 1
    w.line("B, H, N, _ = q.shape")
    w.line("M = k.shape[2]")
    grids: set[str] = set()
    outputs = None
    for node in graph.nodes:
        op = node.op
        if isinstance(op, ops.Input):
            continue
        if isinstance(op, ops.Output):
            outputs = [names[i] for i in node.inputs]
            w.line()
            w.line(f"# {format_node(node, ir_names)}", ir=format_node(node, ir_names))
            w.line(f"return {outputs[0]}.to(q.dtype), {outputs[1]}")
            break
        ir_line = format_node(node, ir_names)
        w.line()
        w.line(f"# {ir_line}", ir=ir_line)
        for text in _lower_node(node, names, w, grids):
            w.line(text, ir=ir_line)
    return GeneratedSource(w.text(), "attention", w.line_map, name)


def _lower_node(node, names, w: SourceWriter, grids: set[str]) -> list[str]:
    op, out = node.op, names[node]
    args = [names[i] for i in node.inputs]
    if isinstance(op, ops.RepeatKV):
        return [f"{out} = {args[0]}.repeat_interleave({op.groups}, dim=1)"]
    if isinstance(op, ops.Matmul):
        other = f"{args[1]}.float().transpose(-1, -2)" if op.transpose_b else f"{args[1]}.float()"
        return [f"{out} = torch.matmul({args[0]}.float(), {other})"]
    if isinstance(op, ops.Scale):
        return [f"{out} = {args[0]} * {float(op.factor)!r}"]
    if isinstance(op, ops.Alibi):
        _grid_lines(sympy.Symbol("h") + sympy.Symbol("q_idx") + sympy.Symbol("kv_idx"), w, grids)
        offset = "" if op.alignment == "top_left" else " + (M - N)"
        return [
            f"slope = {print_expr(op.slope)}",
            f"{out} = {args[0]} - slope * (q_idx{offset} - kv_idx).abs()",
        ]
    if isinstance(op, ops.ScoreMod):
        _grid_lines(op.expr, w, grids)
        if not is_tensor(op.expr):
            return [f"{out} = torch.full_like({args[0]}, {print_expr(op.expr)})"]
        return [f"score = {args[0]}", f"{out} = torch.broadcast_to({print_expr(op.expr)}, score.shape).float()"]
    if isinstance(op, ops.Mask):
        _grid_lines(op.predicate, w, grids)
        keep = print_expr(op.predicate)
        if not is_tensor(op.predicate):
            keep = f"torch.tensor({keep}, device=q.device)"
        return [f"{out} = torch.where({keep}, {args[0]}, float('-inf'))"]
    if isinstance(op, ops.Softmax):
        return [
            f"row_max = {args[0]}.amax(dim=-1, keepdim=True)",
            "row_max = torch.where(row_max == float('-inf'), 0.0, row_max)  # a fully masked row gives zeros",
            f"weights = torch.exp({args[0]} - row_max)",
            "total = weights.sum(dim=-1, keepdim=True)",
            f"{out} = weights / torch.where(total == 0, 1.0, total)",
        ]
    if isinstance(op, ops.LogSumExp):
        return [f"{out} = torch.logsumexp({args[0]}, dim=-1)"]
    raise NotImplementedError(f"the pytorch backend has no lowering for {op.name}")
