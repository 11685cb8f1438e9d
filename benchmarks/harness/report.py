"""The markdown report of one harness run (the JSON has everything; this is what a reader looks at first)."""

from __future__ import annotations

from typing import Any

from benchmarks.common import cpu_detail
from benchmarks.harness.scenarios import DESCRIPTIONS
from benchmarks.harness.sweep import point_label
from benchmarks.harness.systems import BARE, ROUTER


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


# Below this many 2xx answers a point's p99.9 is its slowest answer or near it, not a percentile: marked so
P999_MIN_SAMPLES = 1000
FEW_SAMPLES_MARK = "*"


def _latency(point: dict[str, Any]) -> str:
    lat = point["latency_ms"]
    if not lat:
        return "-"
    few = point.get("ok", P999_MIN_SAMPLES) < P999_MIN_SAMPLES
    return " / ".join(f"{lat[q]:.2f}" for q in ("p50", "p90", "p99")) + (
        f" / {lat['p99.9']:.2f}{FEW_SAMPLES_MARK if few else ''}"
    )


def _failed(point: dict[str, Any]) -> str:
    if not point["failed"]:
        return "0"
    parts = [f"{code}: {n}" for code, n in point["status"].items() if not code.startswith("2")]
    parts += [f"{kind}: {n}" for kind, n in point["errors"].items()]
    if point["unfinished"]:
        parts.append(f"unfinished: {point['unfinished']}")
    return f"{point['failed']} ({', '.join(parts)})"


def _one_line(text: str) -> str:
    """A multi-line message (a load generator's stderr) as one list item: a line break would end the item."""
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())


def _cores(point: dict[str, Any]) -> tuple[str, str]:
    cpu = point.get("cpu") or {}
    servers = cpu.get("process_cores") or {}
    server_text = " + ".join(f"{v:.2f}" for v in servers.values()) or "n/a"
    foreign = cpu.get("foreign_cores")
    return server_text, "n/a" if foreign is None else f"{foreign:.2f}"


def router_encoder_line(run: dict[str, Any]) -> list[str]:
    """The router's encoder as its /health reported it (the default dtype depends on the CPU); none in older runs."""
    encoder = (run.get("servers") or {}).get(ROUTER, {}).get("encoder")
    if not encoder:
        return []
    return ["- Router encoder (its `/health`): " + ", ".join(f"{k} `{v}`" for k, v in encoder.items())]


def render(run: dict[str, Any]) -> str:
    m, cfg = run["machine"], run["config"]
    lines = [
        f"# Benchmark `{cfg['scenario_set']}` on {run['machine_label']} ({m['date']})",
        "",
        f"- Machine: `{m['hostname']}`, {m['cpu_model']}{cpu_detail(m)}, {m['cpu_count']} cores; python {m['python']}, "
        f"torch {m['torch']}, sentence-transformers {m['sentence_transformers']}",
        f"- Commit: `{m['git_commit'] or 'n/a'}`",
        *router_encoder_line(run),
        f"- Each point: {cfg['warmup_s']:g} s warm-up + {cfg['duration_s']:g} s recorded; closed loop at c = "
        f"{', '.join(map(str, cfg['concurrencies']))}; open loop (Poisson) at "
        + (
            f"{', '.join(f'{r:g}' for r in cfg['rates'])} req/s"
            if cfg["rates"]
            else f"{', '.join(f'{f:g}' for f in cfg['rate_fractions'])} x the best closed-loop ok req/s"
        )
        + f"; load generator: {cfg['processes']} process(es), `{cfg['client']}` client",
        "- Latency: from the scheduled send time (open loop) or the send (closed loop) to the whole answer, of 2xx "
        "answers only (a point with failures fails its latency target); HDR histograms, ms. ok req/s: 2xx answers "
        "that arrived inside the recorded window",
        "",
        "## Targets",
        "",
        "| check | value | target | verdict | how |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for t in run["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.4g}"
        lines.append(f"| {t['check']} | {value} | {t['target']} | **{_verdict(t['pass'])}** | {t['detail']} |")
    lines += ["", f"Overall: **{_verdict(run['pass'])}**", ""]

    ceilings = run.get("ceiling_rounds") or {}
    for scenario, interleaved in ceilings.items():
        c = interleaved["concurrency"]
        lines += [
            f"## HTTP ceiling, {scenario}: interleaved rounds (router c={c[ROUTER]}, bare c={c[BARE]})",
            "",
            "| round | order | bare ok req/s | router ok req/s | ratio | other procs cores (bare / router) |",
            "| ---: | --- | ---: | ---: | ---: | --- |",
        ]
        for row in interleaved["rounds"]:
            ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.4f}"
            foreign = " / ".join("n/a" if row[n]["foreign_cores"] is None else f"{row[n]['foreign_cores']:.2f}"
                                 for n in (BARE, ROUTER))  # fmt: skip
            lines.append(
                f"| {row['round']} | {', '.join(row['order'])} | {row[BARE]['ok_rps']:.1f} "
                f"| {row[ROUTER]['ok_rps']:.1f} | {ratio} | {foreign} |"
            )
        lines.append("")

    offline = run.get("offline")
    if offline:
        lines += [
            "## sentence-transformers offline encode (servers stopped)",
            "",
            f"{offline['prompts_per_s']:.1f} prompts/s: {offline['prompts']} unique prompts, batch_size "
            f"{offline['batch_size']}, {offline['torch_threads']} torch threads, {offline['seconds']:.2f} s",
            "",
        ]

    lines += ["## Results", ""]
    for key, result in run["results"].items():
        lines += [
            f"### {key}: max {result['max_ok_rps']:.1f} ok req/s",
            "",
            DESCRIPTIONS.get(result["scenario"], ""),
            "",
            "| point | offered req/s | ok req/s | 2xx p50 / p90 / p99 / p99.9 ms | failed | server cores "
            "| client cores | other procs cores |",
            "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |",
        ]
        for p in result["points"]:
            offered = "-" if p["offered_rps"] is None else f"{p['offered_rps']:.1f}"
            server, foreign = _cores(p)
            lines.append(
                f"| {point_label(p)} | {offered} | {p['ok_rps']:.1f} | {_latency(p)} | {_failed(p)} | {server} "
                f"| {p['client_cpu_cores']:.2f} | {foreign} |"
            )
        if any(p["latency_ms"] and p.get("ok", P999_MIN_SAMPLES) < P999_MIN_SAMPLES for p in result["points"]):
            lines += ["", f"{FEW_SAMPLES_MARK} p99.9 of fewer than {P999_MIN_SAMPLES:,} answers: about their slowest"]
        lines.append("")

    if run["skipped"]:
        lines += ["## Not run", ""] + [f"- `{name}`: {why}" for name, why in run["skipped"].items()] + [""]
    if run["errors"]:
        lines += ["## Errors", ""] + [f"- `{name}`: {_one_line(why)}" for name, why in run["errors"].items()] + [""]
    if run["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in run["warnings"]] + [""]
    if run.get("plot"):
        lines += ["## Throughput against latency", "", f"![throughput against latency]({run['plot']})", ""]
    return "\n".join(lines)
