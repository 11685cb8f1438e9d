"""The Redis script pipeliner: one round trip per loop iteration, and a script Redis lost is loaded and re-sent only
for the calls that did not run (a route run twice would reserve its cost twice)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from redis.exceptions import NoScriptError

from service.dispatch.pipelining import ScriptPipeliner


class FakeRedis:
    """Runs ``evalsha`` calls by echoing their first argument; the calls at ``lost`` positions of the first
    pipeline answer NOSCRIPT, as when another connection flushes the scripts between two calls of one pipeline."""

    def __init__(self, lost: set[int]) -> None:
        self.lost = lost
        self.pipelines = 0
        self.ran: list[str] = []
        self.loads = 0

    def register_script(self, source: str) -> Any:
        return SimpleNamespace(sha="sha")

    async def script_load(self, source: str) -> str:
        self.loads += 1
        return "sha"

    def pipeline(self, transaction: bool) -> FakePipeline:
        self.pipelines += 1
        return FakePipeline(self, first=self.pipelines == 1)


class FakePipeline:
    def __init__(self, redis: FakeRedis, *, first: bool) -> None:
        self.redis = redis
        self.first = first
        self.calls: list[Sequence[str]] = []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def evalsha(self, sha: str, numkeys: int, *args: str) -> None:
        self.calls.append(args)

    async def execute(self, raise_on_error: bool) -> list[Any]:
        replies: list[Any] = []
        for position, args in enumerate(self.calls):
            if self.first and position in self.redis.lost:
                replies.append(NoScriptError("NOSCRIPT No matching script"))
            else:
                self.redis.ran.append(args[0])
                replies.append(f"ran {args[0]}")
        return replies


async def test_a_batch_shares_one_round_trip() -> None:
    redis = FakeRedis(lost=set())
    pipeliner = ScriptPipeliner(redis, "return 1")  # type: ignore[arg-type]
    replies = await asyncio.gather(*(pipeliner.call([str(n)]) for n in range(10)))
    assert replies == [f"ran {n}" for n in range(10)]
    assert redis.pipelines == 1
    assert redis.loads == 0


async def test_only_the_calls_redis_could_not_run_are_sent_again() -> None:
    redis = FakeRedis(lost={3, 4, 5, 6, 7, 8, 9})  # the scripts vanished after the third call had run
    pipeliner = ScriptPipeliner(redis, "return 1")  # type: ignore[arg-type]
    replies = await asyncio.gather(*(pipeliner.call([str(n)]) for n in range(10)))
    assert replies == [f"ran {n}" for n in range(10)]  # every caller gets its own call's reply
    assert sorted(redis.ran, key=int) == [str(n) for n in range(10)]  # each ran exactly once
    assert redis.loads == 1
    assert redis.pipelines == 2
