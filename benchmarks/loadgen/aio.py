"""The same client interface on aiohttp (keep-alive pool): the reference the lean client is checked against."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiohttp

from benchmarks.loadgen.timing import Answer, now

_HEADERS = {"Content-Type": "application/json"}


class AiohttpClient:
    """POSTs ``bodies[i]`` to ``url`` through one ``ClientSession`` with at most ``connections`` connections."""

    def __init__(self, url: str, bodies: Sequence[bytes], connections: int) -> None:
        self._url = url
        self._bodies = bodies
        self._connector = aiohttp.TCPConnector(limit=connections, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=self._connector, timeout=aiohttp.ClientTimeout(total=None), skip_auto_headers=("User-Agent",)
        )
        self.connections_opened = 0  # aiohttp does not expose it
        # The connector's limit, held here too: a request past it waits on this semaphore, where the wait is seen.
        self._slots = asyncio.Semaphore(connections)

    async def send(self, index: int) -> Answer:
        async with self._slots:
            sent_at = now()
            async with self._session.post(self._url, data=self._bodies[index], headers=_HEADERS) as resp:
                body = await resp.read()
                return Answer(resp.status, len(body), sent_at)

    async def aclose(self) -> None:
        await self._session.close()
