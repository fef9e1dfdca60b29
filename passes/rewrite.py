"""Graph rewriting: rebuild a graph node by node through a rule, then drop dead nodes.

Rules are plain functions ``rule(node, inputs, builder) -> Node | None`` called on
every node of the old graph in order, with the node's inputs already rewritten.
Returning None copies the node; returning another node (new, or one of
``inputs``) replaces it, and every later use follows. ``builder.mapping`` maps the
old nodes seen so far to their replacements.
"""

from __future__ import annotations

from collections.abc import Callable

import networkx

from attncc.ir import ops
from attncc.ir.expr import captured_names, score
from attncc.ir.graph import Graph, GraphBuilder, Node

Rule = Callable[[Node, list, GraphBuilder], "Node | None"]


def rebuild(graph: Graph, rule: Rule) -> Graph:
    builder = GraphBuilder()
    mapping: dict[Node, Node] = {}
    builder.mapping = mapping
    for node in graph.nodes:
        inputs = [mapping[i] for i in node.inputs]
        replacement = rule(node, inputs, builder)
        if replacement is None and all(new is old for new, old in zip(inputs, node.inputs)):
            builder.nodes.append(node)  # nothing it reads changed: keep the node itself
            replacement = node
        elif replacement is None:
            replacement = builder.add(node.op, *inputs)
        mapping[node] = replacement
    return without_dead_nodes(builder.nodes)


def without_dead_nodes(nodes) -> Graph:
    """The nodes the output depends on, in order; q, k and v stay even when unused."""
    nodes = list(nodes)
    dag = networkx.DiGraph()
    dag.add_nodes_from(nodes)
    dag.add_edges_from((operand, node) for node in nodes for operand in node.inputs)
    live = networkx.ancestors(dag, nodes[-1]) | {nodes[-1]}
    keep = [n for n in nodes if n in live or (isinstance(n.op, ops.Input) and n.op.role != "captured")]
    return Graph(keep)


def compose(outer, inner):
    """The score expression ``outer`` applied to the result of ``inner``: outer(score := inner)."""
    return outer.xreplace({score: inner})


def captured_operands(expressions, graph_inputs) -> list[Node]:
    """The captured-input nodes the expressions read, sorted by name (the verifier's order)."""
    names = set().union(*(captured_names(e) for e in expressions))
    by_label = {n.op.label: n for n in graph_inputs if isinstance(n.op, ops.Input)}
    return [by_label[name] for name in sorted(names)]


def single_user(node: Node, users: dict) -> Node | None:
    found = users.get(node, [])
    return found[0] if len(found) == 1 else None
