"""Concurrent calls of one Redis Lua script, sent as one pipeline per event-loop iteration.

Every ``/route/`` is one script call. Under load many arrive in the same loop iteration; sending them one by one
costs a pool checkout, a write and a read each, which is most of the dispatcher's CPU per route on Redis. Queued
and flushed one callback later (no timer), they share one round trip. Each script still runs atomically on its
own: a pipeline is not a transaction and needs none here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Call = tuple[Sequence[str], "asyncio.Future[Any]"]


class ScriptPipeliner:
    def __init__(self, redis: Redis, source: str) -> None:
        self._redis = redis
        self._source = source
        self._sha = redis.register_script(source).sha
        self._pending: list[Call] = []
        self._inflight: set[asyncio.Task[None]] = set()

    async def call(self, args: Sequence[str]) -> Any:
        """The script's reply for ``args`` (no KEYS); a Redis failure is raised to this caller."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((args, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _send(self, batch: list[Call]) -> None:
        try:
            replies = await self._execute([args for args, _ in batch])
            missed = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missed:  # Redis restarted or was flushed, maybe mid-batch: the calls that ran must not run twice
                await self._redis.script_load(self._source)
                for i, reply in zip(missed, await self._execute([batch[i][0] for i in missed]), strict=True):
                    replies[i] = reply
        except Exception as exc:  # the connection failed: every caller of the batch hears it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller was cancelled; its script ran all the same
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _execute(self, calls: list[Sequence[str]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for args in calls:
                pipe.evalsha(self._sha, 0, *args)
            return list(await pipe.execute(raise_on_error=False))
