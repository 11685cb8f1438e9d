"""The same client interface on aiohttp (keep-alive pool): the reference the lean client is checked against."""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp

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

    async def send(self, index: int) -> tuple[int, int]:
        async with self._session.post(self._url, data=self._bodies[index], headers=_HEADERS) as resp:
            body = await resp.read()
            return resp.status, len(body)

    async def aclose(self) -> None:
        await self._session.close()
