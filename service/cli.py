"""Command line: ``python -m service serve-router | fit | inspect-weights``.

Each ``serve-*`` flag maps to an ``LLMROUTER_*`` environment variable (see ``service.config``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

from service.config import RouterSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve-router", help="serve POST /v1/route (model router)")
    RouterSettings.add_arguments(serve)
    serve.set_defaults(handler=_serve_router)

    from service.router.fit import add_fit_arguments, fit_main

    fit = commands.add_parser("fit", help="fit router weights from labelled outcomes")
    add_fit_arguments(fit)
    fit.set_defaults(handler=fit_main)

    inspect = commands.add_parser("inspect-weights", help="validate a weights file and print its summary")
    inspect.add_argument("path", nargs="?", help="weights file (default: the shipped weights)")
    inspect.set_defaults(handler=_inspect_weights)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


def serve_router_main() -> int:
    """Console script ``llm-router``: the same as ``python -m service serve-router``."""
    return main(["serve-router", *sys.argv[1:]])


def _serve_router(args: argparse.Namespace) -> int:
    from service.http.server import configure_logging, serve
    from service.router.app import build_router_service

    try:
        settings = RouterSettings.from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return serve(functools.partial(build_router_service, settings), settings)


def _inspect_weights(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from service.router.weights import WeightsError, default_weights_path, load_weights

    path = Path(args.path) if args.path else default_weights_path()
    try:
        weights = load_weights(path)
    except WeightsError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    summary = {
        "path": str(path),
        "version": weights.version,
        "models": list(weights.models),
        "clusters": weights.num_clusters,
        "dim": weights.dim,
        "default_lambda": weights.default_lambda,
        "cost_per_1k": dict(zip(weights.models, map(float, weights.cost_per_1k), strict=True)),
        "embedder": {"id": weights.embedder_id, "sha256": weights.embedder_sha256},
        "metadata": dict(weights.metadata),
    }
    print(json.dumps(summary, indent=2, default=str))
    return 0
