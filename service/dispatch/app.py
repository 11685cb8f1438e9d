"""The dispatcher service: Starlette app, state store, signing key, endpoints, scaling loop, drain and reload.

SIGHUP re-reads the endpoints file, the signing key file and the next key's public key file (a bad file is logged and
what was loaded keeps serving). A new key in the key file takes over signing at once, in the same process, so the state
(reqnums above all) carries on; the replaced key stays published until everything it signed has expired. A next key is
published before it signs, so that workers (and every replica's /pubkey/) know it by the time it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route

from service import __version__
from service.config import DispatcherSettings, settings_summary
from service.dispatch import autoscale
from service.dispatch.api import DispatcherApi
from service.dispatch.endpoints import ConfigError, EndpointRegistry, EndpointSpec, load_config
from service.dispatch.memory_store import MemoryStore
from service.dispatch.records import STATUS_KEYS, WorkerRecord
from service.dispatch.selection import status_breakdown
from service.dispatch.signing import (
    DEFAULT_CLOCK_SKEW_S,
    MAX_BATCH_LEAVES,
    KeyFileError,
    PublishedKey,
    Signer,
    key_id_for,
    publish,
    read_key_file,
    read_public_key_file,
    read_public_keys,
)
from service.dispatch.signing_batch import SignatureBatcher
from service.dispatch.store import DispatchStore, LoadStats, StoreUnavailable
from service.http.fastpath import served_by_fast_path
from service.http.server import Fleet
from service.http.service_base import ServiceBase
from service.metrics import DispatcherMetrics

logger = logging.getLogger(__name__)

# Silent workers are swept every tenth of --worker-forget-s (at most once per refresh): one store call per endpoint,
# and a worker is forgotten at most 10% later than due.
FORGET_SWEEP_FRACTION = 0.1
# How long /health waits for the store's PING. A Redis call may take --redis-timeout-s twice (a pool connection,
# then the reply): load balancers' probes (2 s in deploy/) must get an answer before theirs runs out.
HEALTH_STORE_TIMEOUT_S = 0.5

# A key replaced on SIGHUP stays published this long past the replaced key's last assignment's expiry: the clock skew
# a worker's verifier allows.
RETIRED_KEY_GRACE_S = DEFAULT_CLOCK_SKEW_S

EPHEMERAL_KEY_WARNING = (
    "NO SIGNING KEY CONFIGURED: using an ephemeral Ed25519 key (key id %s). Workers must re-fetch /pubkey/ after "
    "every restart, and replicas will not share it. Create one with `python -m service keygen` and pass "
    "--signing-key-file."
)


@dataclass(frozen=True, slots=True)
class EndpointView:
    workers: list[WorkerRecord]
    stats: LoadStats
    now: float  # the store's clock, which the workers' last_seen are on
    decision: autoscale.ScaleDecision


def load_signer(settings: DispatcherSettings) -> Signer:
    if settings.signing_key_file is not None:
        return read_key_file(settings.signing_key_file)
    if settings.signing_key:
        return Signer.from_seed_hex(settings.signing_key)
    return Signer.generate()


def _read_next_key(settings: DispatcherSettings) -> bytes | None:
    path = settings.next_public_key_file
    return None if path is None else read_public_key_file(path)


def open_store(settings: DispatcherSettings) -> DispatchStore:
    if settings.redis_url:
        from service.dispatch.redis_store import RedisStore

        return RedisStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            connect_timeout_s=settings.redis_timeout_s,
            socket_timeout_s=settings.redis_timeout_s,
            pool_timeout_s=settings.redis_timeout_s,
            max_workers_per_endpoint=settings.max_workers_per_endpoint,
            max_open_requests=settings.max_open_requests,
        )
    return MemoryStore(
        max_workers_per_endpoint=settings.max_workers_per_endpoint, max_open_requests=settings.max_open_requests
    )


def load_registry(settings: DispatcherSettings) -> EndpointRegistry:
    return load_config(settings.config) if settings.config is not None else EndpointRegistry()


class DispatcherService(ServiceBase):
    settings: DispatcherSettings
    metrics: DispatcherMetrics

    def __init__(
        self,
        settings: DispatcherSettings,
        *,
        store: DispatchStore | None = None,
        registry: EndpointRegistry | None = None,
        signer: Signer | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.fleet = fleet or Fleet()
        self.metrics = DispatcherMetrics()
        self.store = store if store is not None else open_store(settings)
        self.registry = registry if registry is not None else load_registry(settings)
        self.signer = signer if signer is not None else load_signer(settings)
        self.signing = self._signature_batcher(self.signer)
        self._configured_previous_keys = read_public_keys(settings.previous_public_keys)
        self._retired_keys: list[bytes] = []  # replaced on SIGHUP, published until their assignments expired
        # Published ahead of signing, so that every worker knows the key before the first assignment under it.
        self._next_key = _read_next_key(settings)
        self.published_keys: list[PublishedKey] = []
        self._publish_keys()
        self.draining = False
        self._drain_requested = asyncio.Event()
        api = DispatcherApi(self)
        routes = [
            Route("/route/", served_by_fast_path, methods=["POST"]),
            Route("/pubkey/", self._guard(api.pubkey), methods=["GET"]),
            Route("/worker_status/", self._guard(api.worker_status), methods=["POST"]),
            Route("/delete_requests/", self._guard(api.delete_requests), methods=["POST"]),
            Route("/endpoints/{name}/", self._guard(api.endpoint_info), methods=["GET"]),
            Route("/health", self._guard(api.health), methods=["GET"]),
            Route("/livez", self._guard(self.livez), methods=["GET"]),
            Route("/metrics", self._guard(api.metrics_text), methods=["GET"]),
            Route("/openapi.json", self._guard(api.openapi), methods=["GET"]),
        ]
        self._build_asgi(
            routes,
            lifespan=self._lifespan,
            fast_path="/route/",
            fast_handler=api.route,
            draining=lambda: self.draining,
            vouch=api.vouch,
            max_untrusted_body_bytes=settings.max_unauthenticated_body_bytes or None,
        )

    async def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "draining" if self.draining else "ok",
            "version": __version__,
            "store": "redis" if self.settings.redis_url else "memory",
            "endpoints": len(self.registry),
            "key_id": self.signer.key_id,
        }
        try:
            await asyncio.wait_for(self.store.ping(), HEALTH_STORE_TIMEOUT_S)
        except (StoreUnavailable, TimeoutError) as exc:
            # Still ready: the store is shared by every replica, so failing readiness would take them all out of
            # the balancer at once, and clients would get connection errors instead of this dispatcher's 503
            # store_unavailable with Retry-After. Reported here and as dispatcher_store_up for alerting.
            if not self.draining:
                body["status"] = "degraded"
            timed_out = f"the state store did not answer PING within {HEALTH_STORE_TIMEOUT_S:g} s"
            body.update(store_up=False, error=str(exc) if isinstance(exc, StoreUnavailable) else timed_out)
            self.metrics.store_up.set(0)
        else:
            body["store_up"] = True
            self.metrics.store_up.set(1)
        return body

    async def _check_store(self) -> None:
        """Once at start, off the way of serving: what about the store's server would break the state, as warnings
        (not a refusal to start: the store is shared, and its operator may be mending it while this one starts)."""
        try:
            problems = await asyncio.wait_for(self.store.server_problems(), HEALTH_STORE_TIMEOUT_S)
        except (StoreUnavailable, TimeoutError) as exc:
            logger.warning("could not check the state store's settings at start: %s", exc or "timed out")
            return
        for problem in problems:
            logger.warning("state store: %s", problem)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        logger.info("dispatcher settings: %s", settings_summary(self.settings))
        if self.signer.ephemeral:
            logger.warning(EPHEMERAL_KEY_WARNING, self.signer.key_id)
        logger.info(
            "dispatcher serving %d endpoint(s) on %s state, signing key %s",
            len(self.registry),
            "redis" if self.settings.redis_url else "in-memory",
            self.signer.key_id,
        )
        self._become_ready()
        self._spawn(self._refresh_loop())
        self._spawn(self._check_store())
        try:
            yield
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.store.close()

    def begin_drain(self) -> None:
        if not self.draining:
            logger.info("draining: refusing new routes, finishing open requests")
        self.draining = True
        self.metrics.ready.set(0)
        self._drain_requested.set()

    async def drained(self) -> None:
        await self._drain_requested.wait()
        try:
            await asyncio.wait_for(self._middleware.idle.wait(), timeout=self.settings.drain_timeout_s)
        except TimeoutError:
            logger.warning("drain timeout (%.0fs) reached with requests still open", self.settings.drain_timeout_s)
        logger.info("drained")

    def _signature_batcher(self, signer: Signer) -> SignatureBatcher:
        max_leaves = MAX_BATCH_LEAVES if self.settings.batch_signatures else 1
        return SignatureBatcher(signer, max_leaves=max_leaves, observe=self.metrics.signature_batch_size.observe)

    def on_reload_signal(self) -> None:
        """SIGHUP: re-read the endpoints file, the signing key file and the next key's public key file. Each part
        stands alone: a failure the checks did not foresee in one must not skip the others (a key rotation)."""
        try:
            self._reload_endpoints()
        except Exception:
            logger.exception("SIGHUP reload of the endpoints file failed, previous endpoints keep serving")
        if self._reload_signing_key():
            self._reload_next_key()
        else:  # promoting the next key failed: it stays published, or workers fetching now would drop it
            logger.error("SIGHUP: next public key file not re-read while the signing key file is refused")

    def _reload_endpoints(self) -> None:
        if self.settings.config is None:
            logger.info("SIGHUP: no endpoints file configured, endpoints unchanged")
            return
        try:
            registry = load_config(self.settings.config)
        except ConfigError as exc:
            logger.error("SIGHUP reload rejected, previous endpoints keep serving: %s", exc)
            return
        gone = set(self.registry.endpoints) - set(registry.endpoints)
        self.registry = registry
        for name in gone:
            self.metrics.forget_endpoint(name, STATUS_KEYS)
        logger.info("SIGHUP reload: now serving %d endpoint(s)", len(registry))

    def _reload_signing_key(self) -> bool:
        """Key rotation without a restart: a restart on in-memory state would start reqnums afresh at the clock, far
        above what workers have seen, and their replay windows would then refuse every assignment still in flight.
        False when the key file was refused."""
        path = self.settings.signing_key_file
        if path is None:
            return True
        try:
            signer = read_key_file(path)
        except (KeyFileError, OSError) as exc:
            logger.error("SIGHUP: signing key file rejected, key %s keeps signing: %s", self.signer.key_id, exc)
            return False
        if signer.key_id == self.signer.key_id:
            return True
        retired = self.signer
        # Both at once, on the loop: a route reads the signer and hands its assignment to the batcher without
        # yielding, so each assignment names the key that signs it.
        self.signer, self.signing = signer, self._signature_batcher(signer)
        self._retired_keys.insert(0, retired.public_key)
        self._publish_keys()
        until_expired = self.settings.assignment_ttl_s + RETIRED_KEY_GRACE_S
        asyncio.get_running_loop().call_later(until_expired, self._unpublish_retired, retired.public_key)
        logger.info(
            "SIGHUP: signing key %s now signs; %s stays published for %.0f s",
            signer.key_id,
            retired.key_id,
            until_expired,
        )
        return True

    def _reload_next_key(self) -> None:
        try:
            next_key = _read_next_key(self.settings)
        except KeyFileError as exc:
            logger.error("SIGHUP: next public key file rejected, published keys unchanged: %s", exc)
            return
        if next_key == self._next_key:
            return
        self._next_key = next_key
        self._publish_keys()
        if next_key is None:
            logger.info("SIGHUP: no next key published")
        else:
            logger.info("SIGHUP: next key %s published ahead of signing", key_id_for(next_key))

    def _unpublish_retired(self, public_key: bytes) -> None:
        if public_key in self._retired_keys:
            self._retired_keys.remove(public_key)
            self._publish_keys()

    def _publish_keys(self) -> None:
        upcoming = [] if self._next_key is None else [self._next_key]
        self.published_keys = publish(self.signer, [*upcoming, *self._retired_keys, *self._configured_previous_keys])

    # -- scaling decisions and worker gauges --------------------------------------------------------------------
    async def endpoint_view(self, spec: EndpointSpec) -> EndpointView:
        """One endpoint's workers, load and scaling decision, read from the store now."""
        store, settings = self.store, self.settings
        workers = await store.workers(spec.name)
        stats = await store.load_stats(spec.name, settings.load_window_s)
        now = await store.now()
        decision = autoscale.decide(spec, workers, stats, now=now, heartbeat_timeout_s=settings.heartbeat_timeout_s)
        return EndpointView(workers=workers, stats=stats, now=now, decision=decision)

    async def refresh_gauges(self) -> list[autoscale.ScaleDecision]:
        """Recompute every endpoint's scaling decision and the per-endpoint gauges from the store."""
        metrics, decisions = self.metrics, []
        for spec in self.registry.endpoints.values():
            view = await self.endpoint_view(spec)
            if spec.name not in self.registry.endpoints:  # a SIGHUP removed it meanwhile (and forgot its gauges)
                continue
            counts = status_breakdown(
                view.workers,
                now=view.now,
                heartbeat_timeout_s=self.settings.heartbeat_timeout_s,
                max_queue_time_s=spec.max_queue_time_s,
            )
            for state in STATUS_KEYS:
                metrics.workers.labels(endpoint=spec.name, state=state).set(counts[state])
            metrics.load.labels(endpoint=spec.name).set(view.stats.outstanding)
            metrics.load_rate.labels(endpoint=spec.name).set(view.stats.load_rate)
            metrics.waiting_requests.labels(endpoint=spec.name).set(view.stats.waiting_requests)
            metrics.open_requests.labels(endpoint=spec.name).set(view.stats.open_requests)
            metrics.wanted_workers.labels(endpoint=spec.name).set(view.decision.wanted_workers)
            metrics.wanted_cold_workers.labels(endpoint=spec.name).set(view.decision.wanted_cold_workers)
            decisions.append(view.decision)
        return decisions

    async def forget_silent_workers(self) -> int:
        """Forget the workers silent for ``--worker-forget-s`` that hold no request, in every endpoint the store has
        records of: each route scans an endpoint's records and each no-ready answer counts them, so dead ones must not
        pile up. Removed endpoints too (their workers can no longer report), whichever process saw the removal."""
        forgotten = 0
        for name in await self.store.endpoints():
            forgotten += await self.store.forget_workers(name, self.settings.worker_forget_s)
        if forgotten:
            logger.info("forgot %d worker(s) silent for over %gs", forgotten, self.settings.worker_forget_s)
        return forgotten

    async def _refresh_loop(self) -> None:
        up = True
        loop = asyncio.get_running_loop()
        next_forget = loop.time()
        while True:
            try:
                if loop.time() >= next_forget:
                    await self.forget_silent_workers()
                    next_forget = loop.time() + self.settings.worker_forget_s * FORGET_SWEEP_FRACTION
                await self.refresh_gauges()
            except StoreUnavailable as exc:
                if up:  # log the transition, not every tick
                    logger.warning("state store unavailable: %s", exc)
                up = False
                self.metrics.store_up.set(0)
            except Exception:  # a bug in one tick must not end the gauges and the forget sweep for good
                logger.exception("refreshing the dispatcher's gauges failed; trying again next tick")
            else:
                if not up:
                    logger.info("state store reachable again")
                up = True
                self.metrics.store_up.set(1)
            await asyncio.sleep(self.settings.autoscale_interval_s)


def build_dispatcher_service(
    settings: DispatcherSettings, fleet: Fleet, *, ephemeral_seed: bytes | None = None
) -> DispatcherService:
    """Picklable factory for the server runner (worker processes call it). ``ephemeral_seed``: with no key
    configured, the one ephemeral key the parent made for all of its worker processes (each making its own split
    ``/pubkey/`` between them, and workers rejected the other processes' assignments)."""
    signer = None if ephemeral_seed is None else Signer.generate(ephemeral_seed)
    return DispatcherService(settings, fleet=fleet, signer=signer)
