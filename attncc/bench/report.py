"""Result rows as a table, a plot, and a description of the machine that measured them."""

from __future__ import annotations

import contextlib
import os
import platform

import torch
from tabulate import tabulate

import attncc
from attncc.errors import AttnccError


def format_quantity(value: float | None, unit: str, binary: bool = False) -> str:
    """3 significant digits with an SI (or, for bytes, binary) prefix; '-' for None."""
    if value is None:
        return "-"
    base = 1024.0 if binary else 1000.0
    prefixes = ["", "Ki", "Mi", "Gi", "Ti"] if binary else ["", "K", "M", "G", "T", "P"]
    index = 0
    while abs(value) >= 1000.0 and index < len(prefixes) - 1:  # 1020 MiB reads better as 0.996 GiB
        value /= base
        index += 1
    return f"{value:.3g} {prefixes[index]}{unit}"


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"


def results_table(rows: list[dict]) -> str:
    headers = ["case", "implementation", "median", "time / first", "useful FLOP/s", "peak extra", "compile cold",
               "compile warm", "block mask", "max |o - first|", "note"]  # fmt: skip
    body = []
    for row in rows:
        if row["status"] != "ok":
            body.append([row["case"], row["implementation"], "-", "-", "-", "-", "-", "-", "-", "-",
                         f"{row['status']}: {row['note']}"])  # fmt: skip
            continue
        diff = row.get("max_abs_diff")
        versus = "(first)" if row.get("compared_to") is None else f"{diff:.1e}"
        ratio = row.get("versus_first")
        body.append([
            row["case"], row["implementation"], format_seconds(row.get("median_s")),
            "-" if ratio is None else f"{ratio:.2f}x",
            format_quantity(row.get("flops_per_s"), "FLOP/s"), format_quantity(row.get("peak_bytes"), "B", True),
            format_seconds(row.get("compile_s")), format_seconds(row.get("compile_warm_s")),
            format_seconds(row.get("block_mask_s")), versus, row.get("note", ""),
        ])  # fmt: skip
    return tabulate(body, headers=headers)


def machine_description(device) -> dict:
    """What the numbers were measured on."""
    device = torch.device(device)
    info = {"python": platform.python_version(), "torch": torch.__version__, "attncc": attncc.__version__,
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}  # fmt: skip
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                               info["cpu"])  # fmt: skip
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/meminfo", encoding="ascii") as handle:
            kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
            info["memory_gib"] = round(kib / 2**20, 1)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def plot_results(rows: list[dict], path: str, title: str) -> None:
    """Median time against sequence length, one panel per mask, one line per implementation."""
    try:
        import matplotlib
    except ImportError:
        raise AttnccError("--plot needs matplotlib: pip install 'attncc[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = list(dict.fromkeys(row["mask"] for row in rows))
    figure, axes = plt.subplots(1, len(masks), figsize=(4.5 * len(masks), 4), squeeze=False)
    for axis, mask in zip(axes[0], masks):
        mine = [row for row in rows if row["mask"] == mask and row.get("median_s")]
        for name in dict.fromkeys(row["implementation"] for row in mine):
            points = sorted((row["n"], row["median_s"]) for row in mine if row["implementation"] == name)
            axis.plot([n for n, _ in points], [t * 1000 for _, t in points], marker="o", label=name)
        axis.set_title(mask)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("N = query length")
        axis.set_ylabel("median time (ms)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
