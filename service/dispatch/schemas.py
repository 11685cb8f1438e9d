"""Request parsing and answer shapes for the dispatcher's HTTP API. Unknown fields are ignored everywhere, so
clients that send more (Vast's SDK adds ``replay_timeout``) keep working."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.dispatch.records import Assigned, NoReadyWorker, WorkerRecord, WorkerReport, WorkerState
from service.dispatch.signing import Assignment, Signature, is_safe_text
from service.dispatch.worker_url import canonical_url
from service.errors import InvalidRequest, Unauthorized

MAX_REQUEST_IDX = 2**53  # JSON numbers above this lose precision in many clients
MAX_IN_FLIGHT = 2**53  # a count the operator view sends back: the same bound, for the same reason
# A reqnum is unix time x records.REQNUMS_PER_SECOND plus a count, below this until the year 2255; above it, a Redis
# zset score (a double) would no longer hold it exactly
MAX_REQNUM = 2**53
MAX_ID_CHARS = 256
MAX_URL_CHARS = 2048
MAX_RELEASE_BATCH = 10_000
# Idempotency-Key (IETF httpapi draft): a structured-field string, so visible ASCII without '"' or '\\'
MAX_IDEMPOTENCY_KEY_CHARS = 255
_IDEMPOTENCY_KEY = re.compile(rf"[\x21\x23-\x5b\x5d-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_CHARS}}}")
# The error ``reason`` of a retry whose request_idx the dispatcher no longer knows (expired, or its state was lost):
# nothing is held for it any more, so a client routes the request again as a new one.
UNKNOWN_REQUEST_IDX = "unknown_request_idx"


@dataclass(frozen=True, slots=True)
class RouteRequest:
    endpoint: str
    api_key: str
    cost: float
    request_idx: int | None  # None (or 0 on the wire): a new request
    # names a new request: sent again while that is held, the same call (that request, on its worker); not consulted
    # beside a request_idx
    idempotency_key: str | None = None


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def parse_route_request(
    data: Mapping[str, Any],
    *,
    authorization: str | None,
    query_api_key: str | None,
    max_cost: float,
    idempotency_key: str | None = None,
) -> RouteRequest:
    """The body of ``POST /route/``; the key may be in the body, a Bearer header or the ``api_key`` query
    parameter, in that order of precedence. ``idempotency_key``: the ``Idempotency-Key`` header, if any."""
    endpoint = _text(data, "endpoint", MAX_ID_CHARS)
    # + 0.0: -0.0 becomes 0.0, as the signed cost would otherwise read "-0", which workers need not expect
    cost = _bounded(_number(data, "cost"), "cost", max_cost) + 0.0
    request_idx = _optional_int(data, "request_idx")
    if request_idx is not None and not 0 <= request_idx <= MAX_REQUEST_IDX:
        raise InvalidRequest(f"'request_idx' must be an integer between 0 and {MAX_REQUEST_IDX}")
    body_key = data.get("api_key")
    if body_key is not None and not isinstance(body_key, str):
        raise InvalidRequest("'api_key' must be a string")
    api_key = body_key or bearer_token(authorization) or query_api_key
    if not api_key:
        raise Unauthorized("an api_key is required (body, 'Authorization: Bearer', or ?api_key=)")
    # Vast's SDK sends request_idx 0 on a first call: that is a new request, not a retry of request 0.
    return RouteRequest(
        endpoint=endpoint,
        api_key=api_key,
        cost=cost,
        request_idx=request_idx or None,
        idempotency_key=parse_idempotency_key(idempotency_key),
    )


def parse_idempotency_key(header: str | None) -> str | None:
    """The ``Idempotency-Key`` header's key: quoted as the IETF draft writes it, or bare as most clients send it."""
    if header is None:
        return None
    key = header.strip(" \t")  # HTTP's optional whitespace, nothing else
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequest(
            f"'Idempotency-Key' must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters"
            " other than '\"' and '\\''"
        )
    return key


def parse_worker_report(data: Mapping[str, Any], *, max_value: float) -> tuple[str, WorkerReport]:
    """The body of ``POST /worker_status/``: (endpoint, report). ``max_value`` bounds ``max_perf`` and ``cur_load``
    (``--max-report-value``): sums and means of unbounded ones overflow to inf in autoscaling."""
    endpoint = _text(data, "endpoint", MAX_ID_CHARS)
    worker_id = _worker_id(data)
    url = _worker_url(_text(data, "url", MAX_URL_CHARS))
    raw_state = data.get("state")
    try:
        state = WorkerState(str(raw_state))
    except ValueError:
        allowed = ", ".join(s.value for s in WorkerState)
        raise InvalidRequest(f"'state' must be one of {allowed}") from None
    max_perf = _bounded(_number(data, "max_perf"), "max_perf", max_value)
    cur_load = _bounded(_number(data, "cur_load", default=0.0), "cur_load", max_value)
    in_flight = _optional_int(data, "in_flight") or 0
    if not 0 <= in_flight <= MAX_IN_FLIGHT:
        raise InvalidRequest(f"'in_flight' must be an integer between 0 and {MAX_IN_FLIGHT}")
    reqnum_floor = _optional_int(data, "reqnum_floor")
    if reqnum_floor is not None and not 0 <= reqnum_floor <= MAX_REQNUM:
        raise InvalidRequest(f"'reqnum_floor' must be an integer between 0 and {MAX_REQNUM}")
    if state is WorkerState.READY and not max_perf > 0:
        # picking divides by it: a ready worker without speed could never be given a request
        raise InvalidRequest("'max_perf' must be > 0 for a worker reporting state 'ready'")
    report = WorkerReport(
        worker_id, url, state, max_perf=max_perf, cur_load=cur_load, in_flight=in_flight, reqnum_floor=reqnum_floor
    )
    return endpoint, report


def parse_release(data: Mapping[str, Any]) -> tuple[str, list[int], bool, str | None]:
    """The body of ``POST /delete_requests/``: (endpoint, request_idxs, success, the releasing worker's id if given)."""
    endpoint = _text(data, "endpoint", MAX_ID_CHARS)
    worker_id = None if data.get("id") is None else _worker_id(data)
    idxs = data.get("request_idxs")
    if not isinstance(idxs, list) or len(idxs) > MAX_RELEASE_BATCH:
        raise InvalidRequest(f"'request_idxs' must be a list of at most {MAX_RELEASE_BATCH} integers")
    numbers = [_integer(i) for i in idxs]
    checked = [i for i in numbers if i is not None and 0 < i <= MAX_REQUEST_IDX]
    if len(checked) != len(numbers):
        raise InvalidRequest(f"'request_idxs' must hold integers between 1 and {MAX_REQUEST_IDX}")
    success = data.get("success", True)
    if not isinstance(success, bool):
        raise InvalidRequest("'success' must be a boolean")
    return endpoint, checked, success, worker_id


def assigned_answer(assignment: Assignment, signature: Signature, request_id: str) -> dict[str, Any]:
    answer = {
        "endpoint": assignment.endpoint,
        "url": assignment.url,
        "cost": assignment.cost,
        "reqnum": assignment.reqnum,
        "request_idx": assignment.request_idx,
        "signature": signature.hex,
        "key_id": assignment.key_id,
        "expires_at_ms": assignment.expires_at_ms,
        "__request_id": request_id,
    }
    if signature.batch is not None:
        answer["batch"] = signature.batch.to_json()
    return answer


def no_ready_answer(endpoint: str, outcome: NoReadyWorker, request_id: str) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "status": outcome.status,
        "request_idx": outcome.request_idx,
        "__request_id": request_id,
    }


def assignment_for(endpoint: str, outcome: Assigned, cost: float, *, expires_at_ms: int, key_id: str) -> Assignment:
    return Assignment(
        endpoint=endpoint,
        url=outcome.url,
        cost=cost,
        reqnum=outcome.reqnum,
        request_idx=outcome.request_idx,
        expires_at_ms=expires_at_ms,
        key_id=key_id,
    )


# -- field readers ----------------------------------------------------------------------------------------------
def _worker_id(data: Mapping[str, Any]) -> str:
    worker_id = _text(data, "id", MAX_ID_CHARS)
    if not is_safe_text(worker_id):
        raise InvalidRequest("'id' must be printable ASCII without quotes or backslashes")
    return worker_id


def _worker_url(text: str) -> str:
    """The URL in its one spelling (``worker_url.canonical_url``): assignments carry it so, the URL is bound to its
    worker so, and workers compare it so."""
    try:
        return canonical_url(text)
    except ValueError as exc:
        raise InvalidRequest(f"'url' {exc}") from None


def _text(data: Mapping[str, Any], name: str, max_chars: int) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'{name}' is required and must be a non-empty string")
    if len(value) > max_chars:
        raise InvalidRequest(f"'{name}' is longer than {max_chars} characters")
    return value


def _number(data: Mapping[str, Any], name: str, default: float | None = None) -> float:
    value = data.get(name)
    if value is None:
        if default is None:
            raise InvalidRequest(f"'{name}' is required and must be a number")
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range (orjson refuses those, direct callers may not)
        raise InvalidRequest(f"'{name}' is out of range") from None
    if not math.isfinite(number):
        raise InvalidRequest(f"'{name}' must be finite")
    return number


def _bounded(number: float, name: str, max_value: float) -> float:
    if not 0 <= number <= max_value:
        raise InvalidRequest(f"'{name}' must be between 0 and {max_value:g}")
    return number


def _optional_int(data: Mapping[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    number = _integer(value)
    if number is None:
        raise InvalidRequest(f"'{name}' must be an integer")
    return number


def _integer(value: object) -> int | None:
    """``value`` as an int, None if it is not one. A float with no fractional part counts (JSON Schema's
    ``integer``, which the OpenAPI document promises, takes 5.0, and some clients write every number so); in the
    ranges the callers allow (at most 2**53) each such float is exactly its integer. Never a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():  # False for inf and nan
        return int(value)
    return None


def worker_json(record: WorkerRecord, *, now: float, heartbeat_timeout_s: float) -> dict[str, Any]:
    return {
        "id": record.worker_id,
        "url": record.url,
        "state": record.state.value,
        "active": record.active(now, heartbeat_timeout_s),
        "max_perf": record.max_perf,
        "cur_load": record.cur_load,
        "in_flight": record.in_flight,
        "load": record.load,
        "open_requests": record.open_requests,
        "reqnum": record.reqnum,
        "last_seen_s_ago": round(max(0.0, now - record.last_seen), 3),
    }
