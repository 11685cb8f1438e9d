"""Closed-loop load for the operations tests: each client sends, waits for the answer, records it, sends again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Outcome:
    client: int
    sent_at: float  # time.monotonic()
    done_at: float
    status: int | None  # None: no HTTP answer (``error`` says why)
    code: str | None = None  # the error body's code
    retry_after: str | None = None
    error: str | None = None
    body: dict[str, object] | None = None

    @property
    def latency_s(self) -> float:
        return self.done_at - self.sent_at


Send = Callable[[httpx.AsyncClient, int, int], Awaitable[httpx.Response]]  # (http, client, n) -> answer


async def closed_loop(
    base_url: str,
    send: Send,
    *,
    clients: int,
    stop: asyncio.Event,
    outcomes: list[Outcome],
    stop_on_refusal: bool = True,
    timeout_s: float = 120.0,
) -> None:
    """``clients`` loops until ``stop`` is set; with ``stop_on_refusal`` a client stops after a 503 or a transport
    error (as a load balancer takes a refusing backend out)."""

    async def one(client: int) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as http:
            n = 0
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    answer = await send(http, client, n)
                except httpx.TransportError as exc:
                    outcomes.append(Outcome(client, sent, time.monotonic(), None, error=type(exc).__name__))
                    if stop_on_refusal:
                        return
                    await asyncio.sleep(0.05)
                    continue
                n += 1
                outcomes.append(outcome_of(client, sent, answer))
                if answer.status_code == 503 and stop_on_refusal:
                    return

    await asyncio.gather(*(one(i) for i in range(clients)))


def outcome_of(client: int, sent: float, answer: httpx.Response) -> Outcome:
    done = time.monotonic()
    try:
        body = answer.json()
    except ValueError:
        body = None
    code = body.get("error", {}).get("code") if isinstance(body, dict) and answer.status_code >= 400 else None
    return Outcome(client, sent, done, answer.status_code, code, answer.headers.get("retry-after"), body=body)
