"""linearize: reassociate linear attention's quadratic graph into an O(N) linear_attention region.

Matches ``matmul(normalize_rows?(mask_zero?(scale(matmul(phi(q), phi(k)^T)))), v)`` with one
feature map on both sides and, if masked, bottom-right causality. Because nothing
non-linear sits between the two matmuls, (phi(Q) phi(K)^T) V = phi(Q) (phi(K)^T V)
exactly, and the row sums are the same product with a column of ones: the region never
forms the N x M matrix (see ``attncc.ir.ops.LinearAttention``). Not causal, it is the
``parallel`` form; causal, the ``chunked`` form of ``chunk`` queries (1: the recurrent
form). Anything else is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attncc.errors import AttnccError
from attncc.ir import ops
from attncc.ir.graph import Graph
from attncc.passes.base import Pass
from attncc.passes.rewrite import rebuild

DEFAULT_CHUNK = 64


def match_linear(av, users) -> tuple[ops.LinearAttention, tuple] | None:
    """Walk back from the AV matmul to the feature maps; None if anything escapes the chain."""
    a, v = av.inputs
    if av.op.transpose_b:
        return None
    normalize, eps, causal = False, sympy.Integer(0), False
    node = a
    if isinstance(node.op, ops.NormalizeRows):
        normalize, eps = True, node.op.eps
        node = _only_into(node.inputs[0], node, users)
    if node is not None and isinstance(node.op, ops.MaskZero):
        if node.op.predicate != ops.CAUSAL_BOTTOM_RIGHT:
            return None
        causal = True
        node = _only_into(node.inputs[0], node, users)
    if node is None or not isinstance(node.op, ops.Scale):
        return None
    factor = node.op.factor
    qk = _only_into(node.inputs[0], node, users)
    if qk is None or not isinstance(qk.op, ops.Matmul) or not qk.op.transpose_b or qk.op.kv_groups != av.op.kv_groups:
        return None
    phi_q, phi_k = qk.inputs
    if not all(isinstance(n.op, ops.FeatureMap) for n in (phi_q, phi_k)) or phi_q.op.phi != phi_k.op.phi:
        return None
    if users[a] != [av]:
        return None
    region = ops.LinearAttention(
        groups=qk.op.kv_groups,
        phi=phi_q.op.phi,
        scale=factor,
        causal=causal,
        normalize=normalize,
        eps=eps,
        form="chunked" if causal else "parallel",
    )
    return region, (phi_q.inputs[0], phi_k.inputs[0], v)


def _only_into(node, user, users):
    return node if users[node] == [user] else None


@dataclass(frozen=True)
class Linearize(Pass):
    name = "linearize"
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self):
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise AttnccError(f"linearize chunk={self.chunk!r} is invalid: a positive integer is allowed")

    def run(self, graph: Graph) -> Graph:
        users = graph.users()
        matches = {
            av: match
            for av in graph.nodes_of(ops.Matmul)
            if isinstance(av.inputs[0].op, (ops.NormalizeRows, ops.MaskZero, ops.Scale))
            and (match := match_linear(av, users)) is not None
        }
        if not matches:
            self.count("not_linearized")
            return graph

        def rule(node, inputs, builder):
            match = matches.get(node)
            if match is None:
                return None
            region, (q, k, v) = match
            if region.causal:
                region = ops.LinearAttention(**{**region.attributes(), "chunk": self.chunk})
                self.count("chunked")
            else:
                self.count("parallel")
            return builder.add(region, builder.mapping[q], builder.mapping[k], builder.mapping[v])

        return rebuild(graph, rule)
