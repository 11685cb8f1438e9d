"""Close a connection when its client closes it: a fix for Hypercorn's keep-alive timer, installed by the servers.

Hypercorn (0.17, 0.18) releases a connection's socket only when every task of that connection is done, and its
keep-alive timer is one of them: after the client closed the connection, the socket stayed in CLOSE-WAIT, holding a
file descriptor, until the timer ran out. The services keep idle connections for 75 s (above load balancers' idle
timeouts, so that the balancer closes first), so each connection a client closed held a descriptor for 75 s: under
``ulimit -n 256``, 400 one-request connections left 240 sockets held and the server refusing even ``/health``.
Stopping the timer once the client's end of the stream is read lets the connection close at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio import tcp_server

_INSTALLED = "_service_stops_idle_timer_at_eof"


def install() -> None:
    """Patch ``TCPServer._read_data`` (idempotent). Left alone where Hypercorn no longer has it."""
    server = tcp_server.TCPServer
    original: Callable[[Any], Awaitable[None]] | None = getattr(server, "_read_data", None)
    if original is None or getattr(server, _INSTALLED, False):
        return

    async def read_data_then_stop_idle_timer(self: Any) -> None:
        await original(self)
        idle_task = getattr(self, "idle_task", None)
        if idle_task is not None:
            await idle_task.stop()

    server._read_data = read_data_then_stop_idle_timer  # type: ignore[method-assign]
    setattr(server, _INSTALLED, True)
