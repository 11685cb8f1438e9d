"""The HTTP layer over the ASGI app (Starlette TestClient, lifespan included), with a fake embedder."""

from __future__ import annotations

import functools
import gc
import logging
import multiprocessing
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from openapi_spec_validator import validate
from starlette.testclient import TestClient

from service.config import RouterSettings
from service.http.server import Fleet
from service.router.app import RouterService, _is_loopback
from service.router.weights import save_weights
from tests.fakes import DIM, FakeEmbedder, toy_weights
from tests.openapi_check import assert_answers_as_documented

READY_TIMEOUT_S = 10.0


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    path = tmp_path / "toy.safetensors"
    save_weights(toy_weights(), path)
    return path


def make_service(
    weights: Path, factory: Callable[[], FakeEmbedder] = FakeEmbedder, **overrides: object
) -> RouterService:
    settings = RouterSettings.from_env({}, weights=weights, compute_threads=1, **overrides)
    return RouterService(settings, embedder_factory=factory)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.01)


@pytest.fixture
def client(weights_file: Path) -> Iterator[TestClient]:
    with TestClient(make_service(weights_file).asgi) as c:
        wait_ready(c)
        yield c


def test_route_answer_has_every_field(client: TestClient) -> None:
    r = client.post("/v1/route", json={"prompt": "c3 hello", "cost_weight": 0.0})
    assert r.status_code == 200
    body = r.json()
    assert body["selected_model"] == "big"
    assert body["cluster_id"] == 3
    assert body["expected_error"] == pytest.approx(0.1)
    assert body["cost_adjusted_score"] == pytest.approx(0.1)
    assert body["all_scores"] == pytest.approx({"big": 0.1, "cheap": 0.6, "mid": 0.3})
    assert body["cache_hit"] is False
    assert set(body["usage"]) >= {"routing_ms", "embedding_ms"}
    assert r.headers["content-type"] == "application/json"


def test_models_lists_what_available_models_takes_with_costs_and_errors(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    health = client.get("/health").json()
    assert (body["object"], body["clusters"]) == ("list", DIM)
    assert (body["weights_version"], body["default_cost_weight"]) == (health["weights_version"], 0.1)
    listed = {m["id"]: m for m in body["data"]}
    assert list(listed) == ["big", "cheap", "mid"] and {m["object"] for m in body["data"]} == {"model"}
    assert listed["cheap"]["cost_per_1k"] == pytest.approx(0.01)
    # error 0.6 on every cluster but cluster 0 (0.2): min, mean over the clusters, max
    assert listed["cheap"]["expected_error"] == pytest.approx({"min": 0.2, "mean": (0.2 + 0.6 * (DIM - 1)) / DIM,
                                                               "max": 0.6})  # fmt: skip
    assert "price_usd_per_1k" not in listed["cheap"]  # the toy weights record no list prices
    for name in listed:  # every listed name is one the route takes
        assert client.post("/v1/route", json={"prompt": "x", "available_models": [name]}).status_code == 200


def test_health_when_ready(client: TestClient) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["device"] == "cpu"
    assert (body["models"], body["clusters"]) == (3, DIM)
    assert body["weights_version"] == toy_weights().version
    assert body["encoder"] == {"dtype": "float32", "fake": True}  # the embedder's own runtime_info
    assert body["index"] == "faiss-cpu"
    assert gc.get_freeze_count() > 0  # once loaded, start-up's objects are out of the collector's sight


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("post", "/v1/route", {"content": b"{nope"}, 400, "invalid_request"),
        ("post", "/v1/route", {"json": {"cost_weight": 1}}, 400, "invalid_request"),
        ("post", "/v1/route", {"json": {"prompt": "x", "available_models": ["zzz"]}}, 400, "invalid_request"),
        ("post", "/v1/route", {"json": {"embedding": [0.1] * 5}}, 400, "invalid_request"),
        # MiniLM's width, not the embedder's (these toy weights are 8-d): a faiss assertion made it a 500
        ("post", "/v1/route", {"json": {"embedding": [0.1] * 384}}, 400, "invalid_request"),
        ("post", "/v1/route", {"content": b"prompt=x", "headers": {"content-type": "text/plain"}}, 415,
         "invalid_request"),
        ("get", "/v1/route", {}, 405, "method_not_allowed"),
        ("get", "/no/such/path", {}, 404, "not_found"),
    ],
)  # fmt: skip
def test_client_errors_are_json(
    client: TestClient, method: str, path: str, kwargs: dict[str, object], status: int, code: str
) -> None:
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    if status == 405:
        assert r.headers["allow"] == "POST"  # RFC 9110: a 405 lists the methods that work


def test_unknown_models_are_named(client: TestClient) -> None:
    r = client.post("/v1/route", json={"prompt": "x", "available_models": ["big", "zzz", "yyy"]})
    assert "'zzz'" in r.json()["error"]["message"] and "'yyy'" in r.json()["error"]["message"]


def test_body_over_the_limit_is_413(weights_file: Path) -> None:
    with TestClient(make_service(weights_file, max_body_bytes=100).asgi) as c:
        wait_ready(c)
        r = c.post("/v1/route", json={"prompt": "x" * 200})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "invalid_request"


def test_not_ready_while_loading(weights_file: Path) -> None:
    release = threading.Event()

    def slow_factory() -> FakeEmbedder:
        release.wait(READY_TIMEOUT_S)
        return FakeEmbedder()

    with TestClient(make_service(weights_file, slow_factory).asgi) as c:
        r = c.post("/v1/route", json={"prompt": "x"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "router_not_ready"
        assert r.headers["retry-after"] == "1"
        health = c.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "loading")
        livez = c.get("/livez")  # loading is alive: an orchestrator must not restart it
        assert (livez.status_code, livez.json()) == (200, {"status": "alive"})
        models = c.get("/v1/models")
        assert (models.status_code, models.json()["error"]["code"]) == (503, "router_not_ready")
        release.set()
        wait_ready(c)
        assert c.post("/v1/route", json={"prompt": "x"}).status_code == 200


class GatedWarmUp(FakeEmbedder):
    """Its embeddings (the warm-up, once the weights file was read) say so in ``entered`` and wait for ``gate``."""

    def __init__(self, entered: threading.Event, gate: threading.Event) -> None:
        super().__init__()
        self.entered, self.gate = entered, gate

    def embed_ids(self, sequences: Sequence[Sequence[int]], *, cpu_threads: int | None = None) -> np.ndarray:
        self.entered.set()
        self.gate.wait(READY_TIMEOUT_S)
        return super().embed_ids(sequences, cpu_threads=cpu_threads)


def test_a_reload_signal_while_loading_is_applied_once_loaded(weights_file: Path) -> None:
    """It was dropped ("not loaded yet"): a worker that had read the old file served it for good while its siblings
    reloaded, and /admin/reload had answered 200."""
    entered, gate = threading.Event(), threading.Event()
    service = make_service(weights_file, functools.partial(GatedWarmUp, entered, gate))
    with TestClient(service.asgi) as c:
        assert entered.wait(READY_TIMEOUT_S)  # the old file is read; warming up
        newer = toy_weights(bump=0.01)
        save_weights(newer, weights_file)  # written over the file the loading thread may already have read
        c.portal.call(service.on_reload_signal)
        gate.set()
        wait_ready(c)
        assert c.get("/health").json()["weights_version"] == newer.version


def test_failed_load_reports_why(tmp_path: Path) -> None:
    with TestClient(make_service(tmp_path / "missing.safetensors").asgi) as c:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while c.get("/health").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        health = c.get("/health")
        assert health.status_code == 503
        assert "missing.safetensors" in health.json()["error"]
        r = c.post("/v1/route", json={"prompt": "x"})
        assert r.status_code == 503
        assert "failed to load" in r.json()["error"]["message"]
        livez = c.get("/livez")  # failed for good: restarting is the remedy
        assert (livez.status_code, livez.json()) == (503, {"status": "failed"})


def test_a_failed_load_in_one_of_several_worker_processes_drains_it_to_exit_1(tmp_path: Path) -> None:
    """Behind one port its siblings may have loaded: its failure showed only on the probes it took (/livez flipped
    between 200 and 503) and the supervisor, seeing no process exit, never stopped. It drains and exits 1 instead,
    which has the supervisor stop the others and exit 1 for a restart."""
    settings = RouterSettings.from_env({}, weights=tmp_path / "missing.safetensors", compute_threads=1)
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    service = RouterService(settings, embedder_factory=FakeEmbedder, fleet=Fleet(2, counter))
    with TestClient(service.asgi) as c:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while service.exit_code == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert c.get("/health").json()["status"] == "draining"
        c.portal.call(service.drained)  # the server's shutdown trigger fires at once: nothing was admitted
    assert service.exit_code == 1 and "missing.safetensors" in str(service.load_error)
    alone = RouterService(settings, embedder_factory=FakeEmbedder)  # one process: it stays up, /livez says failed
    with TestClient(alone.asgi) as c:
        while c.get("/health").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert alone.exit_code == 0


class FailingWarmUp(FakeEmbedder):
    def embed_ids(self, sequences: Sequence[Sequence[int]], *, cpu_threads: int | None = None) -> np.ndarray:
        raise RuntimeError("out of memory in warm-up")


def test_failed_warm_up_serves_nothing(weights_file: Path) -> None:
    """The weights were installed before the warm-up failed: /v1/models answered 200 for a router that never serves."""
    with TestClient(make_service(weights_file, FailingWarmUp).asgi) as c:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while c.get("/health").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "out of memory in warm-up" in c.get("/health").json()["error"]
        models = c.get("/v1/models")
        assert (models.status_code, models.json()["error"]["code"]) == (503, "router_not_ready")
        assert "failed to load" in models.json()["error"]["message"]


def test_draining_refuses_new_work(weights_file: Path) -> None:
    service = make_service(weights_file)
    with TestClient(service.asgi) as c:
        wait_ready(c)
        service.begin_drain()
        health = c.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "draining")
        assert c.get("/livez").status_code == 200  # draining: out of the balancer, not restarted
        r = c.post("/v1/route", json={"prompt": "x"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "shutting_down"
        assert "retry-after" in r.headers


def test_admin_reload_needs_the_token_and_validates(weights_file: Path, tmp_path: Path) -> None:
    with TestClient(make_service(weights_file, admin_token="s3cret").asgi) as c:
        wait_ready(c)
        new = tmp_path / "new.safetensors"
        save_weights(toy_weights(bump=0.05), new)
        assert c.post("/admin/reload", json={"path": str(new)}).status_code == 401
        wrong = c.post("/admin/reload", json={"path": str(new)}, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        auth = {"authorization": "Bearer s3cret"}
        ok = c.post("/admin/reload", json={"path": str(new)}, headers=auth)
        assert ok.status_code == 200, ok.text
        assert ok.json()["weights_version"] == toy_weights(bump=0.05).version
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"\x00" * 64)
        rejected = c.post("/admin/reload", json={"path": str(bad)}, headers=auth)
        assert rejected.status_code == 400
        assert "still serving" in rejected.json()["error"]["message"]
        assert c.get("/health").json()["weights_version"] == toy_weights(bump=0.05).version
        # no path: reload the configured file
        again = c.post("/admin/reload", headers=auth)
        assert again.json()["weights_version"] == toy_weights().version


def test_metrics_exposition(client: TestClient) -> None:
    client.post("/v1/route", json={"prompt": "c2 one"})
    client.post("/v1/route", json={"prompt": "c2 one"})
    client.post("/v1/route", json={"prompt": 1})
    text = client.get("/metrics").text
    for name in (
        'router_http_requests_total{method="POST",route="/v1/route",status="200"} 2.0',
        'router_http_requests_total{method="POST",route="/v1/route",status="400"} 1.0',
        "router_http_request_duration_seconds_bucket",
        "router_queue_wait_seconds_bucket",
        "router_embedding_duration_seconds_bucket",
        "router_routing_duration_seconds_bucket",
        "router_batch_size_bucket",
        "router_batch_tokens_bucket",
        "router_queue_depth",
        "router_cache_hits_total 1.0",
        "router_cache_misses_total 1.0",
        'router_cluster_requests_total{cluster="2"} 2.0',
        "router_selections_total{model=",
        'router_errors_total{code="invalid_request"} 1.0',
        "router_ready 1.0",
    ):
        assert name in text, name


def test_openapi_is_valid_and_lists_the_endpoints(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    validate(spec)
    assert set(spec["paths"]) == {
        "/v1/route", "/v1/models", "/health", "/livez", "/metrics", "/openapi.json", "/admin/reload",
    }  # fmt: skip
    required = spec["components"]["schemas"]["RouteResponse"]["required"]
    assert set(required) == {
        "selected_model", "cluster_id", "expected_error", "cost_adjusted_score", "all_scores", "cache_hit", "usage",
        "cost_weight", "clusters", "weights_version",
    }  # fmt: skip
    assert spec["components"]["schemas"]["RouteRequest"]["properties"]["prompt"]["maxLength"] == 32_768  # the default
    # /admin/reload reads its body as /v1/route does: the same body errors
    assert {"408", "413", "415"} <= set(spec["paths"]["/admin/reload"]["post"]["responses"])


def test_route_answers_are_as_the_openapi_document_says(client: TestClient) -> None:
    """Every key a route answer always carries is required in the document (cost_weight, clusters and their fields,
    weights_version and usage.queue_ms were not); 415 says that any JSON media type is read."""
    spec = client.get("/openapi.json").json()
    for _ in ("embedded", "cached"):
        assert_answers_as_documented(spec, "/v1/route", "post", client.post("/v1/route", json={"prompt": "c3 hi"}))
    assert_answers_as_documented(spec, "/v1/route", "post", client.post("/v1/route", content=b"{}"))  # 400
    plain = client.post("/v1/route", content=b"{}", headers={"content-type": "text/plain"})
    assert_answers_as_documented(spec, "/v1/route", "post", plain)
    assert "application/*+json" in spec["paths"]["/v1/route"]["post"]["responses"]["415"]["description"]
    suffixed = client.post("/v1/route", content=b'{"prompt": "hi"}', headers={"content-type": "application/x+json"})
    assert suffixed.status_code == 200, suffixed.text


def test_the_reload_security_is_documented_as_the_server_started(weights_file: Path) -> None:
    """With --admin-token, an anonymous reload is a 401: the document offered anonymous access ({}) beside the token
    whatever the setting. The document is cached per setting: one served without a token first must not leak."""
    with TestClient(make_service(weights_file).asgi) as client:
        wait_ready(client)
        open_spec = client.get("/openapi.json").json()
        open_reload = open_spec["paths"]["/admin/reload"]["post"]
        assert "security" not in open_reload and "401" not in open_reload["responses"]
        assert client.post("/admin/reload").status_code == 200
    with TestClient(make_service(weights_file, admin_token="s3cret").asgi) as client:
        wait_ready(client)
        spec = client.get("/openapi.json").json()
        validate(spec)
        reload = spec["paths"]["/admin/reload"]["post"]
        assert reload["security"] == [{"adminToken": []}]
        assert set(spec["components"]["securitySchemes"]) == {"adminToken"}
        anonymous = client.post("/admin/reload")
        assert anonymous.status_code == 401
        assert_answers_as_documented(spec, "/admin/reload", "post", anonymous)  # WWW-Authenticate: Bearer
        assert reload["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True


def test_the_openapi_prompt_limit_is_the_servers(weights_file: Path) -> None:
    with TestClient(make_service(weights_file, max_prompt_chars=500).asgi) as client:
        spec = client.get("/openapi.json").json()
        assert spec["components"]["schemas"]["RouteRequest"]["properties"]["prompt"]["maxLength"] == 500


def test_the_server_side_imports_no_torch_before_it_listens() -> None:
    """torch takes seconds to import; the router must listen and answer 503 meanwhile, so everything the CLI imports
    before binding (the app, its handlers, schemas, OpenAPI) stays free of it: the loading thread imports it."""
    probe = (
        "import sys, service.cli, service.router.app, service.http.server;"
        "print(','.join(m for m in ('torch', 'tokenizers', 'sentence_transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    ("host", "token", "warned"),
    [("0.0.0.0", None, True), ("10.1.2.3", None, True), ("router.internal", None, True),
     ("0.0.0.0", "s3cret", False), ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False)],
)  # fmt: skip
def test_open_admin_endpoints_on_a_reachable_address_are_warned_at_start(
    weights_file: Path, caplog: pytest.LogCaptureFixture, host: str, token: str | None, warned: bool
) -> None:
    service = make_service(weights_file, host=host, admin_token=token)
    with caplog.at_level(logging.WARNING, logger="service.router.app"), TestClient(service.asgi) as client:
        wait_ready(client)
    assert any("NO ADMIN TOKEN" in r.getMessage() for r in caplog.records) is warned


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("127.0.0.1", True), ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
     ("[::]", False), ("10.0.0.5", False), ("router.internal", False)],
)  # fmt: skip
def test_the_open_admin_warning_knows_loopback_binds(host: str, loopback: bool) -> None:
    assert _is_loopback(host) is loopback
