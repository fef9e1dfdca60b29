"""group-kv: remove ``repeat_kv``; matmuls index the KV head as ``h // groups`` instead.

``matmul(x, repeat_kv(kv, g))`` becomes ``matmul(x, kv) {kv_groups = g}`` when every
user of the repeated tensor is such a matmul, so K and V are never materialised
``g`` times. Decoding packs the query heads of one group into one tile: the
backends see ``kv_groups`` and lay the ``g`` query heads out as rows of one tile.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from attncc.ir import ops
from attncc.ir.graph import Graph
from attncc.passes.base import Pass
from attncc.passes.rewrite import rebuild


@dataclass(frozen=True)
class GroupKV(Pass):
    name = "group-kv"

    def run(self, graph: Graph) -> Graph:
        users = graph.users()
        removable = {
            node
            for node in graph.nodes_of(ops.RepeatKV)
            if users[node]
            and all(
                isinstance(u.op, ops.Matmul) and u.inputs[1] is node and u.inputs[0] is not node for u in users[node]
            )
        }
        if not removable:
            return graph

        def rule(node, inputs, builder):
            if node in removable:
                self.count("repeat_kv_removed")
                return inputs[0]
            if isinstance(node.op, ops.Matmul) and node.inputs[1] in removable:
                groups = node.op.kv_groups * node.inputs[1].op.groups
                return builder.add(replace(node.op, kv_groups=groups), *inputs)
            return None

        return rebuild(graph, rule)
