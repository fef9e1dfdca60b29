"""split-kv: give each region a decode schedule (flash-decoding with packed query heads).

At decode shapes (``groups x N`` query rows per KV head, a handful) a prefill tile holds
one useful row and one program streams all M keys. With the schedule, the backends pack
the query heads of a KV group as the rows of one tile and split the visited keys across
programs, merging the partial (o, lse) exactly; the split count is chosen at call time
(``DecodeSchedule.splits``) because M, B and the device are known only then.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from attncc.errors import AttnccError
from attncc.ir import ops
from attncc.ir.graph import Graph
from attncc.ir.schedule import DecodeSchedule
from attncc.passes.base import Pass
from attncc.passes.rewrite import rebuild


@dataclass(frozen=True)
class SplitKV(Pass):
    name = "split-kv"
    max_rows: int = 16  # packed query rows per KV head up to which a call decodes
    min_keys: int = 1024  # no split is shorter: each split's fixed costs stay small against its reads
    waves: int = 2

    def __post_init__(self):
        for field_name in ("max_rows", "min_keys", "waves"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttnccError(f"split-kv: {field_name}={value!r} is invalid: a positive integer is allowed")

    def run(self, graph: Graph) -> Graph:
        schedule = DecodeSchedule(self.max_rows, self.min_keys, self.waves)

        def rule(node, inputs, builder):
            if not isinstance(node.op, ops.FlashAttention) or node.op.decode == schedule:
                return None
            self.count("regions_split")
            return builder.add(replace(node.op, decode=schedule), *inputs)

        return rebuild(graph, rule)
