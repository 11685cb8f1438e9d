"""A real Prometheus scrapes a real router and a real dispatcher after known traffic; its API must show every
metric of ``service/metrics.py`` with the right type, label names, label values and counts."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.dispatch.records import STATUS_KEYS
from tests.e2e.conftest import Server, start_server
from tests.e2e.test_dispatcher_http import ENDPOINT, Deployment
from tests.ops.conftest import Record
from tests.ops.prometheus import Prometheus

pytestmark = pytest.mark.ops

SCRAPE_WAIT_S = 60.0
BASE_LABELS = {"__name__", "job", "instance"}
# name (family) -> (type, label names), as service/metrics.py declares them
ROUTER_METRICS: dict[str, tuple[str, set[str]]] = {
    "router_http_requests": ("counter", {"route", "method", "status"}),
    "router_http_request_duration_seconds": ("histogram", {"route"}),
    "router_http_requests_in_flight": ("gauge", set()),
    "router_errors": ("counter", {"code"}),
    "router_queue_wait_seconds": ("histogram", set()),
    "router_embedding_duration_seconds": ("histogram", set()),
    "router_tokenize_duration_seconds": ("histogram", set()),
    "router_routing_duration_seconds": ("histogram", set()),
    "router_batch_size": ("histogram", set()),
    "router_batch_tokens": ("histogram", set()),
    "router_queue_depth": ("gauge", set()),
    "router_admitted_prompts": ("gauge", set()),
    "router_dropped_prompts": ("counter", set()),
    "router_cache_hits": ("counter", set()),
    "router_cache_misses": ("counter", set()),
    "router_singleflight_joins": ("counter", set()),
    "router_selections": ("counter", {"model"}),
    "router_cluster_requests": ("counter", {"cluster"}),
    "router_ready": ("gauge", set()),
    "router_weights_info": ("gauge", {"version", "models", "clusters"}),
    "router_weights_reloads": ("counter", {"result"}),
}
DISPATCHER_METRICS: dict[str, tuple[str, set[str]]] = {
    "dispatcher_http_requests": ("counter", {"route", "method", "status"}),
    "dispatcher_http_request_duration_seconds": ("histogram", {"route"}),
    "dispatcher_errors": ("counter", {"code"}),
    "dispatcher_routes": ("counter", {"endpoint", "outcome"}),
    "dispatcher_pick_duration_seconds": ("histogram", set()),
    "dispatcher_signature_batch_size": ("histogram", set()),
    "dispatcher_worker_reports": ("counter", {"endpoint"}),
    "dispatcher_released_requests": ("counter", {"endpoint", "success"}),
    "dispatcher_workers": ("gauge", {"endpoint", "state"}),
    "dispatcher_outstanding_load": ("gauge", {"endpoint"}),
    "dispatcher_load_rate": ("gauge", {"endpoint"}),
    "dispatcher_waiting_requests": ("gauge", {"endpoint"}),
    "dispatcher_wanted_workers": ("gauge", {"endpoint"}),
    "dispatcher_wanted_cold_workers": ("gauge", {"endpoint"}),
    "dispatcher_store_up": ("gauge", set()),
    "dispatcher_ready": ("gauge", set()),
}
ROUTED_PROMPTS = 12
REPEATED_PROMPTS = 3  # cache hits
ASSIGNED, RELEASED, COST = 5, 2, 7.0


def test_prometheus_scrapes_both_services_with_the_declared_types_and_labels(
    tmp_path: Path, deployment: Deployment, record: Record
) -> None:
    router = start_server(tmp_path, "--cache-size", "1000")
    dispatcher = deployment.dispatcher("--autoscale-interval-s", "0.5")
    prometheus: Prometheus | None = None
    try:
        _router_traffic(router)
        _dispatcher_traffic(dispatcher, deployment)
        _promtool_lints_clean(router, dispatcher)
        prometheus = Prometheus(tmp_path, {"router": router.url, "dispatcher": dispatcher.url})
        started = time.monotonic()
        _wait_for(lambda: _targets_up(prometheus) == {"router", "dispatcher"}, "both targets up")
        # the counts Prometheus stored are the traffic sent (a second scrape may be needed for the last gauges)
        routed = ROUTED_PROMPTS + REPEATED_PROMPTS
        _wait_for(lambda: _value(prometheus, "sum(router_selections_total)") == routed, "router traffic")
        _wait_for(
            lambda: (
                _value(prometheus, f'dispatcher_outstanding_load{{endpoint="{ENDPOINT}"}}')
                == (ASSIGNED - RELEASED) * COST
            ),
            "dispatcher gauges",
        )
        scraped_after_s = time.monotonic() - started

        router_series = _check_family_types_and_labels(prometheus, "router", ROUTER_METRICS)
        dispatcher_series = _check_family_types_and_labels(prometheus, "dispatcher", DISPATCHER_METRICS)

        assert _value(prometheus, 'router_http_requests_total{route="/v1/route",method="POST",status="200"}') == routed
        assert _value(prometheus, 'router_http_requests_total{route="/v1/route",method="POST",status="400"}') == 1
        assert _value(prometheus, 'router_errors_total{code="invalid_request"}') == 1
        assert _value(prometheus, "router_cache_hits_total") == REPEATED_PROMPTS
        assert _value(prometheus, "sum(router_cluster_requests_total)") == routed
        assert _value(prometheus, "router_batch_size_count") >= 1
        assert _value(prometheus, "router_ready") == 1
        assert _value(prometheus, "router_weights_info") == 1
        assert _value(prometheus, 'router_weights_reloads_total{result="ok"}') == 1
        routes = _label_values(router_series["router_http_requests_total"], "route")
        assert routes <= {"/v1/route", "/health", "/livez", "/metrics", "/openapi.json", "/admin/reload", "other"}
        assert "other" in routes  # the unknown path is one bounded label value, not its own
        assert len(_label_values(router_series["router_selections_total"], "model")) >= 1

        outcome = f'dispatcher_routes_total{{endpoint="{ENDPOINT}",outcome="assigned"}}'
        assert _value(prometheus, outcome) == ASSIGNED
        assert _value(prometheus, f'dispatcher_released_requests_total{{endpoint="{ENDPOINT}",success="true"}}') == (
            RELEASED
        )
        assert _value(prometheus, 'dispatcher_errors_total{code="unauthorized"}') == 1
        assert _value(prometheus, f'dispatcher_workers{{endpoint="{ENDPOINT}",state="ready"}}') == 1
        assert _value(prometheus, f'sum(dispatcher_workers{{endpoint="{ENDPOINT}"}})') == 1
        assert _label_values(dispatcher_series["dispatcher_workers"], "state") == set(STATUS_KEYS)
        assert _label_values(dispatcher_series["dispatcher_workers"], "endpoint") == {ENDPOINT}
        assert _value(prometheus, "dispatcher_store_up") == 1
        assert _value(prometheus, "dispatcher_ready") == 1
        record(
            scrape_interval_s=1.0,
            seconds_until_counts_matched=round(scraped_after_s, 1),
            router_families_checked=len(ROUTER_METRICS),
            dispatcher_families_checked=len(DISPATCHER_METRICS),
            router_series=sum(len(s) for s in router_series.values()),
            dispatcher_series=sum(len(s) for s in dispatcher_series.values()),
        )
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert router.stop() == 0, router.log()
        assert dispatcher.stop() == 0, dispatcher.log()


def _router_traffic(router: Server) -> None:
    with httpx.Client(base_url=router.url, timeout=60) as http:
        for i in range(ROUTED_PROMPTS):
            assert http.post("/v1/route", json={"prompt": f"metrics test prompt number {i}"}).status_code == 200
        for i in range(REPEATED_PROMPTS):
            assert http.post("/v1/route", json={"prompt": f"metrics test prompt number {i}"}).json()["cache_hit"]
        assert http.post("/v1/route", json={"cost_weight": 1}).status_code == 400
        assert http.get("/no/such/path").status_code == 404
        assert http.post("/admin/reload").status_code == 200  # the configured file again: a reload result


def _dispatcher_traffic(dispatcher: Server, deployment: Deployment) -> None:
    worker = {"authorization": f"Bearer {deployment.worker_token}"}
    client = {"authorization": f"Bearer {deployment.api_key}"}
    with httpx.Client(base_url=dispatcher.url, timeout=30) as http:
        report = {"endpoint": ENDPOINT, "id": "w0", "url": "http://10.0.0.1:8000", "state": "ready", "max_perf": 1e6}
        assert http.post("/worker_status/", json=report, headers=worker).status_code == 200
        idxs = []
        for _ in range(ASSIGNED):
            answer = http.post("/route/", json={"endpoint": ENDPOINT, "cost": COST}, headers=client)
            assert answer.status_code == 200 and "url" in answer.json(), answer.text
            idxs.append(answer.json()["request_idx"])
        release = {"endpoint": ENDPOINT, "request_idxs": idxs[:RELEASED], "success": True}
        assert http.post("/delete_requests/", json=release, headers=worker).json()["released"] == RELEASED
        wrong = http.post("/route/", json={"endpoint": ENDPOINT, "cost": 1, "api_key": "dk_wrong"})
        assert wrong.status_code == 401


def _promtool_lints_clean(*servers: Server) -> None:
    """``promtool check metrics``: Prometheus' own naming and exposition lint, on what each service exports."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH: apt-get install prometheus (CI does)"
    for server in servers:
        text = httpx.get(f"{server.url}/metrics").text
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not done.stdout.strip(), (server.url, done.stdout, done.stderr)


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _targets_up(prometheus: Prometheus) -> set[str]:
    targets = prometheus.api("targets")["activeTargets"]
    return {t["labels"]["job"] for t in targets if t["health"] == "up"}


def _value(prometheus: Prometheus, expression: str) -> float | None:
    result = prometheus.query(expression)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def _label_values(series: list[dict[str, str]], label: str) -> set[str]:
    return {s[label] for s in series}


def _check_family_types_and_labels(
    prometheus: Prometheus, job: str, expected: dict[str, tuple[str, set[str]]]
) -> dict[str, list[dict[str, str]]]:
    """Types from /api/v1/metadata, label names from /api/v1/series; returns the job's series by name."""
    metadata = prometheus.api("metadata")
    by_name: dict[str, list[dict[str, str]]] = defaultdict(list)
    for labels in prometheus.api("series", **{"match[]": f'{{job="{job}"}}'}):
        by_name[labels["__name__"]].append(labels)
    for family, (kind, label_names) in expected.items():
        # OpenMetrics scrapes name a counter's family without _total; the text format with it
        entries = metadata.get(family) or metadata.get(f"{family}_total")
        assert entries, f"{family}: no metadata"
        assert {e["type"] for e in entries} == {kind}, (family, entries)
        if kind == "counter":
            samples = {f"{family}_total": label_names}
        elif kind == "histogram":
            samples = {f"{family}_bucket": label_names | {"le"}, f"{family}_sum": label_names,
                       f"{family}_count": label_names}  # fmt: skip
        else:
            samples = {family: label_names}
        for name, names in samples.items():
            assert by_name.get(name), f"{name}: no series scraped from {job}"
            for labels in by_name[name]:
                assert set(labels) - BASE_LABELS == names, (name, labels)
    return dict(by_name)
