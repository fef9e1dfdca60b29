"""Tile maps of a compiled program: tiles computed against the total and the minimum needed, and a PNG."""

from __future__ import annotations

import torch

from attncc.errors import AttnccError
from attncc.ir import ops
from attncc.passes.sparsity import needed_tiles, tile_map
from attncc.validation import example_captured


def _region(attn):
    regions = attn.graph.nodes_of(ops.FlashAttention)
    if not regions:
        raise AttnccError("the program has no fused attention region: its pipeline did not run online-softmax")
    return regions[0].op


def tile_report(attn, n: int, m: int, batch: int = 1, png: str | None = None) -> str:
    """Count the (query tile, KV tile) pairs the program computes at N=n, M=m, against the minimum needed.

    Tiles are counted per batch and head as the schedule treats them all; with
    ``png``, also draws the map (empty / partial / full) with matplotlib.
    """
    region = _region(attn)
    block_m, block_n = region.block_m or n, region.block_n or m
    captured = example_captured(attn._captured_meta, torch.Generator().manual_seed(0), "cpu")
    used = {str(s) for s in region.mask.free_symbols}
    heads = attn.spec.num_heads if "h" in used else 1  # a mask that ignores h (or b) is the same for all
    batch = batch if "b" in used else 1
    scheduled = tile_map(region.mask, region.schedule, n, m, block_m, block_n, captured, batch, heads)
    needed = needed_tiles(region.mask, n, m, block_m, block_n, captured, batch, heads)
    computed, minimum, total = int((scheduled > 0).sum()), int((needed > 0).sum()), scheduled.numel()
    lines = [
        f"tiles of {block_m} queries x {block_n} keys at N={n}, M={m}:",
        f"  computed {computed} of {total} ({100 * computed / total:.1f}%), "
        f"minimum needed {minimum}, tile efficiency {100 * minimum / max(computed, 1):.1f}%",
        f"  full (no mask evaluated) {int((scheduled == 2).sum())}, partial (masked) {int((scheduled == 1).sum())}",
    ]
    steps = _pytorch_tiles(attn, n, m, batch, captured)
    if steps is not None:
        query_tiles, kv_tiles = steps
        packed = f", the {region.groups} query heads of a KV head packed as rows" if region.groups > 1 else ""
        where = "" if region.schedule is not None and region.schedule.table else (
            f"; KV tiles start at each query tile's first visible key, not at multiples of {block_n}"
        )
        lines.append(f"  the pytorch backend: {query_tiles} query tiles{packed}, {kv_tiles} KV tiles{where}")
    if png:
        _draw(scheduled, png, f"{computed}/{total} tiles computed (minimum {minimum})")
        lines.append(f"wrote {png}")
    return "\n".join(lines)


def _pytorch_tiles(attn, n: int, m: int, batch: int, captured: dict) -> tuple[int, int] | None:
    """(query tiles, KV tiles) the pytorch backend's region visits, or None for other backends."""
    region = getattr(attn.module, "FlashAttention", None)
    if attn.backend != "pytorch" or region is None:
        return None
    b = torch.arange(batch).view(-1, 1, 1, 1)
    values = [captured[node.op.label] for node in attn.graph.captured]
    tiles = [len(kv_tiles) for *_, kv_tiles in region.tiles(batch, n, m, attn.spec.num_kv_heads, "cpu", b, *values)]
    return len(tiles), sum(tiles)


def _draw(scheduled: torch.Tensor, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError as error:
        raise AttnccError("drawing a tile map needs matplotlib: pip install matplotlib") from error
    figure, axes = plt.subplots(figsize=(6, 6))
    colors = ListedColormap(["#f2f2f2", "#f4a261", "#2a9d8f"])
    image = axes.imshow(scheduled.numpy(), cmap=colors, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
    axes.set_xlabel("KV tile")
    axes.set_ylabel("query tile")
    axes.set_title(title)
    bar = figure.colorbar(image, ticks=[0, 1, 2], fraction=0.046)
    bar.ax.set_yticklabels(["empty (skipped)", "partial (masked)", "full"])
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
