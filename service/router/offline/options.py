"""Flags and defaults of the offline router commands (``fit``, ``eval``, ``add-model``).

Only argparse and pathlib here, so that ``python -m service`` builds its parser without importing
numpy or FAISS; each command's module is imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

TextMode = Literal["last_block", "full"]
TEXT_MODES: tuple[TextMode, ...] = ("last_block", "full")
Prior = Literal["task", "global"]
PRIORS: tuple[Prior, ...] = ("task", "global")
CostSource = Literal["prices", "rows"]
COST_SOURCES: tuple[CostSource, ...] = ("prices", "rows")
Criterion = Literal["audc", "log-loss"]
CRITERIA: tuple[Criterion, ...] = ("audc", "log-loss")

DEFAULT_CLUSTERS = 100
DEFAULT_SEED = 0
DEFAULT_RESTARTS = 10
DEFAULT_LAMBDA = 0.1
DEFAULT_DATA_DIR = Path("..") / "shared" / "data" / "routerbench"
DEFAULT_TRAIN_FILES = ("arc_challenge_train.csv", "mbpp_train.csv", "winograde_train.csv")
PRICES_FILE = "prices.json"


def add_data_arguments(parser: argparse.ArgumentParser, *, data_required: bool = False) -> None:
    """Labelled files, prices, embedding cache, progress: shared by ``fit``, ``eval`` and ``add-model``."""
    if data_required:
        parser.add_argument("--data", nargs="+", type=Path, required=True, metavar="FILE", help="labelled CSV or JSONL")
    else:
        parser.add_argument(
            "--data",
            nargs="+",
            type=Path,
            default=[DEFAULT_DATA_DIR / name for name in DEFAULT_TRAIN_FILES],
            metavar="FILE",
            help="labelled CSV or JSONL files (default: the RouterBench train files under ../shared/data/routerbench)",
        )
    parser.add_argument("--prices", type=Path, default=None, help="prices JSON (default: prices.json beside the data)")
    parser.add_argument(
        "--embedding-cache", type=Path, default=None, metavar="FILE", help="reuse (or write) the embeddings here"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def add_fit_settings(parser: argparse.ArgumentParser, *, text_default: TextMode | None = "last_block") -> None:
    """The fit settings (shared by ``fit`` and ``eval --cv``)."""
    parser.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS, help="number of clusters K")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="k-means and CV seed")
    parser.add_argument("--restarts", type=int, default=DEFAULT_RESTARTS, help="k-means restarts (best kept)")
    parser.add_argument("--alpha", type=float, default=None, help="shrinkage strength (default: chosen by CV)")
    parser.add_argument(
        "--alpha-criterion",
        choices=CRITERIA,
        default="audc",
        help="what the CV choosing alpha maximises: held-out AUDC, or minimises: held-out log-loss",
    )
    parser.add_argument(
        "--prior", choices=PRIORS, default="task", help="shrink toward the cluster's task mix or the global rate"
    )
    parser.add_argument(
        "--costs",
        choices=COST_SOURCES,
        default="prices",
        help="model cost from the prices file (blended list price) or from the observed per-row costs",
    )
    parser.add_argument(
        "--text",
        choices=TEXT_MODES,
        default=text_default,
        help=f"which part of each prompt to embed (default: {text_default or 'as the weights were fitted'})",
    )


def prices_file(args: argparse.Namespace) -> Path | None:
    """``--prices``, else ``prices.json`` beside the first labelled file when there is one."""
    if args.prices is not None:
        return Path(args.prices)
    beside = Path(args.data[0]).parent / PRICES_FILE
    return beside if beside.is_file() else None


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    add_fit_settings(parser)
    # required: a default of the shipped file replaced the weights every router loads by default on a bare `fit`
    parser.add_argument("--out", type=Path, required=True, help="weights file to write (the shipped one: see README)")
    parser.add_argument("--default-lambda", type=float, default=DEFAULT_LAMBDA, help="cost weight stored as default")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    add_fit_settings(parser, text_default=None)
    parser.add_argument("--weights", type=Path, default=None, help="weights to score (default: the shipped file)")
    parser.add_argument(
        "--cv", type=int, default=0, metavar="K", help="K-fold cross-validation of fit on the data (ignores --weights)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PREFIX",
        help="write PREFIX.json, .md and .png (default: router-quality[-cvK]-DATE in the current directory)",
    )


def add_add_model_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, data_required=True)
    parser.add_argument("--model", required=True, help="the new model: its outcome column in the labelled data")
    parser.add_argument("--weights", type=Path, default=None, help="weights to extend (default: the shipped file)")
    parser.add_argument("--out", type=Path, required=True, help="weights file to write")
    cost = parser.add_mutually_exclusive_group()
    cost.add_argument("--cost-per-1k", type=float, default=None, help="its cost, in the weights' own unit")
    cost.add_argument(
        "--price-usd", type=float, nargs=2, default=None, metavar=("INPUT", "OUTPUT"), help="its USD list prices per 1k"
    )
    parser.add_argument(
        "--alpha", type=float, default=None, help="shrinkage strength (default: the one the weights were fitted with)"
    )
