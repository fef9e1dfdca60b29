"""The Graph: a flat, typed, topologically ordered list of nodes, and its verifier."""

from __future__ import annotations

from dataclasses import dataclass

import networkx

from attncc.errors import IRError
from attncc.ir.ops import FlashAttention, Input, LseOf, Op, Output
from attncc.ir.types import TensorType


@dataclass(frozen=True, eq=False)
class Node:
    """One op applied to earlier nodes. Identity is the node object itself."""

    op: Op
    inputs: tuple[Node, ...]
    type: TensorType | None

    def __repr__(self) -> str:
        return f"Node({self.op.name}, {self.type})"


class Graph:
    """An immutable list of nodes that ends with one ``output`` node."""

    def __init__(self, nodes):
        self.nodes: tuple[Node, ...] = tuple(nodes)
        verify(self)

    @property
    def inputs(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if isinstance(n.op, Input))

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    def input(self, label: str) -> Node:
        for node in self.inputs:
            if node.op.label == label:
                return node
        raise KeyError(label)

    @property
    def captured(self) -> tuple[Node, ...]:
        """The captured-tensor inputs, in graph order."""
        return tuple(n for n in self.inputs if n.op.role == "captured")

    def nodes_of(self, op_type) -> list[Node]:
        return [n for n in self.nodes if isinstance(n.op, op_type)]

    def users(self) -> dict[Node, list[Node]]:
        users = {n: [] for n in self.nodes}
        for node in self.nodes:
            for operand in node.inputs:
                users[operand].append(node)
        return users

    def to_networkx(self) -> networkx.DiGraph:
        """The dataflow graph: an edge from each operand to each user, nodes in graph order."""
        dag = networkx.DiGraph()
        for position, node in enumerate(self.nodes):
            dag.add_node(node, position=position)
            for operand in node.inputs:
                dag.add_edge(operand, node)
        return dag

    def __str__(self) -> str:
        from attncc.ir.printer import print_graph

        return print_graph(self)

    def to_dot(self) -> str:
        from attncc.ir.printer import to_dot

        return to_dot(self)


class GraphBuilder:
    """Appends nodes in order, inferring each node's type as it goes."""

    def __init__(self):
        self.nodes: list[Node] = []

    def add(self, op: Op, *inputs: Node) -> Node:
        node = Node(op, tuple(inputs), op.infer_type([i.type for i in inputs]))
        self.nodes.append(node)
        return node

    def input(self, label: str, role: str, type: TensorType) -> Node:
        return self.add(Input(label, role, type))

    def finish(self, outputs: dict[str, Node]) -> Graph:
        self.add(Output(tuple(outputs)), *outputs.values())
        return Graph(self.nodes)


def verify(graph: Graph) -> None:
    """Raise IRError unless the graph is well formed: ordered, typed, named, one output at the end."""
    seen: set[Node] = set()
    labels: set[str] = set()
    inputs_by_label: dict[str, Node] = {}
    for position, node in enumerate(graph.nodes):
        where = f"node {position} ({node.op.name})"
        for operand in node.inputs:
            if operand not in seen:
                raise IRError(f"{where} uses a value not defined before it")
        if isinstance(node.op, Output) != (position == len(graph.nodes) - 1):
            raise IRError(f"{where}: a graph has exactly one output node, at its end")
        try:
            inferred = node.op.infer_type([operand.type for operand in node.inputs])
        except IRError as exc:
            raise IRError(f"{where}: {exc}") from None
        if inferred != node.type:
            raise IRError(f"{where} has type {node.type}, but its op infers {inferred}")
        if isinstance(node.op, Input):
            if node.op.label in labels:
                raise IRError(f"{where}: input name {node.op.label!r} is used twice")
            labels.add(node.op.label)
            inputs_by_label[node.op.label] = node
        if isinstance(node.op, LseOf) and not isinstance(node.inputs[0].op, FlashAttention):
            raise IRError(f"{where}: lse_of reads a flash_attention region, not {node.inputs[0].op.name}")
        captured = node.op.captured_inputs()
        if captured:
            first = 3 if isinstance(node.op, FlashAttention) else 1
            operands = node.inputs[first:]
            names = [operand.op.label for operand in operands if isinstance(operand.op, Input)]
            if len(names) != len(operands) or set(names) != captured or len(names) != len(set(names)):
                raise IRError(f"{where} reads captured tensors {sorted(captured)} but its operands are {names}")
        seen.add(node)
    if not graph.nodes:
        raise IRError("a graph needs at least an output node")
