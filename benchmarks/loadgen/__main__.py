"""Load generator: ``python -m benchmarks.loadgen --url URL --bodies FILE (--concurrency N | --rate R) ...``

Closed loop (``--concurrency``) or open loop with Poisson arrivals (``--rate``), ``--warmup`` s unrecorded then
``--duration`` s recorded, in ``--processes`` client processes whose HDR histograms and counts are merged. Bodies
are JSON documents, one a line; process k of P sends lines k, k+P, ... in turn. Writes one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.loadgen.fanout import read_bodies, run_all
from benchmarks.loadgen.stats import ProcessResult, merge, summarize

CLIENTS = ("http1", "aiohttp")
# The lean client speaks plain HTTP only; aiohttp also does TLS.
URL_SCHEMES = {"http1": ("http",), "aiohttp": ("http", "https")}
DEFAULT_OPEN_CONNECTIONS = 256
DEFAULT_DRAIN_S = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="http://host:port/path to POST to")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bodies", type=Path, help="file of JSON bodies, one a line")
    source.add_argument("--body", help="one JSON body sent every time")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    parser.add_argument("--connections", type=int, default=DEFAULT_OPEN_CONNECTIONS, help="open loop: pool size")
    parser.add_argument("--duration", type=float, default=10.0, help="recorded seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds first")
    parser.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_S, help="seconds to wait for stragglers")
    parser.add_argument("--processes", type=int, default=1, help="client processes (their results are merged)")
    parser.add_argument("--client", choices=CLIENTS, default="http1")
    parser.add_argument("--seed", type=int, default=0, help="seeds the arrival times")
    parser.add_argument("--label", default="", help="copied into the output")
    parser.add_argument(
        "--start-at",
        type=float,
        help="time.time() at which the warm-up starts, so that another process can sample the recorded window "
        "(default: as soon as the client processes are ready)",
    )
    parser.add_argument("--out", type=Path, help="JSON output path (default: stdout)")
    args = parser.parse_args(argv)
    if args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be > 0")
    if args.processes < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--processes >= 1, --duration > 0, --warmup >= 0")
    if args.start_at is not None and not args.start_at > 0:
        parser.error("--start-at must be a time.time() value")
    if args.concurrency is not None and args.concurrency < args.processes:
        parser.error("--concurrency must be at least --processes")
    if problem := _url_problem(args.url, args.client) or _bodies_problem(args):
        parser.error(problem)
    return args


def _url_problem(url: str, client: str) -> str | None:
    parts = urlsplit(url)
    schemes = URL_SCHEMES[client]
    if parts.scheme not in schemes or not parts.hostname:
        return f"--url {url}: the {client} client needs {' or '.join(s + '://host' for s in schemes)}[:port]/path"
    return None


def _bodies_problem(args: argparse.Namespace) -> str | None:
    """Why the bodies cannot be used (missing file, not JSON), checked before any process starts."""
    if args.body is not None:
        first, where = args.body, "--body"
    else:
        try:
            lines = [line for line in args.bodies.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            return f"--bodies {args.bodies}: {exc}"
        if not lines:
            return f"--bodies {args.bodies}: no bodies in the file"
        first, where = lines[0], f"--bodies {args.bodies} (first line)"
    try:
        json.loads(first)
    except ValueError as exc:
        return f"{where} is not JSON: {exc}"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    bodies = read_bodies(args)
    parts = run_all(args)
    merged = merge([ProcessResult.from_dict(p) for p in parts])
    summary = summarize(merged, args.duration)
    return {
        "label": args.label,
        "config": {
            "url": args.url,
            "mode": "closed" if args.concurrency is not None else "open",
            "concurrency": args.concurrency,
            "rate": args.rate,
            "connections": args.connections if args.rate is not None else args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "drain_timeout_s": args.drain_timeout,
            "processes": args.processes,
            "client": args.client,
            "seed": args.seed,
            "bodies": len(bodies),
        },
        "result": summary,
        "per_process": [{k: v for k, v in p.items() if not k.endswith("_hdr")} for p in parts],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    text = json.dumps(out, indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
