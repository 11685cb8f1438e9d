"""Writing a :class:`~service.router.offline.quality.QualityReport`: a JSON document, a markdown table, a PNG plot.

matplotlib (the ``eval`` extra) is imported only by :func:`plot_curves`, with the Agg backend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from service.router.offline.evaluation import AUDC_GRID_POINTS, BUDGETS, CurveMetrics
from service.router.offline.quality import GLOBAL_SHRINK, PLAIN, ROUTER, QualityReport, metric_table, paired_difference

FIGURE_SIZE_INCHES = (13.0, 5.5)
FIGURE_DPI = 110
LOG_AXIS_MIN_COST = 5e-3
LINEAR_AXIS_MAX_COST = 1.05
# Styles per kind of system: routers solid and thick, baselines dashed, references dotted.
_LINE_STYLES = {"router": ("-", 2.2), "reference": (":", 1.6), "baseline": ("--", 1.4)}


def report_json(report: QualityReport, info: dict[str, Any]) -> dict[str, Any]:
    """Everything: settings and provenance (``info``), per-fold metrics, their summaries, pooled metrics."""
    return {
        **info,
        "folds": report.folds,
        "definitions": {
            "cost": "mean realised cost per prompt / that of the most accurate single model on the same prompts",
            "audc": f"mean of the deferral curve on {AUDC_GRID_POINTS} costs in [0, 1] (0 left of its first point)",
            "qnc": "smallest normalised cost where the curve reaches the most accurate model's accuracy (null: never)",
            "acc@x": "the curve at normalised cost x",
            "spread": "sample standard deviation over folds",
        },
        "summary": metric_table(report.metrics),
        "router_minus_plain_audc": paired_difference(report, ROUTER, PLAIN),
        "router_minus_global_shrink_audc": paired_difference(report, ROUTER, GLOBAL_SHRINK),
        "per_fold": {name: [m.as_dict() for m in folds] for name, folds in report.metrics.items()},
        "fold_info": report.fold_info,
        "pooled": {name: m.as_dict() for name, m in report.pooled.items()},
        "kinds": report.kinds,
        "evaluation": report.info,
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _cell(summary: dict[str, float | int | None], digits: int = 4) -> str:
    mean, std, n = summary["mean"], summary["std"], summary["n"]
    if mean is None:
        return f"inf ({summary['finite']}/{n} finite)"
    if n == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _single(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "inf"


def markdown_table(report: QualityReport) -> str:
    """One row per system: AUDC, QNC, accuracy at each budget (mean ± spread over folds)."""
    table = metric_table(report.metrics)
    budgets = [f"acc@{b:g}" for b in BUDGETS]
    header = ["system", "AUDC", "QNC", *[f"acc@{b * 100:g}%" for b in BUDGETS]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, row in table.items():
        cells = [name, _cell(row["audc"]), _cell(row["qnc"], 3), *[_cell(row[b]) for b in budgets]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pooled_table(pooled: dict[str, CurveMetrics]) -> str:
    lines = ["| system | AUDC | QNC | acc@10% |", "| --- | --- | --- | --- |"]
    for name, m in pooled.items():
        lines.append(f"| {name} | {_single(m.audc)} | {_single(m.qnc, 3)} | {_single(m.accuracy_at[0.1])} |")
    return "\n".join(lines)


def report_markdown(report: QualityReport, title: str, preamble: list[str]) -> str:
    parts = [f"# {title}", "", *preamble, "", markdown_table(report), ""]
    if report.folds:
        parts.append(
            f"Mean ± sample standard deviation over the {report.folds} folds; QNC is `inf` in a fold whose curve "
            "never reaches the most accurate single model's accuracy (the count of finite folds is shown)."
        )
        for other, label in ((PLAIN, "plain k-means + mean error"), (GLOBAL_SHRINK, "shrinkage to the global rate")):
            diff = paired_difference(report, ROUTER, other)
            if diff is not None:
                parts.append(
                    f"\nRouter minus {label}, fold by fold: AUDC {diff['mean']:+.4f} ± {diff['std']:.4f} "
                    f"(better in {diff['wins']}/{diff['n']} folds)."
                )
        parts += [
            "",
            "Pooled out of fold (every prompt scored by the router of the fold that held it out, one lambda sweep "
            "over all of them; the plot shows these curves):",
            "",
            pooled_table(report.pooled),
        ]
    return "\n".join(parts) + "\n"


def plot_curves(report: QualityReport, path: Path, title: str) -> None:
    """Deferral curves (linear and log cost axes); single models as labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=FIGURE_SIZE_INCHES)
    for ax, log_scale in zip(axes, (False, True), strict=True):
        for name, curve in report.curves.items():
            kind = report.kinds.get(name, "baseline")
            if kind == "single":
                ax.scatter(curve.cost, curve.accuracy, s=18, color="grey", zorder=3)
                ax.annotate(name.split("/")[-1], (curve.cost[0], curve.accuracy[0]), fontsize=6, alpha=0.8)
                continue
            style, width = _LINE_STYLES[kind]
            label = f"{name} (AUDC {report.pooled[name].audc:.3f})"
            xs = [*curve.hull_cost, max(LINEAR_AXIS_MAX_COST, float(curve.hull_cost[-1]))]
            ys = [*curve.hull_accuracy, float(curve.hull_accuracy[-1])]
            ax.plot(xs, ys, linestyle=style, linewidth=width, label=label)
        ax.set_xlabel("cost / cost of the most accurate model" + (" (log)" if log_scale else ""))
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        if log_scale:
            ax.set_xscale("log")
            ax.set_xlim(LOG_AXIS_MIN_COST, LINEAR_AXIS_MAX_COST)
        else:
            ax.set_xlim(0.0, LINEAR_AXIS_MAX_COST)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
