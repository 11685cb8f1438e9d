"""Client for the dispatcher: route a request, send it to the worker named, and retry the way the dispatcher
expects.

The dispatcher tracks each request's load under its ``request_idx``. A retry therefore re-routes *with the same
request_idx*: the dispatcher then moves the load to the newly picked worker (and avoids the one that failed)
instead of counting the request twice. A fresh request_idx on retry would leak load until its TTL.

Every route call of one request carries the same ``Idempotency-Key``: a first call whose answer was lost (a
timeout, a dropped connection, a body cut off) reserved load under a request_idx the client never learnt, and the
dispatcher answers the repeat with that request instead of a second one.

Retried (after full-jitter exponential back-off, or the server's ``Retry-After`` when it sends one): a "no ready
worker" answer, a dispatcher 429/5xx, transport error or unreadable answer, a worker transport error (or a URL httpx
cannot request), 429 or 5xx, and a worker 401 ``invalid_assignment`` (e.g. the assignment expired on the way, or the
worker has not seen a key rotation yet). A retry whose request_idx the dispatcher no longer knows (it expired after
the dispatcher's request TTL, or a dispatcher on in-memory state restarted) holds no load any more: the next attempt
routes the request as a new one. Not retried: dispatcher 4xx other than those (bad key, bad request: retrying cannot
help), worker 4xx other than those above, which are the worker's answer to the payload and are returned as they are,
and a worker's answer that arrived but cannot be read (a broken encoding, a body cut off: ``DispatchError``), since
the work it answers may be done; a transport error after the worker's status line counts as such an answer.

A server's ``Retry-After`` is waited, plus up to a fifth more at random, so that clients refused together do not all
come back in the same instant.

"No ready worker" answers are polled for up to ``wait_for_worker_s`` of back-off (a worker's cold start takes
minutes), not counted among the ``max_attempts`` failures: counted there, a client gave up after about 5 s and
left its request open at the dispatcher until the request ttl.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import httpx

from service.dispatch.schemas import UNKNOWN_REQUEST_IDX
from service.dispatch.signing import Assignment
from service.errors import InvalidAssignment

ROUTE_PATH = "/route/"
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_WAIT_FOR_WORKER_S = 300.0  # back-off spent polling "no ready worker" before giving up
DEFAULT_BACKOFF_BASE_S = 0.1
DEFAULT_BACKOFF_MAX_S = 5.0
MIN_BACKOFF_S = 0.001
DEFAULT_RETRY_AFTER_MAX_S = 30.0  # a Retry-After above this is waited only this long
RETRY_AFTER_JITTER = 0.2  # a Retry-After is stretched by up to this fraction, at random
DEFAULT_ROUTE_TIMEOUT_S = 10.0
DEFAULT_WORKER_TIMEOUT_S = 300.0  # a worker call is a whole inference
# a worker's answer is read into memory: any worker URL a worker token reported could send one without end
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_BACKOFF_DOUBLINGS = 32  # beyond this the cap is backoff_max_s anyway; keeps 2**n small
HTTP_OK = 200
HTTP_UNAUTHORIZED = 401
HTTP_TOO_MANY_REQUESTS = 429
HTTP_SERVER_ERROR = 500
INVALID_ASSIGNMENT = InvalidAssignment.code  # what a worker answers when it refuses an assignment
ERROR_TEXT_LIMIT = 200  # characters of a non-JSON error body kept in the message

Sleep = Callable[[float], Awaitable[None]]


class DispatchError(Exception):
    """Routing or serving a request failed; the message says how."""


class DispatcherRefused(DispatchError):
    """The dispatcher answered an HTTP error (``{"error": {"code", "message"}}``)."""

    def __init__(
        self, status: int, code: str, message: str, retry_after_s: float | None = None, reason: str | None = None
    ) -> None:
        super().__init__(f"dispatcher answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.reason = reason  # the error body's machine-readable ``reason``, where it has one

    @property
    def retryable(self) -> bool:
        return is_retryable_status(self.status)


class AttemptsExhausted(DispatchError):
    """Every attempt failed; ``failures`` says why each did, ``last_status`` is the last no-ready breakdown."""

    def __init__(
        self,
        endpoint: str,
        request_idx: int | None,
        failures: tuple[str, ...],
        last_status: Mapping[str, int] | None,
    ) -> None:
        status = "" if last_status is None else f"; last worker status: {_format_status(last_status)}"
        super().__init__(
            f"endpoint {endpoint!r} request_idx {request_idx}: gave up after {len(failures)} attempts "
            f"({'; '.join(failures)}){status}"
        )
        self.endpoint = endpoint
        self.request_idx = request_idx
        self.failures = failures
        self.last_status = last_status

    @property
    def attempts(self) -> int:
        return len(self.failures)


@dataclass(frozen=True, slots=True)
class WorkerResponse:
    """A worker's answer, with the assignment it was sent under and how many attempts it took."""

    status: int
    body: bytes
    content_type: str
    assignment: Assignment
    route_answer: Mapping[str, Any]
    attempts: int

    def json(self) -> Any:
        # the standard parser, as httpx's Response.json(): orjson would turn integers past 64 bits into floats
        return json.loads(self.body)


@dataclass(slots=True)
class _Progress:
    """What one ``request`` call has learnt so far."""

    request_idx: int | None = None
    idempotency_key: str = field(default_factory=lambda: uuid.uuid4().hex)  # one per request, on every route call
    failures: list[str] = field(default_factory=list)
    last_status: dict[str, int] | None = None
    retry_after_s: float | None = None
    no_ready: bool = False  # the last attempt was answered "no ready worker"

    def fail(self, reason: str, retry_after_s: float | None = None, *, no_ready: bool = False) -> None:
        self.failures.append(reason)
        self.retry_after_s = retry_after_s
        self.no_ready = no_ready


def is_retryable_status(status: int) -> bool:
    return status == HTTP_TOO_MANY_REQUESTS or status >= HTTP_SERVER_ERROR


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or bad."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def join_url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


def _format_status(status: Mapping[str, int]) -> str:
    return " ".join(f"{name}={count}" for name, count in status.items())


def _error_fields(response: httpx.Response) -> tuple[str, str, str | None]:
    """``(code, message, reason)`` of an error answer, whatever its body (``reason``: None where it has none)."""
    try:
        error = response.json().get("error")
        reason = error.get("reason")
        return str(error["code"]), str(error.get("message", "")), reason if isinstance(reason, str) else None
    except (ValueError, AttributeError, TypeError, KeyError):
        return "http_error", response.text[:ERROR_TEXT_LIMIT], None


class DispatchClient:
    """Routes requests through the dispatcher at ``dispatcher_url`` with a client ``api_key``."""

    def __init__(
        self,
        dispatcher_url: str,
        api_key: str,
        *,
        http: httpx.AsyncClient | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        wait_for_worker_s: float = DEFAULT_WAIT_FOR_WORKER_S,
        backoff_base_s: float = DEFAULT_BACKOFF_BASE_S,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        retry_after_max_s: float = DEFAULT_RETRY_AFTER_MAX_S,
        route_timeout_s: float = DEFAULT_ROUTE_TIMEOUT_S,
        worker_timeout_s: float | None = DEFAULT_WORKER_TIMEOUT_S,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not (backoff_base_s >= MIN_BACKOFF_S and backoff_max_s >= MIN_BACKOFF_S):
            # no-ready polls are budgeted by the back-off they wait: a zero back-off polled without end
            raise ValueError(f"back-off times must be at least {MIN_BACKOFF_S:g} s")
        if retry_after_max_s < 0 or wait_for_worker_s < 0:
            raise ValueError("waiting times must be >= 0")
        self._route_url = join_url(dispatcher_url, ROUTE_PATH)
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient()
        self._max_attempts = max_attempts
        self._wait_for_worker_s = wait_for_worker_s
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._retry_after_max_s = retry_after_max_s
        self._route_timeout_s = route_timeout_s
        self._worker_timeout_s = worker_timeout_s
        self._max_response_bytes = max_response_bytes
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep

    async def __aenter__(self) -> DispatchClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # -- one route call ---------------------------------------------------------------------------------------
    async def route(
        self, endpoint: str, cost: float, request_idx: int | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """One ``POST /route/``: the raw answer (assigned, or no ready worker). Raises ``DispatcherRefused`` on an
        HTTP error, ``DispatchError`` on a malformed answer, ``httpx.HTTPError`` when unreachable or the answer
        cannot be read."""
        body: dict[str, Any] = {"endpoint": endpoint, "cost": cost}
        if request_idx is not None:
            body["request_idx"] = request_idx
        headers = self._headers if idempotency_key is None else {**self._headers, "Idempotency-Key": idempotency_key}
        response = await self._http.post(self._route_url, json=body, headers=headers, timeout=self._route_timeout_s)
        if response.status_code != HTTP_OK:
            code, message, reason = _error_fields(response)
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise DispatcherRefused(response.status_code, code, message, retry_after, reason)
        try:
            answer = response.json()
        except ValueError:
            raise DispatchError("dispatcher answered 200 with a body that is not JSON") from None
        request_idx = answer.get("request_idx") if isinstance(answer, dict) else None
        if not isinstance(request_idx, int) or isinstance(request_idx, bool):
            raise DispatchError("route answer is not a JSON object with an integer request_idx")
        return answer

    # -- a whole request, with retries ------------------------------------------------------------------------
    async def request(self, endpoint: str, route_path: str, payload: object, cost: float) -> WorkerResponse:
        """Route, send ``payload`` to the assigned worker at ``route_path``, retrying as the module says.

        Raises ``DispatcherRefused`` at once for a dispatcher 4xx other than 429 and an unknown request_idx,
        ``AttemptsExhausted`` (a ``DispatchError``) when ``max_attempts`` attempts failed, or no worker was ready
        for ``wait_for_worker_s`` of polling."""
        progress = _Progress()
        attempt = failed = 0
        polled_s = 0.0  # back-off waited on "no ready worker" answers
        while True:
            if attempt:
                delay = self.backoff_delay(attempt, progress.retry_after_s)
                if progress.no_ready:
                    if polled_s + delay > self._wait_for_worker_s:
                        break
                    polled_s += delay
                elif failed >= self._max_attempts:
                    break
                await self._sleep(delay)
            attempt += 1
            served = await self._attempt(progress, endpoint, route_path, payload, cost)
            if served is not None:
                assignment, answer, response = served
                return WorkerResponse(
                    status=response.status_code,
                    body=response.content,
                    content_type=response.headers.get("content-type", ""),
                    assignment=assignment,
                    route_answer=answer,
                    attempts=attempt,
                )
            failed += not progress.no_ready
        raise AttemptsExhausted(endpoint, progress.request_idx, tuple(progress.failures), progress.last_status)

    def backoff_delay(self, retry: int, retry_after_s: float | None = None) -> float:
        """Seconds before retry number ``retry`` (1-based): the server's ``Retry-After`` (capped at
        ``retry_after_max_s``, and at least ``backoff_base_s``: ``Retry-After: 0`` must not make a busy loop)
        stretched by up to ``RETRY_AFTER_JITTER`` when given, else full jitter, uniform in
        [0, min(max, base * 2**(retry-1))]."""
        if retry_after_s is not None:
            wait = max(min(retry_after_s, self._retry_after_max_s), self._backoff_base_s)
            return wait * (1.0 + self._rng.uniform(0.0, RETRY_AFTER_JITTER))
        doublings = min(retry - 1, MAX_BACKOFF_DOUBLINGS)
        return self._rng.uniform(0.0, min(self._backoff_max_s, self._backoff_base_s * 2**doublings))

    async def _attempt(
        self, progress: _Progress, endpoint: str, route_path: str, payload: object, cost: float
    ) -> tuple[Assignment, dict[str, Any], httpx.Response] | None:
        """One route + worker call; None (with the failure recorded) when it should be retried."""
        answer = await self._route_once(progress, endpoint, cost)
        if answer is None:
            return None
        url = answer.get("url")
        if not isinstance(url, str):
            status = answer.get("status")
            progress.last_status = dict(status) if isinstance(status, dict) else None
            progress.fail(f"no ready worker ({_format_status(progress.last_status or {})})", no_ready=True)
            return None
        try:
            assignment = Assignment.from_mapping(answer)
        except ValueError as exc:
            raise DispatchError(f"route answer is not a valid assignment: {exc}") from None
        try:
            request = self._http.build_request(
                "POST",
                join_url(url, route_path),
                json={"auth_data": answer, "payload": payload},
                timeout=self._worker_timeout_s,
            )
            response = await self._http.send(request, stream=True)  # the status first: it says what a retry risks
        except (httpx.TransportError, httpx.InvalidURL) as exc:  # unreachable, or a URL httpx refuses: another try
            progress.fail(f"worker {url}: {type(exc).__name__}")
            return None
        try:
            await _read_at_most(response, self._max_response_bytes, url)
        except httpx.HTTPError as exc:
            if not is_retryable_status(response.status_code):
                # it answered, unreadably (a broken encoding, a body cut off): the work may be done, so running it
                # again is no cure
                raise DispatchError(
                    f"worker {url} answered {response.status_code} unreadably: {type(exc).__name__}: {exc}"
                ) from None
            progress.fail(f"worker {url}: {response.status_code}, body unread: {type(exc).__name__}")
            return None
        finally:
            await response.aclose()
        if _worker_should_retry(response):
            code, _, _ = _error_fields(response)
            progress.fail(
                f"worker {url}: {response.status_code} {code}", parse_retry_after(response.headers.get("retry-after"))
            )
            return None
        return assignment, answer, response

    async def _route_once(self, progress: _Progress, endpoint: str, cost: float) -> dict[str, Any] | None:
        try:
            answer = await self.route(endpoint, cost, progress.request_idx, progress.idempotency_key)
        except DispatcherRefused as exc:
            if exc.reason == UNKNOWN_REQUEST_IDX and progress.request_idx is not None:
                progress.fail(f"dispatcher: request_idx {progress.request_idx} is no longer known; routing anew")
                progress.request_idx = None
                return None
            if not exc.retryable:
                raise
            progress.fail(f"dispatcher: {exc.status} {exc.code}", exc.retry_after_s)
            return None
        except httpx.HTTPError as exc:  # unreachable, or answered unreadably: the Idempotency-Key makes a retry safe
            progress.fail(f"dispatcher: {type(exc).__name__}")
            return None
        if progress.request_idx is None:
            progress.request_idx = answer["request_idx"]
        return answer


async def _read_at_most(response: httpx.Response, limit: int, url: str) -> None:
    """``response.aread()`` that stops past ``limit`` bytes with a ``DispatchError`` (the work may be done: no
    retry)."""
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise DispatchError(f"worker {url} answered over {limit} bytes ({response.status_code}); not read")
        chunks.append(chunk)
    response._content = b"".join(chunks)  # what aread() keeps: response.content and .json() then work as after it


def _worker_should_retry(response: httpx.Response) -> bool:
    if is_retryable_status(response.status_code):
        return True
    return response.status_code == HTTP_UNAUTHORIZED and _error_fields(response)[0] == INVALID_ASSIGNMENT
