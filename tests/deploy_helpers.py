"""Readers for the deploy/ artifacts: Dockerfile instructions, PromQL selectors, the metrics both services really
export (collected from the real app objects in process), and nginx rendered onto local ports."""

from __future__ import annotations

import json
import re
import shlex
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from service.config import DispatcherSettings, RouterSettings
from service.dispatch.app import DispatcherService
from service.dispatch.endpoints import EndpointRegistry, EndpointSpec, hash_key
from service.dispatch.records import STATUS_KEYS
from service.dispatch.signing import Signer
from service.errors import ServiceError
from service.router.app import RouterService
from service.router.weights import save_weights
from tests.fakes import FakeEmbedder, toy_weights

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
READY_TIMEOUT_S = 10.0  # a guard against a hang, not a speed claim

# Labels Prometheus itself attaches to every scraped series (target labels), besides what the services export.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container", "endpoint"})


# -- Dockerfiles -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON array of CMD/ENTRYPOINT/HEALTHCHECK ... CMD, or the shell words of a shell-form line."""
        text = self.args.split(" CMD ", 1)[1] if self.keyword == "HEALTHCHECK" else self.args
        text = text.strip()
        if text.startswith("["):
            parsed: list[str] = json.loads(text)
            return parsed
        return shlex.split(text)


def dockerfile_stages(path: Path) -> list[list[Instruction]]:
    """Instructions per build stage (continuation lines joined, comments dropped); ARGs before FROM form stage 0."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[Instruction]] = [[]]
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


def env_of(stage: list[Instruction]) -> dict[str, str]:
    """ENV KEY=VALUE pairs of a stage (the key=value form only, which these Dockerfiles use)."""
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def args_of(stages: list[list[Instruction]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for stage in stages:
        for ins in stage:
            if ins.keyword == "ARG" and "=" in ins.args:
                key, _, value = ins.args.partition("=")
                found[key] = value
    return found


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = _glob_regex(body.strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


# -- Kubernetes ----------------------------------------------------------------------------------------------------
def k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs.extend(doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if doc)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


# -- PromQL --------------------------------------------------------------------------------------------------------
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                       "group_right", "inf", "nan"})  # fmt: skip
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:])\s*(\()?")


@dataclass
class ParsedQuery:
    metrics: list[str] = field(default_factory=list)
    matchers: list[tuple[str, str, str, str]] = field(default_factory=list)  # (metric, label, op, value)
    grouping_labels: set[str] = field(default_factory=set)


def parse_promql(expr: str) -> ParsedQuery:
    """Metric names, label matchers and grouping labels of a query, by tokens (enough for these files)."""
    query = ParsedQuery()
    text = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors and subqueries, $__rate_interval included
    for labels in _GROUPING.findall(text):
        query.grouping_labels.update(name.strip() for name in labels.split(",") if name.strip())
    text = _GROUPING.sub(" ", text)
    for metric, body in _SELECTOR.findall(text):
        if metric:
            query.metrics.append(metric)
        for label, op, value in _MATCHER.findall(body):
            if label == "__name__":
                query.metrics.append(value)
            query.matchers.append((metric, label, op, value))
    text = _SELECTOR.sub(lambda m: " " if m.group(1) else "", text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)
    for name, call in _IDENT.findall(text):
        if not call and name.lower() not in _KEYWORDS:
            query.metrics.append(name)
    return query


# -- what the services export --------------------------------------------------------------------------------------
@dataclass
class Exported:
    """Sample names with their label names, and the label values seen, from both services' /metrics."""

    labels: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    values: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def add_text(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.labels[sample.name].update(sample.labels)
                for label, value in sample.labels.items():
                    self.values[label].add(value)


def exported_metrics(tmp_path: Path) -> Exported:
    exported = Exported()
    exported.add_text(_exercised_router_metrics(tmp_path))
    exported.add_text(_exercised_dispatcher_metrics())
    exported.values["code"].update(_error_codes(ServiceError))  # every code the error tree can produce
    exported.values["state"].update(STATUS_KEYS)
    return exported


def _error_codes(cls: type[ServiceError]) -> Iterator[str]:
    yield cls.code
    for sub in cls.__subclasses__():
        yield from _error_codes(sub)


def wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def router_service(tmp_path: Path) -> RouterService:
    weights = tmp_path / "toy.safetensors"
    save_weights(toy_weights(), weights)
    settings = RouterSettings.from_env({}, weights=weights, compute_threads=1)
    return RouterService(settings, embedder_factory=FakeEmbedder)


def _exercised_router_metrics(tmp_path: Path) -> str:
    """Every labelled router series gets a value: a route, a 400, a 404, a good and a rejected reload."""
    with TestClient(router_service(tmp_path).asgi) as client:
        wait_until(lambda: client.get("/health").status_code == 200, "router ready")
        assert client.post("/v1/route", json={"prompt": "c3 hello"}).status_code == 200
        assert client.post("/v1/route", json={"cost_weight": 1}).status_code == 400
        assert client.get("/nope").status_code == 404
        assert client.post("/admin/reload", json={}).status_code == 200
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not weights")
        assert client.post("/admin/reload", json={"path": str(bad)}).status_code == 400
        return client.get("/metrics").text


EXAMPLE_ENDPOINT, EXAMPLE_API_KEY, EXAMPLE_WORKER_TOKEN = "pool", "dk_deploy-test", "wt_deploy-test"
EXAMPLE_MAX_OPEN = 2  # reached below, for the too_many_open_requests outcome


def dispatcher_service() -> DispatcherService:
    spec = EndpointSpec(
        EXAMPLE_ENDPOINT,
        api_key_sha256=(hash_key(EXAMPLE_API_KEY),),
        worker_token_sha256=(hash_key(EXAMPLE_WORKER_TOKEN),),
    )
    return DispatcherService(
        DispatcherSettings(autoscale_interval_s=0.02, max_open_requests=EXAMPLE_MAX_OPEN),
        registry=EndpointRegistry({EXAMPLE_ENDPOINT: spec}),
        signer=Signer.generate(),
    )


def _exercised_dispatcher_metrics() -> str:
    """Every route outcome, a worker report, releases with both results, and the per-endpoint gauges."""
    worker = {"authorization": f"Bearer {EXAMPLE_WORKER_TOKEN}"}
    route = {"endpoint": EXAMPLE_ENDPOINT, "api_key": EXAMPLE_API_KEY, "cost": 1.0}
    with TestClient(dispatcher_service().asgi) as client:
        assert "request_idx" in client.post("/route/", json=route).json()  # no worker yet
        report = {"endpoint": EXAMPLE_ENDPOINT, "id": "w1", "url": "http://w1:1", "state": "ready", "max_perf": 10.0}
        assert client.post("/worker_status/", json=report, headers=worker).status_code == 200
        first = client.post("/route/", json=route).json()
        other = {**report, "id": "w2", "url": "http://w2:1"}  # where the retry goes: never back to w1 at once
        assert client.post("/worker_status/", json=other, headers=worker).status_code == 200
        second = client.post("/route/", json={**route, "request_idx": first["request_idx"]}).json()
        assert client.post("/route/", json={**route, "request_idx": 999_999}).status_code == 400
        for idx, success in ((first["request_idx"], True), (second["request_idx"] + 1, False)):
            done = {"endpoint": EXAMPLE_ENDPOINT, "request_idxs": [idx], "success": success}
            assert client.post("/delete_requests/", json=done, headers=worker).status_code == 200
        assert client.post("/route/", json=route).status_code == 200  # open: the first, still waiting, and this
        assert client.post("/route/", json=route).status_code == 429
        ready_line = f'dispatcher_workers{{endpoint="{EXAMPLE_ENDPOINT}",state="ready"}} 2.0'
        wait_until(lambda: ready_line in client.get("/metrics").text, "worker gauges refreshed")
        return client.get("/metrics").text
