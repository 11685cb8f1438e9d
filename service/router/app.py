"""The router service: Starlette app, background loading, readiness, drain and reload.

The server listens at once. Loading (model, weights, warm-up) runs in the background; until it
is done ``/health`` and ``/v1/route`` answer 503 ``router_not_ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.routing import Route

from service import __version__
from service.config import RouterSettings, settings_summary
from service.errors import Conflict, ShuttingDown
from service.http.fastpath import served_by_fast_path
from service.http.server import Fleet
from service.http.service_base import ServiceBase
from service.metrics import RouterMetrics
from service.router.api import RouterApi
from service.router.engine import RouterEngine, build_state
from service.router.state import StateHolder
from service.router.weights import RouterWeights, WeightsError

if TYPE_CHECKING:  # torch loads in the loading thread, after the server listens (see model_card.py)
    from service.router.embedder import CudaOptions, Embedder

logger = logging.getLogger(__name__)

WARMUP_TEXTS = ("warm up the router", "a second, somewhat longer prompt to warm up another sequence length")
WARMUP_ROUNDS = 3
# After the drain timeout, how long the 503s of the requests still waiting get to reach their clients (they are
# answered at once; this bounds a client that does not read).
ABORT_ANSWER_GRACE_S = 2.0
LOAD_FAILED_EXIT_CODE = 1  # a worker process of several that failed to load (see _load)
DRAIN_TIMEOUT_MESSAGE = "the router shut down before this request's turn came; retry on another replica"
OPEN_ADMIN_WARNING = (
    "NO ADMIN TOKEN on %s: anyone who reaches this port can POST /admin/reload, load any weights file on the host "
    "and clear the cache. Set --admin-token (LLMROUTER_ADMIN_TOKEN), or bind to 127.0.0.1"
)

EmbedderFactory = Callable[[], "Embedder"]


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ok"
    DRAINING = "draining"
    FAILED = "failed"


class RouterService(ServiceBase):
    settings: RouterSettings
    metrics: RouterMetrics

    def __init__(
        self, settings: RouterSettings, *, embedder_factory: EmbedderFactory | None = None, fleet: Fleet | None = None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.fleet = fleet or Fleet()
        self.metrics = RouterMetrics()
        self.holder = StateHolder()
        self.engine: RouterEngine | None = None
        self.phase = Phase.LOADING
        self.load_error: str | None = None
        self._reload_pending = False  # a SIGHUP arrived before the engine existed
        self._embedder: Embedder | None = None
        self._embedder_factory = embedder_factory or functools.partial(build_embedder, settings)
        self._drain_requested = asyncio.Event()
        api = RouterApi(self)
        routes = [
            Route("/v1/route", served_by_fast_path, methods=["POST"]),
            Route("/v1/models", self._guard(api.models), methods=["GET"]),
            Route("/health", self._guard(api.health), methods=["GET"]),
            Route("/livez", self._guard(self.livez), methods=["GET"]),
            Route("/metrics", self._guard(api.metrics), methods=["GET"]),
            Route("/openapi.json", self._guard(api.openapi), methods=["GET"]),
            Route("/admin/reload", self._guard(api.reload), methods=["POST"]),
        ]
        self._build_asgi(
            routes,
            lifespan=self._lifespan,
            fast_path="/v1/route",
            fast_handler=api.route,
            draining=lambda: self.draining,
        )

    @property
    def draining(self) -> bool:
        return self.phase is Phase.DRAINING

    def alive(self) -> bool:
        return self.phase is not Phase.FAILED

    def not_ready_reason(self) -> str:
        if self.phase is Phase.FAILED:
            return f"router failed to load: {self.load_error}"
        return "router is loading its model and weights; retry shortly"

    def health(self) -> dict[str, Any]:
        state = self.holder.current()
        status = self.phase.value
        if self.phase is Phase.READY and not self.fleet.all_ready():
            status = Phase.LOADING.value  # this worker is ready, a sibling behind the same port is not
        body: dict[str, Any] = {"status": status, "version": __version__}
        if self._embedder is not None:
            body["device"] = self._embedder.device
            body["embedder"] = self._embedder.model_id
            body["encoder"] = self._embedder.runtime_info()
        if state is not None:
            body.update(
                models=state.weights.num_models,
                clusters=state.weights.num_clusters,
                weights_version=state.weights.version,
                default_cost_weight=state.weights.default_lambda,
                index=state.index.backend,
            )
        if self.engine is not None:
            body["queue"] = self.engine.admitted
        if self.load_error is not None:
            body["error"] = self.load_error
        return body

    # -- lifecycle ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        logger.info("router settings: %s", settings_summary(self.settings))
        if self.settings.admin_token is None and not _is_loopback(self.settings.host):
            logger.warning(OPEN_ADMIN_WARNING, self.settings.host)
        self._spawn(self._load())
        try:
            yield
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self.engine is not None:
                await self.engine.close()

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            embedder = await asyncio.to_thread(self._embedder_factory)
            self._embedder = embedder
            state = await asyncio.to_thread(
                build_state, self.settings.resolved_weights(), embedder, index_backend=self.settings.index_backend
            )
            engine = RouterEngine(embedder=embedder, holder=self.holder, settings=self.settings, metrics=self.metrics)
            engine.install(state)
            await asyncio.to_thread(_warm_up, embedder)
            engine.start()
        except Exception as exc:  # a bad model or weights file must not kill the process
            self.phase = Phase.FAILED
            self.load_error = str(exc)
            logger.exception("router failed to load")
            if self.fleet.size > 1:
                # Behind one port with siblings that may have loaded, the failure showed on whichever process a
                # probe reached: /livez flipped between 200 and 503, and the supervisor, seeing no process exit,
                # never stopped. This one drains and exits 1; the supervisor then stops the rest and exits 1.
                logger.error("router worker process exits: the supervisor stops the server for a restart")
                self.exit_code = LOAD_FAILED_EXIT_CODE
                self.begin_drain()
            return
        self.engine = engine
        if self._reload_pending:  # a SIGHUP came while loading, maybe after the file was read: read it again
            self._reload_pending = False
            await self._reload_from_signal()
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            self._become_ready()
        logger.info("router ready in %.1fs on %s", time.perf_counter() - started, embedder.device)

    def begin_drain(self) -> None:
        if self.phase is not Phase.DRAINING:
            logger.info("draining: refusing new work, finishing admitted requests")
        self.phase = Phase.DRAINING
        self.metrics.ready.set(0)
        self._drain_requested.set()

    async def drained(self) -> None:
        await self._drain_requested.wait()
        try:
            await asyncio.wait_for(self._finish_admitted(), timeout=self.settings.drain_timeout_s)
        except TimeoutError:
            failed = self.engine.abort_waiting(ShuttingDown(DRAIN_TIMEOUT_MESSAGE)) if self.engine is not None else 0
            logger.warning(
                "drain timeout (%.0fs) reached with work still open: %d waiting requests answered 503",
                self.settings.drain_timeout_s,
                failed,
            )
            # Let those answers go out before the server closes the connections.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._middleware.idle.wait(), timeout=ABORT_ANSWER_GRACE_S)
        logger.info("drained")

    async def _finish_admitted(self) -> None:
        if self.engine is not None:
            await self.engine.drain()
        await self._middleware.idle.wait()

    async def reload_weights(self, path: Path) -> RouterWeights:
        """``/admin/reload``. With several worker processes behind the port, every one must serve the same weights:
        only the configured file can be reloaded (its path is what SIGHUP re-reads), and once this worker has
        validated it, the parent is sent SIGHUP, which it forwards to every worker, this one included: each swaps
        it in once."""
        assert self.engine is not None
        configured = self.settings.resolved_weights()
        siblings = self.fleet.size > 1
        if siblings and not _same_path(path, configured):
            raise Conflict(
                f"this server runs {self.fleet.size} worker processes, which must serve the same weights: write the "
                f"new weights over the configured file ({configured}) and POST /admin/reload without a path "
                "(or send SIGHUP to the parent process)"
            )
        if not siblings:
            return await self.engine.reload(path)
        weights = (await self.engine.validate(path)).weights
        try:
            self.fleet.signal_all(signal.SIGHUP)
        except RuntimeError as exc:
            raise ShuttingDown(str(exc)) from None
        return weights

    def on_reload_signal(self) -> None:
        self._spawn(self._reload_from_signal())

    async def _reload_from_signal(self) -> None:
        if self.engine is None:
            logger.info("SIGHUP while loading: the weights file is read again once loaded")
            self._reload_pending = True
            return
        path = self.settings.resolved_weights()
        try:
            weights = await self.engine.reload(path)
        except WeightsError as exc:
            logger.error("SIGHUP reload rejected, previous weights keep serving: %s", exc)
        else:
            logger.info("SIGHUP reload: now serving %s from %s", weights.version, path)


def _same_path(a: Path, b: Path) -> bool:
    """Spelled the same once made absolute (no file-system access: the path may not even be valid)."""
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _warm_up(embedder: Embedder) -> None:
    """First calls allocate, pick kernels and (TorchScript) profile and optimise the graph; pay
    that before declaring ready, for a lone prompt and for a mixed-length batch."""
    single, batch = embedder.tokenize(WARMUP_TEXTS[:1]), embedder.tokenize(list(WARMUP_TEXTS))
    for _ in range(WARMUP_ROUNDS):
        embedder.embed_ids(single)
        embedder.embed_ids(batch)


def build_embedder(settings: RouterSettings) -> Embedder:
    """Runs in the loading thread: this is where torch is first imported."""
    from service.router.embedder import MiniLMEmbedder

    return MiniLMEmbedder(
        model_dir=settings.model_dir,
        device=settings.device,
        dtype=settings.dtype,
        torchscript=settings.torchscript,
        onednn=settings.onednn_linear,
        cuda=cuda_options(settings),
    )


def cuda_options(settings: RouterSettings) -> CudaOptions:
    from service.router.embedder import CudaOptions

    return CudaOptions(
        graphs=settings.cuda_graphs,
        graph_batch_sizes=settings.cuda_graph_batch_sizes,
        graph_seq_lens=settings.cuda_graph_seq_lens,
        max_batch_size=settings.max_batch_size,
        kernels=settings.kernels,
        kernels_path=settings.kernels_path,
    )


def build_router_service(settings: RouterSettings, fleet: Fleet) -> RouterService:
    """Picklable factory for the server runner (worker processes call it)."""
    return RouterService(settings, fleet=fleet)


def _is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this host only (``localhost`` or a loopback IP)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback  # [::1] as in URLs
    except ValueError:  # a host name: it may resolve anywhere
        return False
