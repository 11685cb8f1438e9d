"""Run a service under Hypercorn (uvloop where available), one or several processes on one port.

Signals, per worker process:
* SIGTERM / SIGINT: drain. The service stops admitting (health 503, new work 503), finishes what it
  admitted, then Hypercorn stops listening and the process exits.
* SIGHUP: the service's reload hook (the router reloads its weights file).

With ``workers > 1`` a parent binds the socket once, starts the workers (each its own event loop,
batcher and model) and forwards SIGTERM, SIGINT and SIGHUP to them.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any, Protocol, cast

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app
from prometheus_client.multiprocess import mark_process_dead
from starlette.types import ASGIApp

from service.config import MULTIPROC_DIR_ENV, BaseSettings
from service.http import hypercorn_keepalive, hypercorn_single_write

logger = logging.getLogger(__name__)

# Seconds Hypercorn waits for open connections after the service has drained its own work.
CONNECTION_CLOSE_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
# Client address, request line without the query string (clients such as Vast's SDK send the api key in it), status,
# response bytes, seconds taken, user agent. Request headers (Authorization) are never logged.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s HTTP/%(H)s" %(s)s %(b)s %(L)s "%(a)s"'


class Service(Protocol):
    """What the runner needs from a service besides its ASGI app."""

    @property
    def asgi(self) -> ASGIApp: ...

    def begin_drain(self) -> None:
        """Stop admitting work (idempotent)."""

    async def drained(self) -> None:
        """Return once admitted work is finished (or the drain timeout passed)."""

    def on_reload_signal(self) -> None:
        """SIGHUP."""

    @property
    def exit_code(self) -> int:
        """What the worker process exits with once served: non-zero when the service stopped itself for a fault
        (the supervisor then stops the others and exits 1)."""


class Fleet:
    """Readiness shared by the worker processes behind one port.

    Requests land on whichever worker accepts, so the server is ready only when every worker is:
    each one's ``/health`` is 200 only once ``all_ready()``.
    """

    def __init__(
        self, size: int = 1, counter: Synchronized[int] | None = None, supervisor_pid: int | None = None
    ) -> None:
        self.size = size
        self.supervisor_pid = supervisor_pid  # the parent process that forwards signals; None with one process
        self._counter = counter
        self._local = 0
        self._marked = False

    def mark_ready(self) -> None:
        if self._marked:
            return
        self._marked = True
        if self._counter is None:
            self._local += 1
            return
        with self._counter.get_lock():
            self._counter.value += 1

    def all_ready(self) -> bool:
        count = self._local if self._counter is None else self._counter.value
        return count >= self.size

    def signal_all(self, signum: int) -> None:
        """Have the supervisor forward ``signum`` to every worker, this one included. ``RuntimeError`` when it is gone
        (this process outlived it): the signal would reach whatever process adopted this one."""
        if self.supervisor_pid is None or os.getppid() != self.supervisor_pid:
            raise RuntimeError("the supervisor process is gone; this worker is shutting down")
        os.kill(self.supervisor_pid, signum)


ServiceFactory = Callable[[Fleet], Service]


class ServiceConfig(Config):
    """Hypercorn's config with its response headers (``Date``, ``Server``) made once a second per protocol rather
    than per answer: formatting the date was about 1.7 us of every response. The ``Date`` header counts whole
    seconds, so the answers are the same. Settings changed after the first answer (nothing here does; Hypercorn
    changes its own only in ``create_sockets``, before serving) show from the next second."""

    def __init__(self) -> None:
        super().__init__()
        self._headers_made: dict[str, tuple[int, list[tuple[bytes, bytes]]]] = {}

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        second = int(time.time())
        made = self._headers_made.get(protocol)
        if made is None or made[0] != second:
            made = self._headers_made[protocol] = (second, super().response_headers(protocol))
        return list(made[1])  # a list of its own: callers may add to it


def hypercorn_config(settings: BaseSettings) -> Config:
    config = ServiceConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.backlog = settings.listen_backlog
    config.graceful_timeout = CONNECTION_CLOSE_GRACE_S
    config.keep_alive_timeout = settings.keep_alive_s
    # Off by default: a line per request costs throughput, and the metrics count requests anyway.
    config.accesslog = _access_logger() if settings.access_log else None
    config.access_log_format = ACCESS_LOG_FORMAT
    config.errorlog = logging.getLogger("hypercorn.error")
    config.loglevel = settings.log_level.upper()
    return config


# The path is logged percent-decoded: "%0A" in a URL wrote a line of the client's choosing into the log (a forged
# "200 POST /route/" entry), "%1B" a terminal escape. Control characters are logged escaped instead.
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))} | {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


class EscapeControlCharacters(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # a bad format: logging reports it itself (handleError), as without this filter
        record.msg, record.args = message.translate(_CONTROL_ESCAPES), None
        return True


def _access_logger() -> logging.Logger:
    logger = logging.getLogger("hypercorn.access")
    logger.setLevel(logging.INFO)  # asked for explicitly: shown even under --log-level warning
    if not any(isinstance(f, EscapeControlCharacters) for f in logger.filters):
        logger.addFilter(EscapeControlCharacters())
    return logger


# A SIGTERM or SIGINT before the event loop (or the supervisor) handles them: their default killed the process
# (exit 143) while it imported and loaded, instead of the drain and exit 0 a stop promises.
_stop_requested = False


def hold_early_signals() -> None:
    """From a server process's start until its loop takes them over: SIGTERM and SIGINT are remembered (the server
    drains as soon as it serves), SIGHUP is ignored (it would re-read files that start-up reads anyway)."""

    def remember(_signum: int, _frame: Any) -> None:
        global _stop_requested
        _stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, remember)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def stop_requested() -> bool:
    """Whether a SIGTERM or SIGINT came while ``hold_early_signals`` held them."""
    return _stop_requested


def serve(factory: ServiceFactory, settings: BaseSettings) -> int:
    config = hypercorn_config(settings)
    sockets = config.create_sockets()  # bind before anything starts: a port in use is a plain error (OSError)
    try:
        if settings.workers <= 1:
            run_worker(factory, config, sockets, Fleet())
            return 0
        return _run_supervisor(factory, config, sockets, settings.workers)
    finally:
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.close()


def run_worker(factory: ServiceFactory, config: Config, sockets: Sockets, fleet: Fleet) -> None:
    hold_early_signals()  # a spawned worker starts with the default dispositions
    configure_logging(config.loglevel)  # a spawned worker process starts with logging unconfigured (else a no-op)
    if fleet.supervisor_pid is not None:
        drain_when_parent_dies(fleet.supervisor_pid)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        code = asyncio.run(_serve(factory, config, sockets, fleet))
    else:
        code = uvloop.run(_serve(factory, config, sockets, fleet))
    if code:
        sys.exit(code)


async def _serve(factory: ServiceFactory, config: Config, sockets: Sockets, fleet: Fleet) -> int:
    hypercorn_keepalive.install()
    hypercorn_single_write.install()
    service = factory(fleet)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.begin_drain)
    loop.add_signal_handler(signal.SIGHUP, service.on_reload_signal)
    if _stop_requested:
        service.begin_drain()  # asked to stop while starting: serve nothing new, exit as a drain does
    await worker_serve(
        # Starlette's and Hypercorn's ASGI type aliases differ in spelling only
        wrap_app(cast(Any, service.asgi), config.wsgi_max_body_size, "asgi"),
        config,
        sockets=sockets,
        shutdown_trigger=service.drained,
    )
    return service.exit_code


METRICS_DIR_PREFIX = "llmrouter-metrics-"
OWNER_LOCK = ".owner.lock"  # held (flock) by the supervisor for as long as its folder is in use


def sweep_dead_metrics_folders(tmp_dir: str | None = None) -> int:
    """Remove the metrics folders whose supervisor is gone: one killed (SIGKILL, an OOM kill) cannot remove its own,
    and in a container's /tmp that outlives restarts they piled up. A folder is gone when its owner's lock can be
    taken: pids cannot tell (a restarted container's supervisor has the same pid; a /tmp shared across pid
    namespaces shows a live owner as dead), the kernel's lock can."""
    removed = 0
    for folder in Path(tmp_dir or tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*"):
        try:
            fd = os.open(folder / OWNER_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # no lock (still being made, or not ours): left alone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner holds it
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def _hold_owner_lock(folder: str) -> int:
    fd = os.open(Path(folder) / OWNER_LOCK, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd  # released with the process, however it ends


def _run_supervisor(factory: ServiceFactory, config: Config, sockets: Sockets, workers: int) -> int:
    sweep_dead_metrics_folders()
    with tempfile.TemporaryDirectory(prefix=METRICS_DIR_PREFIX) as metrics_dir:
        lock = _hold_owner_lock(metrics_dir)
        # set before the workers start: prometheus_client picks its value class when a worker imports it
        os.environ[MULTIPROC_DIR_ENV] = metrics_dir
        try:
            return _supervise(factory, config, sockets, workers)
        finally:
            del os.environ[MULTIPROC_DIR_ENV]
            os.close(lock)


def _supervise(factory: ServiceFactory, config: Config, sockets: Sockets, workers: int) -> int:
    """Start the workers, forward SIGTERM, SIGINT and SIGHUP to them, and wait. A worker that exits unasked (killed,
    crashed) has the others drained and the server exit 1, for the process manager to restart it whole: the rest
    would go on answering /health 200 on part of their capacity, and the dead one's gauges would stay merged."""
    ctx = multiprocessing.get_context("spawn")
    fleet = Fleet(workers, ctx.Value("i", 0), supervisor_pid=os.getpid())
    processes = [
        ctx.Process(target=run_worker, args=(factory, config, sockets, fleet), daemon=False, name=f"worker-{i}")
        for i in range(workers)
    ]
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signum)

    # A worker starts with SIGHUP ignored (a disposition exec keeps) until its loop handles it: a reload forwarded
    # while it still imports would otherwise kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for process in processes:
        process.start()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    if _stop_requested:
        forward(signal.SIGTERM, None)
    logger.info("started %d workers on %s", workers, ", ".join(config.bind))
    running = {process.sentinel: process for process in processes}
    exit_code = 0
    while running:
        for sentinel in wait(list(running)):
            process = running.pop(cast(int, sentinel))
            process.join()
            if process.pid is not None:
                mark_process_dead(process.pid)  # its "live" gauges leave the merged view
            if not stopping:
                logger.error(
                    "worker %s (pid %s) exited unasked (code %s): draining the others; exiting 1 for the process "
                    "manager to restart the server",
                    process.name, process.pid, process.exitcode,
                )  # fmt: skip
                stopping, exit_code = True, 1
                forward(signal.SIGTERM, None)
            elif process.exitcode:
                exit_code = exit_code or exit_status(process.exitcode)
    return exit_code


def exit_status(returncode: int) -> int:
    """A child's exit code as a shell reports it: a kill by signal N (negative N from Python) is 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def drain_when_parent_dies(parent_pid: int) -> None:
    """Linux: SIGTERM (a drain) reaches this process when its parent, ``parent_pid``, dies. Orphaned workers kept
    serving with nobody to forward signals, and a reload they asked for signalled whatever process adopted them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
    )
