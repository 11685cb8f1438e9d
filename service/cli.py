"""Command line: ``python -m service serve | serve-router | serve-dispatcher | fit | eval | add-model | inspect-weights
| keygen | add-endpoint | add-key``.

Each ``serve-*`` flag maps to an ``LLMROUTER_*`` environment variable (see ``service.config``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from service.config import MAX_PORT, MULTIPROC_DIR_ENV, DispatcherSettings, RouterSettings
from service.dispatch.endpoints import EndpointSpec

CHILD_POLL_S = 0.2  # `serve`: how often it checks that both services still run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    both = commands.add_parser("serve", help="run the router and the dispatcher together on their defaults")
    both.add_argument("--host", default=RouterSettings.host, help="address both services bind (default: %(default)s)")
    both.add_argument(
        "--router-port", type=_port, default=RouterSettings.port, help="router port (default: %(default)s)"
    )
    both.add_argument(
        "--dispatcher-port", type=_port, default=DispatcherSettings.port, help="dispatcher port (default: %(default)s)"
    )
    both.set_defaults(handler=_serve_both)

    serve = commands.add_parser("serve-router", help="serve POST /v1/route (model router)")
    RouterSettings.add_arguments(serve)
    serve.set_defaults(handler=_serve_router)

    dispatch = commands.add_parser("serve-dispatcher", help="serve POST /route/ (signed worker assignments)")
    DispatcherSettings.add_arguments(dispatch)
    dispatch.set_defaults(handler=_serve_dispatcher)

    keygen = commands.add_parser("keygen", help="create an Ed25519 signing key file for the dispatcher")
    keygen.add_argument("path", type=Path, help="key file to create (mode 0600; the public key goes to PATH.pub)")
    keygen.set_defaults(handler=_keygen)

    add_endpoint = commands.add_parser("add-endpoint", help="add an endpoint with a new api key and worker token")
    add_endpoint.add_argument("name", help="endpoint name (letters, digits, ._:-)")
    add_endpoint.add_argument("--config", type=Path, required=True, help="endpoints file (TOML), created if absent")
    scaling = (
        ("--max-queue-time-s", float, "seconds of queued work (load / max_perf) past which a worker takes no more"),
        ("--target-util", float, "share of the workers' measured perf that the autoscaler plans to use"),
        ("--min-workers", int, "fewest workers wanted"),
        ("--max-workers", int, "most workers wanted"),
        ("--cold-workers", int, "spare stopped workers wanted, ready to start"),
    )
    for flag, kind, text in scaling:
        default = getattr(EndpointSpec, flag.removeprefix("--").replace("-", "_"))
        add_endpoint.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    add_endpoint.set_defaults(handler=_add_endpoint)

    add_key = commands.add_parser("add-key", help="add another api key or worker token to an endpoint (rotation)")
    add_key.add_argument("name", help="endpoint name")
    add_key.add_argument("--config", type=Path, required=True, help="endpoints file (TOML)")
    add_key.add_argument("--kind", choices=("api", "worker"), default="api", help="client api key or worker token")
    add_key.set_defaults(handler=_add_key)

    from service.router.offline.options import add_add_model_arguments, add_eval_arguments, add_fit_arguments

    fit = commands.add_parser("fit", help="fit router weights from labelled outcomes")
    add_fit_arguments(fit)
    fit.set_defaults(handler=_fit)

    evaluate = commands.add_parser("eval", help="deferral curves, AUDC and QNC of weights, or of fit by --cv K")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)

    add_model = commands.add_parser("add-model", help="append a model to weights from its outcomes on a small set")
    add_add_model_arguments(add_model)
    add_model.set_defaults(handler=_add_model)

    inspect = commands.add_parser("inspect-weights", help="validate a weights file and print its summary")
    inspect.add_argument("path", nargs="?", help="weights file (default: the shipped weights)")
    inspect.set_defaults(handler=_inspect_weights)
    return parser


# Secrets a flag shows to every local user (`ps`, /proc/PID/cmdline): said so, with the variable to use instead.
SECRET_FLAGS = {"admin_token": "LLMROUTER_ADMIN_TOKEN", "signing_key": "LLMROUTER_SIGNING_KEY"}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    for name, variable in SECRET_FLAGS.items():  # from the parsed values: argparse also takes abbreviations
        if getattr(args, name, None) is not None:
            print(f"warning: --{name.replace('_', '-')} on the command line is visible to every local user (ps); set"
                  f" {variable} instead", file=sys.stderr)  # fmt: skip
    try:
        return int(args.handler(args) or 0)
    except OSError as exc:  # a folder that does not exist, a port in use: the user's to fix, not a traceback
        print(f"error: {_os_error_text(exc)}", file=sys.stderr)
        return 1


def _os_error_text(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be 0-{MAX_PORT}")
    return port


def serve_router_main() -> int:
    """Console script ``llm-router``: the same as ``python -m service serve-router``."""
    return main(["serve-router", *sys.argv[1:]])


def _own_metrics_folder() -> None:
    """Drop an inherited ``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is imported (it picks file-backed
    values at import). Set in an image for another program, a folder shared across runs carried counters over from
    earlier runs, and a dead run's last ``*_ready`` 0 held the merged gauge at 0 while the server served."""
    for name in (MULTIPROC_DIR_ENV, MULTIPROC_DIR_ENV.lower()):  # prometheus_client still honours the old spelling
        if os.environ.pop(name, None):
            print(f"warning: {name} ignored: the server keeps its own metrics folder", file=sys.stderr)


def _serve_router(args: argparse.Namespace) -> int:
    _own_metrics_folder()  # before anything imports prometheus_client
    from service.http.server import configure_logging, hold_early_signals, serve

    hold_early_signals()
    from service.router.app import build_router_service

    try:
        settings = RouterSettings.from_args(args)
        _check_router_files(settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return serve(functools.partial(build_router_service, settings), settings)


def _check_router_files(settings: RouterSettings) -> None:
    """Files the loading thread reads and the device it loads onto, checked before binding: missing, the server
    listened, failed to load and answered 503 for ever instead of exiting with the reason."""
    if settings.weights is not None:
        if not settings.weights.is_file():
            raise ValueError(f"--weights {settings.weights}: no such file")
        from service.router.weights import WeightsError, load_weights

        try:  # a few hundred KB: a file that is no weights exits here, not in a router that answers 503 for ever
            load_weights(settings.weights)
        except WeightsError as exc:
            raise ValueError(f"--weights: {exc}") from None
    if settings.model_dir is not None and not (settings.model_dir / "model.safetensors").is_file():
        raise ValueError(f"--model-dir {settings.model_dir}: no model.safetensors in it")
    if settings.device.startswith("cuda"):  # only then is torch worth importing here
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {settings.device}: CUDA is not available on this host (use auto or cpu)")
        index = int(settings.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {settings.device}: this host has {torch.cuda.device_count()} CUDA device(s)")


def _serve_both(args: argparse.Namespace) -> int:
    """Both services as child processes (each configurable through its ``LLMROUTER_*`` variables); signals are
    forwarded, and when one exits the other is stopped."""
    _own_metrics_folder()  # before anything imports prometheus_client; the children then inherit none
    import signal
    import subprocess
    import time

    from service.http.server import drain_when_parent_dies, exit_status, hold_early_signals, stop_requested

    # Each child ignores SIGHUP (a disposition exec keeps) until its loop handles it: a reload forwarded while it
    # still imports killed it. And each drains when this process dies, rather than serving on as an orphan.
    hold_early_signals()
    commands = (("serve-router", args.router_port), ("serve-dispatcher", args.dispatcher_port))
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "service", command, "--host", args.host, "--port", str(port)],
            preexec_fn=functools.partial(drain_when_parent_dies, os.getpid()),  # safe: no threads run here yet
        )
        for command, port in commands
    ]

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    if stop_requested():
        forward(signal.SIGTERM, None)
    while all(child.poll() is None for child in children):
        time.sleep(CHILD_POLL_S)
    first = next(child for child in children if child.returncode is not None)
    died_on_its_own = not stopping
    if died_on_its_own:  # stop the other (signalled once, it drains and exits 0)
        name = commands[children.index(first)][0]  # its own error, if any, is above: say whose it was
        print(f"error: {name} exited ({exit_status(first.returncode)}); stopping the other service", file=sys.stderr)
        forward(signal.SIGTERM, None)
    codes = [exit_status(child.wait()) for child in children]
    if died_on_its_own:
        # it says why (the other's exit may be the SIGTERM sent to it); stopped unasked with 0, the pair is still
        # down: 1, for the process manager to restart it, as the --workers supervisor does
        return exit_status(first.returncode) or 1
    return max(codes)


def serve_dispatcher_main() -> int:
    """Console script ``llm-dispatcher``: the same as ``python -m service serve-dispatcher``."""
    return main(["serve-dispatcher", *sys.argv[1:]])


def _serve_dispatcher(args: argparse.Namespace) -> int:
    _own_metrics_folder()  # before anything imports prometheus_client
    from service.http.server import configure_logging, hold_early_signals, serve

    hold_early_signals()
    from service.dispatch.app import build_dispatcher_service
    from service.dispatch.endpoints import ConfigError, load_config
    from service.dispatch.signing import KeyFileError

    try:
        settings = DispatcherSettings.from_args(args)
        if settings.config is not None:
            load_config(settings.config)  # fail before binding, with the file's own error
        if settings.redis_url:
            from service.dispatch.redis_store import check_url

            check_url(settings.redis_url)
        from service.dispatch.app import load_signer
        from service.dispatch.signing import SEED_BYTES, read_public_key_file, read_public_keys

        signer = load_signer(settings)  # key file, or hex seed: fail before binding
        read_public_keys(settings.previous_public_keys)
        if settings.next_public_key_file is not None:
            read_public_key_file(settings.next_public_key_file)
    except (ValueError, ConfigError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    # No key configured: every worker process must sign with the same ephemeral one, so the parent makes it.
    seed = os.urandom(SEED_BYTES) if signer.ephemeral and settings.workers > 1 else None
    return serve(functools.partial(build_dispatcher_service, settings, ephemeral_seed=seed), settings)


def _keygen(args: argparse.Namespace) -> int:
    from service.dispatch.signing import write_key_file

    try:
        signer = write_key_file(args.path)
    except FileExistsError as exc:
        print(f"error: {exc.filename or args.path} exists; refusing to overwrite a signing key", file=sys.stderr)
        return 1
    print(f"signing key: {args.path} (mode 0600)\npublic key:  {signer.public_key.hex()} ({args.path}.pub)")
    print(f"key id:      {signer.key_id}")
    return 0


def _add_endpoint(args: argparse.Namespace) -> int:
    from service.dispatch.endpoints import (
        ConfigError,
        EndpointRegistry,
        EndpointSpec,
        hash_key,
        new_key,
        update_config,
        with_endpoint,
    )

    api_key, worker_token = new_key("dk"), new_key("wt")

    def add(registry: EndpointRegistry) -> EndpointRegistry:
        if registry.get(args.name) is not None:
            raise ConfigError(f"endpoint {args.name!r} exists; use add-key to give it more keys")
        spec = EndpointSpec(
            name=args.name,
            api_key_sha256=(hash_key(api_key),),
            worker_token_sha256=(hash_key(worker_token),),
            max_queue_time_s=args.max_queue_time_s,
            target_util=args.target_util,
            min_workers=args.min_workers,
            max_workers=args.max_workers,
            cold_workers=args.cold_workers,
        )
        return with_endpoint(registry, spec)

    try:
        update_config(args.config, add)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"endpoint {args.name} added to {args.config} (only the keys' hashes are stored; keep these now)")
    print(f"api key:      {api_key}\nworker token: {worker_token}")
    return 0


def _add_key(args: argparse.Namespace) -> int:
    from service.dispatch.endpoints import ConfigError, EndpointRegistry, add_key, new_key, update_config, with_endpoint

    key = new_key("dk" if args.kind == "api" else "wt")

    def add(registry: EndpointRegistry) -> EndpointRegistry:
        spec = registry.get(args.name)
        if spec is None:
            raise ConfigError(f"no endpoint named {args.name!r} in {args.config}")
        return with_endpoint(registry, add_key(spec, kind=args.kind, key=key))

    try:
        update_config(args.config, add)  # no file: no endpoints, so the endpoint is named as missing
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'api key' if args.kind == 'api' else 'worker token'} for {args.name}: {key}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from service.router.offline.fit import fit_main

    return fit_main(args)


def _eval(args: argparse.Namespace) -> int:
    from service.router.offline.eval_cli import eval_main

    return eval_main(args)


def _add_model(args: argparse.Namespace) -> int:
    from service.router.offline.add_model import add_model_main

    return add_model_main(args)


def _local_model_sha256() -> str:
    """The sha256 of the model the router would load here (``LLMROUTER_MODEL_DIR``, else the package's)."""
    from service.router.model_card import default_model_dir, model_sha256
    from service.router.weights import WeightsError

    try:
        folder = RouterSettings.from_env().model_dir or default_model_dir()
    except ValueError as exc:  # an LLMROUTER_* variable that does not parse
        raise WeightsError(str(exc)) from None
    try:
        return model_sha256(folder)
    except (OSError, ValueError, KeyError) as exc:  # no weights file, or an export's info that is not one
        raise WeightsError(f"cannot read the model in {folder}: {exc}") from None


def _inspect_weights(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from service.router.model_card import EMBEDDING_DIM, MODEL_ID
    from service.router.weights import WeightsError, check_embedder, default_weights_path, load_weights

    path = Path(args.path) if args.path else default_weights_path()
    try:
        weights = load_weights(path)
        # what the router refuses at load: another embedder, or another file of this one (where the model is here)
        if weights.dim != EMBEDDING_DIM or weights.embedder_id != MODEL_ID:
            raise WeightsError(
                f"{path}: fitted with {weights.embedder_id} ({weights.dim}-d); the router embeds with {MODEL_ID} "
                f"({EMBEDDING_DIM}-d)"
            )
        check_embedder(weights, MODEL_ID, _local_model_sha256(), source=str(path))
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
