"""Hypercorn's keep-alive timer on one timer handle per connection, installed by the servers: never a task of the
connection, and nothing but a note of the time per request.

Hypercorn (0.17, 0.18) runs that timer as a task per idle period (``AsyncioSingleTask`` over ``_idle_timeout``).
Every request on a keep-alive connection cancelled one and waited for it to end (a lock and a trip through the event
loop), and every answer started another (two tasks, with ``wait_for``): about a tenth of a bare endpoint's samples
per request in py-spy, and the bare endpoint served about 1.2 times its req/s without it (2-core VM), a cost every
service behind Hypercorn paid. And being a task of the connection's
task group, the timer kept a socket whose client had closed it in CLOSE-WAIT (a file descriptor) until it ran out:
75 s with the services' keep-alive, so clients that open a connection per request used up the descriptors.

Hypercorn's behaviour is kept: an idle connection is closed ``keep_alive_timeout`` after its last answer, and every
idle one at once when the worker terminates (Hypercorn sets ``context.terminated`` on shutdown: one watcher task per
worker closes the idle connections then; one that goes idle later is closed as it does).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from hypercorn.asyncio import tcp_server

from service.http.hypercorn_patching import should_patch

_INSTALLED = "_service_keep_alive_timer"
# What the timer replaces (``_idle_timeout``) and calls (``_initiate_server_close``) on Hypercorn's TCPServer; without
# one of them, Hypercorn's own timer is left in place.
_SERVER_ATTRIBUTES = ("_initiate_server_close", "_idle_timeout")


class _IdleConnections:
    """The armed timers of one worker (one ``WorkerContext``), and the task that closes the idle ones when it
    terminates."""

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.timers: set[KeepAliveTimer] = set()
        # held here: the loop keeps only a weak reference to a task
        self.watcher = loop.create_task(self._close_idle_when_terminated(context))

    async def _close_idle_when_terminated(self, context: Any) -> None:
        await context.terminated.wait()
        for timer in list(self.timers):
            if timer.idle:
                timer.expire()


_WORKERS: weakref.WeakKeyDictionary[Any, _IdleConnections] = weakref.WeakKeyDictionary()


class KeepAliveTimer:
    """Hypercorn's ``SingleTask`` interface (``restart``, ``stop``) for ``TCPServer.idle_task``.

    Lazy: a request or an answer only notes the time (or that the connection is busy); the timer handle, armed
    once, looks at that when it fires and sets itself again for what is left. Re-arming a handle per request cost
    about 8 us of a 150 us request under uvloop (py-spy), most of what Hypercorn's own timer had cost."""

    __slots__ = ("_connections", "_handle", "_idle_since", "_server", "_task_group")

    def __init__(self, server: Any) -> None:
        self._server = server
        self._connections = _idle_connections(server)
        self._handle: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None  # loop time of the last answer; None while a request is open
        self._task_group: Any = None

    @property
    def armed(self) -> bool:
        return self._handle is not None

    @property
    def idle(self) -> bool:
        return self._idle_since is not None

    async def restart(self, task_group: Any, action: Any) -> None:
        """The connection is idle: close it in ``keep_alive_timeout`` unless a request comes first. ``action`` is
        Hypercorn's own ``_idle_timeout``, which this replaces."""
        server = self._server
        self._task_group = task_group
        if server.context.terminated.is_set():  # shutting down: an idle connection is closed at once
            self.expire()
            return
        self._idle_since = server.loop.time()
        if self._handle is None:
            self._arm(server.config.keep_alive_timeout)

    async def stop(self) -> None:
        """A request came, or the connection is closing (Hypercorn closes its writer first): then nothing is left to
        time, and the handle goes at once rather than keep the connection's objects until it fires."""
        self._idle_since = None
        if self._handle is not None and self._server.writer.is_closing():
            self._disarm()

    def expire(self) -> None:
        """Close the connection (it stayed idle for the keep-alive, or the worker terminates)."""
        self._idle_since = None
        self._disarm()
        if self._server.writer.is_closing():  # closing already (its client left): nothing to start
            return
        close = self._server._initiate_server_close()
        try:
            self._task_group.spawn(lambda: close)
        except RuntimeError:  # its task group has finished: the connection is closing already
            close.close()  # never awaited: closed here, not left to a warning

    def _arm(self, delay: float) -> None:
        self._handle = self._server.loop.call_later(delay, self._fire)
        self._connections.timers.add(self)

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._connections.timers.discard(self)

    def _fire(self) -> None:
        self._handle = None
        self._connections.timers.discard(self)
        server = self._server
        if server.writer.is_closing():
            return
        timeout = server.config.keep_alive_timeout
        if self._idle_since is None:  # busy: look again a keep-alive from now
            self._arm(timeout)
            return
        left = self._idle_since + timeout - server.loop.time()
        if left > 0:  # a request and its answer came since this was armed
            self._arm(left)
        else:
            self.expire()


def _idle_connections(server: Any) -> _IdleConnections:
    context = server.context
    connections = _WORKERS.get(context)
    if connections is None:
        connections = _WORKERS[context] = _IdleConnections(context, server.loop)
    return connections


def install() -> None:
    """Give every Hypercorn ``TCPServer`` made from now on this timer (idempotent). Left alone, with a warning,
    where Hypercorn no longer has what it replaces (``pyproject.toml`` holds Hypercorn below 0.19, whose private
    parts this was written against)."""
    server = tcp_server.TCPServer
    if not should_patch(server, _INSTALLED, _SERVER_ATTRIBUTES, "the services' keep-alive timer"):
        return
    original_init = server.__init__

    def init_with_keep_alive_timer(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.idle_task = KeepAliveTimer(self)

    server.__init__ = init_with_keep_alive_timer  # type: ignore[method-assign]
    setattr(server, _INSTALLED, True)
