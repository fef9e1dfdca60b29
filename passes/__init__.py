"""Optimization passes over the attention IR, one file per pass, and the pipelines per target.

A pipeline is a readable list of pass names with options in braces, e.g.
``tile{target=triton,block_m=64}``.
"""

from __future__ import annotations

from attncc.errors import AttnccError
from attncc.passes.base import Pass
from attncc.passes.canonicalize import Canonicalize
from attncc.passes.fold_scale import FoldScale
from attncc.passes.group_kv import GroupKV
from attncc.passes.linearize import Linearize
from attncc.passes.manager import PassManager, PassRecord
from attncc.passes.online_softmax import OnlineSoftmax
from attncc.passes.sparsity import Sparsity
from attncc.passes.split_kv import SplitKV
from attncc.passes.tile import Tile

PASSES = {p.name: p for p in (Canonicalize, FoldScale, GroupKV, Linearize, OnlineSoftmax, Sparsity, SplitKV, Tile)}

PIPELINES = {
    "pytorch": [
        "canonicalize",
        "fold-scale",
        "group-kv",
        "online-softmax",
        "sparsity",
        "split-kv",
        "tile{target=pytorch}",
    ],
    "triton": [
        "canonicalize",
        "fold-scale",
        "group-kv",
        "online-softmax",
        "sparsity",
        "split-kv",
        "tile{target=triton}",
    ],
    "cuda": ["canonicalize", "fold-scale", "group-kv", "online-softmax", "sparsity", "tile{target=cuda}"],
}
# Linear attention: the quadratic graph reassociated, chunked for each target's tiles.
LINEAR_PIPELINES = {
    "pytorch": ["canonicalize", "group-kv", "linearize{chunk=64}"],
    "triton": ["canonicalize", "group-kv", "linearize{chunk=16}"],
}


def parse_pass(text: str) -> Pass:
    """``name`` or ``name{option=value,...}``; integer values become ints."""
    name, _, rest = text.strip().partition("{")
    cls = PASSES.get(name.strip())
    if cls is None:
        raise AttnccError(f"pass {name.strip()!r} is unknown; known passes: {', '.join(PASSES)}")
    options = {}
    if rest:
        if not rest.endswith("}"):
            raise AttnccError(f"pass options {text!r} must end with '}}'")
        for item in filter(None, (part.strip() for part in rest[:-1].split(","))):
            key, equals, value = item.partition("=")
            if not equals:
                raise AttnccError(f"pass option {item!r} in {text!r} is not key=value")
            options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    try:
        return cls(**options)
    except TypeError as error:
        raise AttnccError(f"pass {name!r}: {error}") from None


def pipeline(names) -> list[Pass]:
    """Pass objects for a target name in PIPELINES, or for a list or comma-free sequence of pass texts."""
    if isinstance(names, str):
        if names not in PIPELINES:
            raise AttnccError(f"pipeline {names!r} is unknown; known pipelines: {', '.join(PIPELINES)}")
        names = PIPELINES[names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (str, Pass)) for n in names):
        raise AttnccError(
            f"pipeline={names!r} is invalid: a target name ({', '.join(PIPELINES)}) or a list of pass names is allowed"
        )
    return [parse_pass(n) if isinstance(n, str) else n for n in names]


__all__ = ["LINEAR_PIPELINES", "PASSES", "PIPELINES", "Pass", "PassManager", "PassRecord", "parse_pass", "pipeline"]
