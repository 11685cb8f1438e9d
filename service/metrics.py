"""Every Prometheus metric both services export, on a registry of its own per app instance.

Durations are in seconds and share one bucket set; label values are bounded (route templates,
status codes, error codes, model ids and cluster ids from the weights file).

With several worker processes behind one port (``--workers N``) a scrape lands on any one of them, so the
server runs prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``service.http.server``
before the workers start): every process writes its values to files there and ``/metrics`` answers the sum
over all of them (counters, histograms) or each gauge's ``multiprocess_mode`` across the live ones.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from service.config import MULTIPROC_DIR_ENV
from service.errors import ServiceError

# gauge aggregation across worker processes (ignored with one process)
PER_PROCESS_SUM: Final = "livesum"  # each process holds its own share (queue, in flight): the server's is the sum
ALL_LIVE: Final = "livemin"  # a 0/1 flag every process must have (ready, store up)
SHARED_VIEW: Final = "livemax"  # each process computes the same value from shared state (Redis), or a 0/1 info value

DURATION_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.006,
    0.008,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512, 1024, 2048)  # CUDA batches reach 1024+
SIGNATURE_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # up to signing's MAX_BATCH_LEAVES
BATCH_TOKEN_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST
RELOAD_OK: Final = "ok"
RELOAD_REJECTED: Final = "rejected"
RELOAD_RESULTS = (RELOAD_OK, RELOAD_REJECTED)


class HttpMetrics:
    """Request counts and latency by route template and status; shared by both services."""

    def __init__(
        self, registry: CollectorRegistry, prefix: str, *, ready_help: str = "1 when serving and not draining"
    ) -> None:
        self.registry = registry
        self.ready = Gauge(f"{prefix}_ready", ready_help, multiprocess_mode=ALL_LIVE, registry=registry)
        self.requests = Counter(
            f"{prefix}_http_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{prefix}_http_request_duration_seconds",
            "Time from request start to response end, by route",
            ["route"],
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_http_requests_in_flight",
            "Requests being handled",
            multiprocess_mode=PER_PROCESS_SUM,
            registry=registry,
        )
        self.errors = Counter(f"{prefix}_errors", "Error answers by error code", ["code"], registry=registry)
        # Every code exported from the start at 0: increase() over a series that first appears at 1 reads 0, so an
        # alert on the first internal error would never fire.
        for code in error_codes():
            self.errors.labels(code=code)

    def render(self) -> bytes:
        if multiprocess():
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


def error_codes() -> list[str]:
    """The ``code`` of every error in the service's error tree."""
    codes, pending = {ServiceError.code}, [ServiceError]
    while pending:
        for sub in pending.pop().__subclasses__():
            codes.add(sub.code)
            pending.append(sub)
    return sorted(codes)


def multiprocess() -> bool:
    """Whether this process is one of several whose metrics are merged (read once the values are created:
    prometheus_client picks its value class at import)."""
    return bool(os.environ.get(MULTIPROC_DIR_ENV))


class RouterMetrics(HttpMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry(auto_describe=True)
        super().__init__(registry, "router", ready_help="1 when weights and model are loaded and not draining")
        self.queue_wait = Histogram(
            "router_queue_wait_seconds",
            "Time a prompt waited before its batch started",
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.embedding_duration = Histogram(
            "router_embedding_duration_seconds",
            "Forward pass time per batch (the encoder alone)",
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.tokenize_duration = Histogram(
            "router_tokenize_duration_seconds",
            "Tokenization time per tokenizer pass",
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.routing_duration = Histogram(
            "router_routing_duration_seconds",
            "Routing logic per request (cache, search, scoring)",
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.batch_size = Histogram(
            "router_batch_size", "Prompts per forward pass", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.batch_tokens = Histogram(
            "router_batch_tokens",
            "Tokens per forward pass (no padding)",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "router_queue_depth", "Prompts waiting for a batch", multiprocess_mode=PER_PROCESS_SUM, registry=registry
        )
        self.admitted = Gauge(
            "router_admitted_prompts",
            "Prompts admitted and not finished (bounded by max_queue)",
            multiprocess_mode=PER_PROCESS_SUM,
            registry=registry,
        )
        self.max_queue = Gauge(
            "router_max_queue",
            "The admission limit (--max-queue): past it requests get 429",
            multiprocess_mode=PER_PROCESS_SUM,
            registry=registry,
        )
        self.dropped = Counter(
            "router_dropped_prompts", "Prompts dropped before compute because every client left", registry=registry
        )
        self.batch_failures = Counter("router_batch_failures", "Batches whose compute raised", registry=registry)
        self.cache_hits = Counter("router_cache_hits", "Prompt lookups answered by the LRU cache", registry=registry)
        self.cache_misses = Counter("router_cache_misses", "Prompt lookups not in the LRU cache", registry=registry)
        self.singleflight_joins = Counter(
            "router_singleflight_joins", "Requests that shared an identical prompt's computation", registry=registry
        )
        self.selections = Counter(
            "router_selections", "Routing decisions by selected model", ["model"], registry=registry
        )
        self.cluster_requests = Counter(
            "router_cluster_requests", "Routing decisions by cluster", ["cluster"], registry=registry
        )
        self.weights_info = Gauge(
            "router_weights_info",
            "The serving weights (value 1)",
            ["version", "models", "clusters"],
            multiprocess_mode=SHARED_VIEW,
            registry=registry,
        )
        self.reloads = Counter(
            "router_weights_reloads", "Weights reload attempts by result", ["result"], registry=registry
        )
        for result in RELOAD_RESULTS:  # at 0 from the start, for the first rejected reload's alert (see errors)
            self.reloads.labels(result=result)


class DispatcherMetrics(HttpMetrics):
    """Endpoint labels are configured endpoint names only (unauthenticated names never become labels)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry(auto_describe=True)
        super().__init__(registry, "dispatcher")
        self.routes = Counter(
            "dispatcher_routes", "POST /route/ answers by endpoint and outcome", ["endpoint", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.pick_duration = Histogram(
            "dispatcher_pick_duration_seconds",
            "Time to pick a worker and reserve its load (one store call)",
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.signature_batch_size = Histogram(
            "dispatcher_signature_batch_size",
            "Assignments per Ed25519 signature (1: signed alone; more: one Merkle tree, signed once)",
            buckets=SIGNATURE_BATCH_BUCKETS,
            registry=registry,
        )
        self.reports = Counter(
            "dispatcher_worker_reports", "Worker status reports by endpoint", ["endpoint"], registry=registry
        )
        self.released = Counter(
            "dispatcher_released_requests",
            "Requests reported done by workers, by endpoint and success",
            ["endpoint", "success"],
            registry=registry,
        )
        self.given_back = Counter(
            "dispatcher_restart_given_back_requests",
            "Requests a restarted worker's reqnum_floor gave back (they died with its previous process), by endpoint",
            ["endpoint"],
            registry=registry,
        )
        self.workers = Gauge(
            "dispatcher_workers", "Workers by endpoint and state (as routing sees them)", ["endpoint", "state"],
            multiprocess_mode=SHARED_VIEW, registry=registry,
        )  # fmt: skip
        self.load = Gauge(
            "dispatcher_outstanding_load", "Workload assigned and not yet released, per endpoint", ["endpoint"],
            multiprocess_mode=SHARED_VIEW, registry=registry,
        )  # fmt: skip
        self.load_rate = Gauge(
            "dispatcher_load_rate", "Workload units per second routed as new requests (recent window)",
            ["endpoint"], multiprocess_mode=SHARED_VIEW, registry=registry,
        )  # fmt: skip
        self.waiting_requests = Gauge(
            "dispatcher_waiting_requests",
            "Requests answered 'no ready worker' whose clients polled within the load window, per endpoint",
            ["endpoint"],
            multiprocess_mode=SHARED_VIEW,
            registry=registry,
        )
        self.open_requests = Gauge(
            "dispatcher_open_requests",
            "Requests assigned and not reported done, or waiting for a worker, per endpoint (--max-open-requests caps"
            " them)",
            ["endpoint"],
            multiprocess_mode=SHARED_VIEW,
            registry=registry,
        )
        self.wanted_workers = Gauge(
            "dispatcher_wanted_workers",
            "Workers the autoscaling decision wants",
            ["endpoint"],
            multiprocess_mode=SHARED_VIEW,
            registry=registry,
        )
        self.wanted_cold_workers = Gauge(
            "dispatcher_wanted_cold_workers",
            "Stopped-but-loaded workers wanted",
            ["endpoint"],
            multiprocess_mode=SHARED_VIEW,
            registry=registry,
        )
        self.store_up = Gauge(
            "dispatcher_store_up",
            "1 when the state store answered its last call",
            multiprocess_mode=ALL_LIVE,
            registry=registry,
        )

    def forget_endpoint(self, endpoint: str, states: Iterable[str]) -> None:
        """An endpoint left the configuration: its gauges go (an autoscaler reading the last wanted_workers would keep
        scaling a pool that no longer exists). Several processes cannot remove a series: there they read 0."""
        gauges = (self.load, self.load_rate, self.waiting_requests, self.open_requests, self.wanted_workers,
                  self.wanted_cold_workers)  # fmt: skip
        series: list[tuple[Gauge, tuple[str, ...]]] = [(gauge, (endpoint,)) for gauge in gauges]
        series += [(self.workers, (endpoint, state)) for state in states]
        for gauge, labels in series:
            if multiprocess():
                gauge.labels(*labels).set(0)
            else:
                with contextlib.suppress(KeyError):  # never set: the endpoint came and went between refreshes
                    gauge.remove(*labels)
