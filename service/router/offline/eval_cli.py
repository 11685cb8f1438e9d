"""``python -m service eval``: score weights on labelled outcomes, or cross-validate ``fit`` (``--cv K``).

Writes ``PREFIX.json`` (everything), ``PREFIX.md`` (the table) and ``PREFIX.png`` (the curves), and
prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service import __version__
from service.digest import source_commit
from service.router.offline import fit as fit_module
from service.router.offline.costs import blended_prices, has_observed_costs, relative_costs, require_observed_costs
from service.router.offline.data import DataError, LabelledSet, require_outcomes
from service.router.offline.estimate import DEFAULT_CV_FOLDS
from service.router.offline.options import TextMode
from service.router.offline.quality import FitSettings, QualityReport, cross_validate, evaluate_weights, realised_costs
from service.router.offline.quality_report import plot_curves, report_json, report_markdown, write_json
from service.router.weights import RouterWeights, WeightsError, check_embedder, default_weights_path, load_weights

DEFAULT_PREFIX = "router-quality"
OUTPUT_SUFFIXES = (".json", ".md", ".png")  # written beside each other under one prefix


def eval_main(args: argparse.Namespace) -> int:
    """Load, embed, evaluate, write; returns the process exit code."""
    today = datetime.now(UTC).date().isoformat()
    prefix: Path = args.out or Path(f"{DEFAULT_PREFIX}{f'-cv{args.cv}' if args.cv else ''}-{today}")
    if prefix.suffix in OUTPUT_SUFFIXES:  # --out quality.json names one of the outputs: its stem is the prefix
        prefix = prefix.with_suffix("")
    progress = not args.no_progress
    if importlib.util.find_spec("matplotlib") is None:
        print("eval failed: the plot needs matplotlib: pip install -e '.[cpu,eval]'", file=sys.stderr)
        return 1
    try:
        weights = None if args.cv else load_weights(args.weights or default_weights_path())
        text_mode: TextMode = args.text or (fit_module.weights_text_mode(weights) if weights else "last_block")
        # with --cv the folds' fits need prices for --costs prices; weights bring their own costs
        needs_prices = bool(args.cv) and args.costs == "prices"
        labelled, prices, _ = fit_module.load_inputs(args, text_mode, require_prices=needs_prices)
        require_outcomes(labelled, weights.models if weights is not None else None)
        if weights is None:
            check_cv_sizes(labelled.num_rows, args)
            if args.costs == "rows":
                require_observed_costs(labelled.models, labelled.cost_usd)
        # The price list routes the folds' fits (--cv, --costs prices) and prices calls the rows have no cost
        # for; otherwise it is not needed, and a model missing from it is no error.
        priced = needs_prices or not has_observed_costs(labelled.cost_usd)
        prices_relative = None
        if prices is not None and priced:
            prices_relative = relative_costs(blended_prices(labelled.models, prices))
        realised, cost_source = realised_costs(labelled, prices_relative)
        embeddings, embedder_id, embedder_sha256 = fit_module.embed_prompts(
            labelled.texts, cache=args.embedding_cache, progress=progress
        )
        if weights is None:
            settings = FitSettings(
                k=args.clusters,
                seed=args.seed,
                n_restarts=args.restarts,
                alpha=args.alpha,
                prior=args.prior,
                alpha_criterion=args.alpha_criterion,
            )
            route_cost = prices_relative if args.costs == "prices" else None
            report = cross_validate(
                labelled,
                embeddings,
                realised,
                route_cost=route_cost,
                folds=args.cv,
                settings=settings,
                progress=progress,
            )
        else:
            check_embedder(weights, embedder_id, embedder_sha256, source=str(args.weights or default_weights_path()))
            report = evaluate_weights(weights, labelled, embeddings, realised)
        info = _info(args, labelled, text_mode, cost_source, weights, embedder_id, embedder_sha256)
        title, preamble = _describe(report, info)
        markdown = report_markdown(report, title, preamble)
        write_json(prefix.with_name(prefix.name + ".json"), report_json(report, info))
        prefix.with_name(prefix.name + ".md").write_text(markdown, encoding="utf-8")
        plot_title = f"{title} (curves pooled out of fold; AUDC in the legend: pooled)" if report.folds else title
        plot_curves(report, prefix.with_name(prefix.name + ".png"), plot_title)
    except (DataError, WeightsError, ValueError, OSError) as exc:
        print(f"eval failed: {exc}", file=sys.stderr)
        return 1
    print(markdown)
    if "warning" in info:
        print(f"warning: {info['warning']}", file=sys.stderr)
    print(f"wrote {prefix}.json, .md, .png")
    return 0


def check_cv_sizes(rows: int, args: argparse.Namespace) -> None:
    """Before embedding: ``--cv K`` fits on every fold's training rows, which must be enough for ``fit``."""
    if not 2 <= args.cv <= rows:
        raise DataError(f"--cv K needs 2 <= K <= the number of prompts ({rows}); got {args.cv}")
    smallest = rows - -(-rows // args.cv)  # the largest fold is held out
    what = f"the smallest training set of --cv {args.cv} ({rows} prompts)"
    fit_module.check_fit_settings(smallest, args.clusters, args.restarts, args.alpha, args.seed, what=what)


def _info(
    args: argparse.Namespace,
    labelled: LabelledSet,
    text_mode: TextMode,
    cost_source: str,
    weights: RouterWeights | None,
    embedder_id: str,
    embedder_sha256: str,
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "kind": "router-quality",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": ["python", "-m", "service", *sys.argv[1:]],
        "data": labelled.sources_json(),
        "models": list(labelled.models),
        "tasks": labelled.task_counts,
        "text_mode": text_mode,
        "realised_cost": cost_source,
        "embedder": {"id": embedder_id, "sha256": embedder_sha256},
        "tool": {"version": __version__, "numpy": np.__version__, "git_commit": source_commit()},
    }
    if weights is None:
        info["settings"] = {
            "clusters": args.clusters,
            "seed": args.seed,
            "restarts": args.restarts,
            "alpha": args.alpha
            if args.alpha is not None
            else f"chosen in each fold by inner {DEFAULT_CV_FOLDS}-fold CV ({args.alpha_criterion})",
            "prior": args.prior,
            "alpha_criterion": args.alpha_criterion,
            "route_cost": args.costs,
        }
    else:
        info["weights"] = {"path": str(args.weights or default_weights_path()), "version": weights.version}
        seen = training_files_evaluated(weights, labelled)
        if seen:
            info["warning"] = (
                f"the weights were fitted (or a model added to them estimated) on {', '.join(seen)}: these scores are "
                "in-sample, not what the router does on prompts it has not seen (use test files, or --cv K for an "
                "out-of-sample estimate)"
            )
    return info


def training_files_evaluated(weights: RouterWeights, labelled: LabelledSet) -> list[str]:
    """The evaluated files the weights were fitted on, or a model added to them estimated on (by sha256, as ``fit``
    and ``add-model`` record them)."""
    training = weights.metadata.get("training_data", {})
    files = list(training.get("files", [])) if isinstance(training, dict) else []
    added = weights.metadata.get("added_models", [])
    for model in added if isinstance(added, list) else []:
        if isinstance(model, dict) and isinstance(model.get("files"), list):
            files.extend(model["files"])
    fitted = {f.get("sha256") for f in files if isinstance(f, dict)}
    return [source.name for source in labelled.sources if source.sha256 in fitted]


def _describe(report: QualityReport, info: dict[str, Any]) -> tuple[str, list[str]]:
    files = ", ".join(f"{d['name']} ({d['rows']} rows, sha256 {d['sha256'][:12]})" for d in info["data"])
    evaluation = report.info
    lines = [
        f"Data: {files}; {evaluation['rows_scored']} of {evaluation['rows']} prompts scored (the rest lack an "
        f"outcome or a cost for some model). Text embedded: {info['text_mode']}. "
        f"Realised cost: {info['realised_cost']}.",
        f"Cost axis: mean cost per prompt / that of the most accurate single model on the same prompts "
        f"({evaluation['reference_model']}, accuracy {evaluation['reference_accuracy']:.4f} over all scored prompts).",
    ]
    if report.folds:
        s = info["settings"]
        alphas = ", ".join(f"{f['alpha']:g}" for f in report.fold_info)
        lines.append(
            f"Router: `fit` with K={s['clusters']}, seed {s['seed']}, {s['restarts']} k-means restarts, prior "
            f"{s['prior']}; alpha {s['alpha']}: {alphas}."
        )
        return f"Router quality: {report.folds}-fold cross-validation", lines
    lines.append(f"Router: weights {info['weights']['version']} ({info['weights']['path']}).")
    if "warning" in info:
        lines.insert(0, f"**Warning: {info['warning']}.**")
    return "Router quality", lines
