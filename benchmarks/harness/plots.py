"""Throughput against latency, one line per workload: p50 and p99 panels, closed loop solid, open loop dashed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def load_order(points: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """A mode's points with latencies, in order of load (concurrency, or offered rate): a curve that bends back
    (throughput falling as load rises) then shows as such, where sorting by throughput would hide it."""
    load = "concurrency" if mode == "closed" else "rate"
    return sorted((p for p in points if p["mode"] == mode and p["latency_ms"]), key=lambda p: p[load])


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharex=True)
    colors = plt.get_cmap("tab10")
    for i, (key, result) in enumerate(results.items()):
        for mode, style in (("closed", "-o"), ("open", "--s")):
            pts = load_order(result["points"], mode)
            if not pts:
                continue
            for ax, q in zip(axes, ("p50", "p99"), strict=True):
                label = f"{key} ({mode})"
                ax.plot([p["ok_rps"] for p in pts], [p["latency_ms"][q] for p in pts], style, color=colors(i % 10),
                        label=label, markersize=4)  # fmt: skip
    for ax, q in zip(axes, ("p50", "p99"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("ok requests/s")
        ax.set_ylabel(f"{q} latency (ms)")
        ax.set_title(f"{q} latency against throughput")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
