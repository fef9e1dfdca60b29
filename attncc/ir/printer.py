"""Deterministic text form of a graph (names chosen at print time) and its Graphviz rendering."""

from __future__ import annotations

import sympy

from attncc.ir.ops import Input
from attncc.ir.schedule import TileSchedule


def format_attribute(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, sympy.Basic):
        return sympy.sstr(value)
    if isinstance(value, TileSchedule):
        return str(value)
    if isinstance(value, tuple):
        items = [format_attribute(v) for v in value]
        return f"({items[0]},)" if len(items) == 1 else "(" + ", ".join(items) + ")"
    return str(value)


def value_names(graph) -> dict:
    """Inputs keep their labels (%q, %doc); other values are numbered in order (%0, %1, ...)."""
    names = {}
    counter = 0
    for node in graph.nodes:
        if isinstance(node.op, Input):
            names[node] = f"%{node.op.label}"
        elif node.type is not None:
            names[node] = f"%{counter}"
            counter += 1
    return names


def format_node(node, names) -> str:
    operands = ", ".join(names[i] for i in node.inputs)
    attributes = {k: v for k, v in node.op.attributes().items() if not isinstance(node.op, Input)}
    text = f"{node.op.name}({operands})"
    if attributes:
        text += " {" + ", ".join(f"{k} = {format_attribute(attributes[k])}" for k in sorted(attributes)) + "}"
    if node.type is None:
        return text
    return f"{names[node]} = {text} : {node.type}"


def print_graph(graph) -> str:
    names = value_names(graph)
    params = ", ".join(f"{names[n]}: {n.type}" for n in graph.inputs)
    lines = [f"graph({params}) {{"]
    for node in graph.nodes:
        if not isinstance(node.op, Input):
            lines.append("  " + format_node(node, names))
    lines.append("}")
    return "\n".join(lines)


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph) -> str:
    """Graphviz source: one box per node labelled with its printed line, one edge per operand."""
    names = value_names(graph)
    dag = graph.to_networkx()
    ids = {node: f"n{dag.nodes[node]['position']}" for node in dag.nodes}
    lines = ["digraph attention {", "  node [shape=box, fontname=monospace];"]
    for node in graph.nodes:
        label = f"{names[node]}: {node.type}" if isinstance(node.op, Input) else format_node(node, names)
        lines.append(f"  {ids[node]} [label={_dot_quote(label)}];")
    for source, target in dag.edges:
        lines.append(f"  {ids[source]} -> {ids[target]};")
    lines.append("}")
    return "\n".join(lines)
