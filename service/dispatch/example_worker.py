"""A minimal GPU-worker stand-in: the whole worker side of the dispatch protocol around a trivial ``/echo``.

It exists to show (and to test end to end) what a real worker must do, in the order it must do it:

1. fetch the dispatcher's public keys (``GET /pubkey/``), retrying until the dispatcher answers, and refresh
   them now and then, and at once (rate-limited) when an assignment names a key it does not know, so a key
   rotation is picked up;
2. report ``state: ready`` (``POST /worker_status/``) and, from the answer's ``reqnum``, refuse every
   assignment issued before this process started (a fresh replay window cannot tell which were served); only
   then accept work, and keep reporting its load well within the dispatcher's ``heartbeat_timeout_s``, each
   report naming that floor (``reqnum_floor``), the first of them at once: the dispatcher then gives back the load
   of the requests that died with a previous process under this id, instead of holding it until the request ttl;
3. accept work only with a valid signed assignment (``AssignmentAuthMiddleware``);
4. give each finished request's load back (``POST /delete_requests/``), without making the client wait for it,
   those finished within ``RELEASE_BATCH_S`` in one call (one call each took 3.8 s for a burst of 1000, and
   the reports queued behind them: the dispatcher took the worker for dead); reports go on their own
   connections, so nothing queues ahead of the heartbeat;
5. on shutdown, report ``stopped`` so no new work is routed here.

Run it with ``python -m service.dispatch.example_worker --dispatcher URL --endpoint NAME --worker-token TOKEN
--port 0``: it binds first, so with port 0 the URL it reports carries the port the OS picked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Collection, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.dispatch.client import join_url
from service.dispatch.records import WorkerState
from service.dispatch.schemas import MAX_RELEASE_BATCH
from service.dispatch.signing import Assignment, KeyRing
from service.dispatch.verifier import AssignmentVerifier, fetch_keyring
from service.dispatch.worker_auth import STATE_ASSIGNMENT, STATE_PAYLOAD, AssignmentAuthMiddleware
from service.http import hypercorn_keepalive, hypercorn_single_write
from service.http.server import configure_logging

logger = logging.getLogger(__name__)

ECHO_PATH = "/echo"
HEALTH_PATH = "/health"
WORKER_STATUS_PATH = "/worker_status/"
DELETE_REQUESTS_PATH = "/delete_requests/"
DEFAULT_REPORT_INTERVAL_S = 5.0
DEFAULT_MAX_PERF = 100.0  # workload units per second this worker claims
HEARTBEAT_REPORT_FRACTION = 1 / 3  # report at least three times per heartbeat timeout: one lost report is fine
KEY_REFRESH_INTERVAL_S = 60.0  # how soon a key rotation at the dispatcher is picked up
KEY_REFRESH_MIN_GAP_S = 5.0  # an unknown key id triggers a fetch at most this often (forgeries are cheap)
KEY_RETRY_FIRST_S = 0.2
KEY_RETRY_MAX_S = 5.0
HTTP_TIMEOUT_S = 10.0
STOP_REPORT_TIMEOUT_S = 2.0  # the "stopped" report must not hold up shutdown
# A release lost to a dispatcher blip (Redis restarting: 503) would hold the request's load until --request-ttl-s
RELEASE_ATTEMPTS = 4
RELEASE_RETRY_FIRST_S = 0.5
RELEASE_BATCH_S = 0.05  # finished requests gathered into one release call
RELEASE_BATCH_MAX = MAX_RELEASE_BATCH
HTTP_OK = 200
HTTP_SERVICE_UNAVAILABLE = 503
HTTP_SERVER_ERROR = 500
UNSPECIFIED_HOSTS = frozenset({"", "0.0.0.0", "::"})
LOOPBACK = "127.0.0.1"
WORKER_TOKEN_ENV = "LLMROUTER_WORKER_TOKEN"


class ExampleWorker:
    """The worker's state and handlers; ``build_example_worker`` wires them into a Starlette app."""

    def __init__(
        self,
        *,
        dispatcher_url: str,
        endpoint: str,
        worker_id: str,
        own_url: str,
        worker_token: str,
        max_perf: float,
        keyring: KeyRing | None,
        report_interval_s: float,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.dispatcher_url = dispatcher_url
        self.endpoint = endpoint
        self.worker_id = worker_id
        self.own_url = own_url
        self.max_perf = max_perf
        self.report_interval_s = report_interval_s
        # No key until the first report has set the replay floor (step 2): until then every assignment is refused,
        # a given keyring included.
        self.verifier = AssignmentVerifier(KeyRing([]), own_urls=[own_url], endpoint=endpoint)
        self._given_keyring = keyring
        self.keys_loaded = False
        self.reqnum_floor: int | None = None  # what the verifier refuses up to, once the first report set it
        self._headers = {"Authorization": f"Bearer {worker_token}"}
        self._given_http = http
        self._http: httpx.AsyncClient | None = None
        self._report_http: httpx.AsyncClient | None = None  # the heartbeat's own pool: never behind releases
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_key_refresh = -KEY_REFRESH_MIN_GAP_S
        self._key_refresh: asyncio.Task[bool] | None = None  # the fetch requests with an unknown key id wait on
        self._releases: set[asyncio.Task[Any]] = set()  # finished requests' loads on their way back
        self._to_release: list[int] = []  # finished, gathered for the next release call
        self._gathering: asyncio.Task[Any] | None = None  # the task that sends them

    # -- lifecycle --------------------------------------------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self._http = self._given_http or httpx.AsyncClient(timeout=HTTP_TIMEOUT_S)
        self._report_http = self._given_http or httpx.AsyncClient(timeout=HTTP_TIMEOUT_S)
        self.spawn(self._run())
        try:
            yield
        finally:
            # "stopped" at once (routes must stop coming), while the loads of requests already served go back
            await self._cancel_tasks(keep=self._releases)
            await asyncio.gather(self._report_stopped(), self._finish_releases())
            await self._cancel_tasks()
            if self._given_http is None:
                await self._http.aclose()
                await self._report_http.aclose()
            self._http = self._report_http = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, referenced until done (cancelled at shutdown); its failure is logged,
        not lost."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())

    async def _finish_releases(self) -> None:
        if self._releases:
            await asyncio.wait(self._releases, timeout=STOP_REPORT_TIMEOUT_S)

    async def _cancel_tasks(self, keep: Collection[asyncio.Task[Any]] = ()) -> None:
        tasks = [task for task in self._tasks if task not in keep]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        keyring = self._given_keyring
        if keyring is None:
            keyring = await self._fetch_keys_until_answered()
        interval = await self._first_report()
        self._install_keys(keyring)
        if self.reqnum_floor is not None:
            # the floor at once, not a report interval later: until the dispatcher hears it, the requests that died
            # with a previous process here keep their load on this worker, and picking avoids it
            interval = await self.report(WorkerState.READY)
        await self._report_loop(interval)

    # -- talking to the dispatcher ----------------------------------------------------------------------------
    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("the worker's lifespan has not started")
        return self._http

    async def _fetch_keys_until_answered(self) -> KeyRing:
        delay = KEY_RETRY_FIRST_S
        while (keyring := await self._fetch_keys()) is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, KEY_RETRY_MAX_S)
        return keyring

    async def _fetch_keys(self) -> KeyRing | None:
        try:
            return await fetch_keyring(self.dispatcher_url, self.http)
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("cannot fetch the dispatcher's keys: %s", exc)
            return None

    def _install_keys(self, keyring: KeyRing) -> None:
        self.verifier.update_keys(keyring)
        self.keys_loaded = True

    async def refresh_keys(self) -> bool:
        """Fetch ``/pubkey/`` once; True when the verifier now has the published keys."""
        keyring = await self._fetch_keys()
        if keyring is not None:
            self._install_keys(keyring)
        return keyring is not None

    async def refresh_for_unknown_key(self) -> bool:
        """The middleware's hook for an assignment under a key id it does not know: the dispatcher may just have
        rotated its key. Fetches ``/pubkey/`` at most every ``KEY_REFRESH_MIN_GAP_S``; requests arriving during a
        fetch wait on that one. True when the keys were fetched (then the assignment is verified again)."""
        if not self.keys_loaded or self._http is None:
            return False
        refresh = self._key_refresh
        if refresh is None or refresh.done():
            now = asyncio.get_running_loop().time()
            if now - self._last_key_refresh < KEY_REFRESH_MIN_GAP_S:
                return False
            self._last_key_refresh = now
            refresh = self._key_refresh = self.spawn(self.refresh_keys())
        return await asyncio.shield(refresh)  # a waiter that leaves does not cancel the others' fetch

    async def _first_report(self) -> float:
        """Report ready until the dispatcher answers; every reqnum it issued before then is refused from now on.

        Those were issued to this URL before this process started, perhaps served by a previous process on it:
        an empty replay window could not tell a copy arriving now from a first use."""
        delay = KEY_RETRY_FIRST_S
        while (answer := await self._post_report(WorkerState.READY)) is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, KEY_RETRY_MAX_S)
        issued = answer.get("reqnum")
        if isinstance(issued, int) and not isinstance(issued, bool):
            self.verifier.reject_up_to(issued)
            self.reqnum_floor = issued
        return self._next_report_in(answer)

    async def _report_loop(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        keys_fetched_at = loop.time()
        while True:
            await asyncio.sleep(interval)
            if loop.time() - keys_fetched_at >= KEY_REFRESH_INTERVAL_S:
                await self.refresh_keys()
                keys_fetched_at = loop.time()
            interval = await self.report(WorkerState.READY)

    async def report(self, state: WorkerState, timeout_s: float = HTTP_TIMEOUT_S) -> float:
        """One ``POST /worker_status/``; the seconds until the next one should go (shorter when the dispatcher's
        heartbeat timeout asks for it)."""
        answer = await self._post_report(state, timeout_s)
        return self.report_interval_s if answer is None else self._next_report_in(answer)

    async def _post_report(self, state: WorkerState, timeout_s: float = HTTP_TIMEOUT_S) -> dict[str, Any] | None:
        body = {
            "endpoint": self.endpoint,
            "id": self.worker_id,
            "url": self.own_url,
            "state": state.value,
            "max_perf": self.max_perf,
            # an echo finishes without awaiting anything, so between two reports nothing is ever outstanding
            "cur_load": 0.0,
            "in_flight": 0,
        }
        if self.reqnum_floor is not None:
            body["reqnum_floor"] = self.reqnum_floor
        url = join_url(self.dispatcher_url, WORKER_STATUS_PATH)
        try:
            assert self._report_http is not None  # set with self.http
            response = await self._report_http.post(url, json=body, headers=self._headers, timeout=timeout_s)
            response.raise_for_status()
            answer = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("status report failed: %s", exc)
            return None
        return answer if isinstance(answer, dict) else {}

    def _next_report_in(self, answer: dict[str, Any]) -> float:
        heartbeat = answer.get("heartbeat_timeout_s")
        if isinstance(heartbeat, int | float) and heartbeat > 0:
            return min(self.report_interval_s, heartbeat * HEARTBEAT_REPORT_FRACTION)
        return self.report_interval_s

    async def _report_stopped(self) -> None:
        if self._http is not None and self.keys_loaded:
            await self.report(WorkerState.STOPPED, timeout_s=STOP_REPORT_TIMEOUT_S)

    def release_soon(self, request_idx: int) -> None:
        """Report the request done in the next release call, within ``RELEASE_BATCH_S``."""
        self._to_release.append(request_idx)
        if self._gathering is None:  # the first of a batch: its call goes out once the others gathered
            self._gathering = self.spawn(self._release_gathered())
            self._releases.add(self._gathering)
            self._gathering.add_done_callback(self._releases.discard)

    async def _release_gathered(self) -> None:
        try:
            await asyncio.sleep(RELEASE_BATCH_S)
            while self._to_release:  # those finished while a call was out go in the next one
                batch = self._to_release[:RELEASE_BATCH_MAX]
                del self._to_release[:RELEASE_BATCH_MAX]
                try:
                    await self.release(batch)
                except httpx.HTTPError as exc:  # their loads come back at the dispatcher's request ttl
                    logger.error("release of %d requests given up: %s", len(batch), exc)
        finally:
            self._gathering = None

    async def release(self, request_idxs: Sequence[int], *, success: bool = True) -> None:
        """Report the requests done; a transport error or a 5xx is retried with back-off (``RELEASE_ATTEMPTS``), a
        4xx is not (a request unknown or not this worker's: sending it again changes nothing)."""
        body = {"endpoint": self.endpoint, "id": self.worker_id, "request_idxs": list(request_idxs), "success": success}
        url = join_url(self.dispatcher_url, DELETE_REQUESTS_PATH)
        delay = RELEASE_RETRY_FIRST_S
        for attempt in range(1, RELEASE_ATTEMPTS + 1):
            try:
                response = await self.http.post(url, json=body, headers=self._headers)
                if response.status_code < HTTP_SERVER_ERROR:
                    response.raise_for_status()
                    return
                failure: Exception = httpx.HTTPStatusError(
                    f"dispatcher answered {response.status_code}", request=response.request, response=response
                )
            except httpx.TransportError as exc:
                failure = exc
            if attempt == RELEASE_ATTEMPTS:
                raise failure
            logger.warning("release of %d requests failed (%s); retrying in %.1f s", len(request_idxs), failure, delay)
            await asyncio.sleep(delay)
            delay *= 2

    # -- handlers ---------------------------------------------------------------------------------------------
    async def echo(self, request: Request) -> Response:
        assignment: Assignment = getattr(request.state, STATE_ASSIGNMENT)
        payload: object = getattr(request.state, STATE_PAYLOAD)
        answer = {
            "worker_id": self.worker_id,
            "reqnum": assignment.reqnum,
            "request_idx": assignment.request_idx,
            "payload": payload,
        }
        self.release_soon(assignment.request_idx)
        return JSONResponse(answer)

    async def health(self, _request: Request) -> Response:
        body = {"ready": self.keys_loaded, "worker_id": self.worker_id}
        return JSONResponse(body, status_code=HTTP_OK if self.keys_loaded else HTTP_SERVICE_UNAVAILABLE)


def build_example_worker(
    *,
    dispatcher_url: str,
    endpoint: str,
    worker_id: str,
    own_url: str,
    worker_token: str,
    max_perf: float = DEFAULT_MAX_PERF,
    keyring: KeyRing | None = None,
    report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
    http: httpx.AsyncClient | None = None,
) -> Starlette:
    """The example worker's ASGI app (``app.state.worker`` is its ``ExampleWorker``). With ``keyring`` given
    it skips the ``/pubkey/`` fetch; with ``http`` given it talks to the dispatcher through that client."""
    worker = ExampleWorker(
        dispatcher_url=dispatcher_url,
        endpoint=endpoint,
        worker_id=worker_id,
        own_url=own_url,
        worker_token=worker_token,
        max_perf=max_perf,
        keyring=keyring,
        report_interval_s=report_interval_s,
        http=http,
    )
    app = Starlette(
        routes=[Route(ECHO_PATH, worker.echo, methods=["POST"]), Route(HEALTH_PATH, worker.health, methods=["GET"])],
        middleware=[
            Middleware(
                AssignmentAuthMiddleware,
                verifier=worker.verifier,
                protected_paths=[ECHO_PATH],
                refresh_keys=worker.refresh_for_unknown_key,
            )
        ],
        lifespan=worker.lifespan,
    )
    app.state.worker = worker
    return app


# -- command line -------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.dispatch.example_worker", description=__doc__)
    parser.add_argument("--dispatcher", required=True, help="dispatcher base URL, e.g. http://127.0.0.1:8081")
    parser.add_argument("--endpoint", required=True, help="endpoint this worker serves")
    env_token = os.environ.get(WORKER_TOKEN_ENV) or None  # keeps the secret out of `ps`
    parser.add_argument(
        "--worker-token",
        required=env_token is None,
        default=env_token,
        help=f"the endpoint's worker token (or env {WORKER_TOKEN_ENV}, which `ps` does not show)",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default=LOOPBACK, help="address to listen on")
    parser.add_argument("--id", default=None, help="worker id (default: hostname-port)")
    parser.add_argument("--url", default=None, help="URL to report (default: http://host:port)")
    parser.add_argument("--max-perf", type=float, default=DEFAULT_MAX_PERF, help="workload units per second")
    parser.add_argument("--report-interval", type=float, default=DEFAULT_REPORT_INTERVAL_S, help="seconds")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def advertised_url(host: str, port: int) -> str:
    """The URL to report for a socket bound to ``host``: an unspecified address is reported as loopback (pass
    ``--url`` when the dispatcher runs elsewhere)."""
    name = LOOPBACK if host in UNSPECIFIED_HOSTS else host
    return f"http://[{name}]:{port}" if ":" in name else f"http://{name}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    config = Config()
    config.bind = [f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    sockets = config.create_sockets()  # bind now: with port 0, the port is known only after binding
    port = int(sockets.insecure_sockets[0].getsockname()[1])
    app = build_example_worker(
        dispatcher_url=args.dispatcher,
        endpoint=args.endpoint,
        worker_id=args.id or f"{socket.gethostname()}-{port}",
        own_url=args.url or advertised_url(args.host, port),
        worker_token=args.worker_token,
        max_perf=args.max_perf,
        report_interval_s=args.report_interval,
    )
    logger.info("example worker %s listening on port %d", app.state.worker.own_url, port)
    asyncio.run(_serve(app, config, sockets))
    return 0


async def _serve(app: Starlette, config: Config, sockets: Sockets) -> None:
    hypercorn_keepalive.install()
    hypercorn_single_write.install()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows event loops
            loop.add_signal_handler(sig, stop.set)
    # Starlette's and Hypercorn's ASGI type aliases differ in spelling only
    wrapped = wrap_app(cast(Any, app), config.wsgi_max_body_size, "asgi")
    await worker_serve(wrapped, config, sockets=sockets, shutdown_trigger=stop.wait)


if __name__ == "__main__":
    raise SystemExit(main())
