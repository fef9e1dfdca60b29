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


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _versus(row: dict) -> str:
    return "(first)" if row.get("compared_to") is None else f"{row['max_abs_diff']:.1e}"


# (header, cell of an "ok" row); the forward + backward and validation columns appear only when a row has them
COLUMNS = [
    ("median", lambda row: format_seconds(row.get("median_s"))),
    ("time / first", lambda row: _ratio(row.get("versus_first"))),
    ("useful FLOP/s", lambda row: format_quantity(row.get("flops_per_s"), "FLOP/s")),
    ("fwd+bwd", lambda row: format_seconds(row.get("fwd_bwd_median_s"))),
    ("fwd+bwd / first", lambda row: _ratio(row.get("versus_first_fwd_bwd"))),
    ("fwd+bwd FLOP/s", lambda row: format_quantity(row.get("fwd_bwd_flops_per_s"), "FLOP/s")),
    ("K/V read", lambda row: format_quantity(row.get("kv_bytes_per_s"), "B/s")),
    ("of bandwidth", lambda row: _percent(row.get("bandwidth_fraction"))),
    ("peak extra", lambda row: format_quantity(row.get("peak_bytes"), "B", True)),
    ("compile cold", lambda row: format_seconds(row.get("compile_s"))),
    ("compile warm", lambda row: format_seconds(row.get("compile_warm_s"))),
    ("block mask", lambda row: format_seconds(row.get("block_mask_s"))),
    ("max |o - first|", _versus),
    ("validation", lambda row: row.get("validation", "-")),
]
OPTIONAL_COLUMNS = {"fwd+bwd": "fwd_bwd_median_s", "fwd+bwd / first": "fwd_bwd_median_s",
                    "fwd+bwd FLOP/s": "fwd_bwd_median_s", "validation": "validation",
                    "K/V read": "kv_bytes_per_s", "of bandwidth": "kv_bytes_per_s"}  # fmt: skip


def results_table(rows: list[dict]) -> str:
    columns = [(header, cell) for header, cell in COLUMNS
               if header not in OPTIONAL_COLUMNS or any(OPTIONAL_COLUMNS[header] in row for row in rows)]  # fmt: skip
    body = []
    for row in rows:
        if row["status"] != "ok":
            failed = ["-"] * len(columns)
            if "validation" in row and columns[-1][0] == "validation":
                failed[-1] = row["validation"]
            body.append([row["case"], row["implementation"], *failed, f"{row['status']}: {row['note']}"])
            continue
        body.append([row["case"], row["implementation"], *(cell(row) for _, cell in columns), row.get("note", "")])
    return tabulate(body, headers=["case", "implementation", *(header for header, _ in columns), "note"])


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
