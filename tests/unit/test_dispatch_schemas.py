"""Parsing the dispatcher's request bodies: what is accepted, normalised and refused."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from service.dispatch.openapi import IDEMPOTENCY_KEY_PATTERN, SAFE_ID_PATTERN, WORKER_URL_PATTERN, dispatcher_openapi
from service.dispatch.records import WorkerReport, WorkerState
from service.dispatch.schemas import (
    MAX_ID_CHARS,
    MAX_IN_FLIGHT,
    MAX_RELEASE_BATCH,
    MAX_REQNUM,
    MAX_REQUEST_IDX,
    UNKNOWN_REQUEST_IDX,
    RouteRequest,
    bearer_token,
    parse_idempotency_key,
    parse_release,
    parse_route_request,
    parse_worker_report,
)
from service.dispatch.signing import is_safe_text
from service.dispatch.verifier import RejectReason
from service.errors import InvalidRequest, Unauthorized
from service.http.openapi import ERROR_SCHEMA

MAX_COST = 1000.0
MAX_REPORT_VALUE = 1e6


def route(data: dict[str, Any], *, authorization: str | None = None, query: str | None = None) -> RouteRequest:
    return parse_route_request(data, authorization=authorization, query_api_key=query, max_cost=MAX_COST)


def body(**fields: Any) -> dict[str, Any]:
    return {"endpoint": "ep", "cost": 10.0, "api_key": "k-body", **fields}


# -- POST /route/ -----------------------------------------------------------------------------------------------
def test_a_plain_request() -> None:
    r = route(body(cost=3))
    assert (r.endpoint, r.api_key, r.cost, r.request_idx) == ("ep", "k-body", 3.0, None)
    assert isinstance(r.cost, float)


def test_api_key_precedence_body_then_bearer_then_query() -> None:
    assert route(body(), authorization="Bearer k-bearer", query="k-query").api_key == "k-body"
    no_body_key = body()
    del no_body_key["api_key"]
    assert route(no_body_key, authorization="Bearer k-bearer", query="k-query").api_key == "k-bearer"
    assert route(no_body_key, authorization="bearer  k-bearer ", query="k-query").api_key == "k-bearer"
    assert route(no_body_key, query="k-query").api_key == "k-query"
    assert route(no_body_key, authorization="Basic dXNlcjpwdw==", query="k-query").api_key == "k-query"
    assert route(no_body_key, authorization="Bearer ", query="k-query").api_key == "k-query"
    assert route(body(api_key=""), authorization="Bearer k-bearer").api_key == "k-bearer"


@pytest.mark.parametrize(
    ("authorization", "query"), [(None, None), ("Bearer ", None), ("Basic abc", None), (None, ""), ("Bearer", "")]
)
def test_a_missing_key_is_unauthorized(authorization: str | None, query: str | None) -> None:
    data = body()
    del data["api_key"]
    with pytest.raises(Unauthorized):
        route(data, authorization=authorization, query=query)
    with pytest.raises(Unauthorized):
        route(body(api_key=None), authorization=authorization, query=query)


def test_a_non_string_body_key_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="api_key"):
        route(body(api_key=123))


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("BEARER abc") == "abc"
    assert bearer_token("Token abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token("") is None
    assert bearer_token(None) is None


@pytest.mark.parametrize(("given", "parsed"), [(0, None), (None, None), (1, 1), (2421, 2421), (MAX_REQUEST_IDX,) * 2])
def test_request_idx_zero_or_null_is_a_new_request(given: int | None, parsed: int | None) -> None:
    assert route(body(request_idx=given)).request_idx == parsed


@pytest.mark.parametrize("bad", [-1, True, False, -1.0, 1.5, "3", [1], MAX_REQUEST_IDX + 1, float(MAX_REQUEST_IDX + 2)])
def test_bad_request_idx_is_invalid(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="request_idx"):
        route(body(request_idx=bad))


@pytest.mark.parametrize("bad", [-1, MAX_REQUEST_IDX + 1, 2**64])
def test_an_out_of_range_request_idx_is_told_the_range(bad: int) -> None:
    # "must be a non-negative integer" misled for 2**53 + 1, which is one
    with pytest.raises(InvalidRequest, match=f"between 0 and {MAX_REQUEST_IDX}$"):
        route(body(request_idx=bad))
    with pytest.raises(InvalidRequest, match=f"between 1 and {MAX_REQUEST_IDX}$"):
        parse_release({"endpoint": "ep", "request_idxs": [bad]})


@pytest.mark.parametrize("bad", [True, False, "10", "abc", -0.001, -1, float("inf"), float("-inf"), float("nan"),
                                 MAX_COST + 0.001, 10**20, [1], {"units": 1}])  # fmt: skip
def test_bad_cost_is_invalid(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="cost"):
        route(body(cost=bad))


def test_cost_is_required_and_its_bounds_are_inclusive() -> None:
    data = body()
    del data["cost"]
    with pytest.raises(InvalidRequest, match="cost"):
        route(data)
    with pytest.raises(InvalidRequest, match="cost"):
        route(body(cost=None))
    assert route(body(cost=0)).cost == 0.0
    assert route(body(cost=MAX_COST)).cost == MAX_COST


def test_a_negative_zero_cost_is_zero() -> None:
    # signed as "%.17g" of the cost, -0.0 would read "-0"
    cost = route(body(cost=-0.0)).cost
    assert cost == 0.0 and math.copysign(1.0, cost) == 1.0


def test_unknown_fields_are_ignored() -> None:
    r = route(body(request_idx=0, replay_timeout=60, session_id=None, payload={"x": [1]}))
    assert (r.endpoint, r.cost, r.request_idx) == ("ep", 10.0, None)


@pytest.mark.parametrize("bad", [None, "", 5, ["ep"], "x" * 257])
def test_bad_endpoint_is_invalid(bad: object) -> None:
    data = body(endpoint=bad)
    if bad is None:
        del data["endpoint"]
    with pytest.raises(InvalidRequest, match="endpoint"):
        route(data)


def test_the_longest_endpoint_is_accepted() -> None:
    assert route(body(endpoint="x" * 256)).endpoint == "x" * 256


def test_invalid_fields_are_reported_before_a_missing_key() -> None:
    with pytest.raises(InvalidRequest):
        route({"endpoint": "ep", "cost": -1})


# -- POST /worker_status/ ---------------------------------------------------------------------------------------
def parse_report(data: dict[str, Any]) -> tuple[str, WorkerReport]:
    return parse_worker_report(data, max_value=MAX_REPORT_VALUE)


def report(**fields: Any) -> dict[str, Any]:
    return {"endpoint": "ep", "id": "w1", "url": "http://10.0.0.5:8000/", "state": "ready", "max_perf": 50, **fields}


def test_a_worker_report() -> None:
    endpoint, r = parse_report(report(cur_load=2.5, in_flight=3, extra="ignored"))
    assert endpoint == "ep"
    assert (r.worker_id, r.url, r.state) == ("w1", "http://10.0.0.5:8000", WorkerState.READY)  # trailing / dropped
    assert (r.max_perf, r.cur_load, r.in_flight) == (50.0, 2.5, 3)
    assert parse_report(report(url="http://proxy:81/workers/w1/"))[1].url == "http://proxy:81/workers/w1"  # a prefix
    # one spelling (service/dispatch/worker_url.py): scheme and host lowercased, the default port dropped
    assert parse_report(report(url="HTTP://Proxy:80/Workers/W1"))[1].url == "http://proxy/Workers/W1"
    assert parse_report(report(url="http://[::1]:8000"))[1].url == "http://[::1]:8000"  # an IPv6 literal
    _, defaults = parse_report(report(url="https://w.example"))
    assert (defaults.url, defaults.cur_load, defaults.in_flight) == ("https://w.example", 0.0, 0)


@pytest.mark.parametrize("state", ["loading", "ready", "error", "stopped"])
def test_every_state_parses(state: str) -> None:
    assert parse_report(report(state=state))[1].state is WorkerState(state)


@pytest.mark.parametrize("bad", ["busy", "READY", "", None, 1, ["ready"]])
def test_bad_state_is_invalid(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="state"):
        parse_report(report(state=bad))


@pytest.mark.parametrize(
    "bad",
    ["10.0.0.5:8000", "ftp://10.0.0.5", "http://", 'http://10.0.0.5:8000/"x', "http://a\\b", "http://a b\n",
     "http://a\n", "http://w\u00e9.example", "", 5, "http://" + "a" * 2048, "http:// x y", "http://h:99999",
     "http://h:port", "https://:80",
     # clients get the URL (credentials leaked to them) and append their path to it (into a query or fragment)
     "http://user:secret@10.0.0.5:8000", "http://u@h", "http://h:1/?tenant=a", "http://h/x#frag", "http://h?",
     # hosts urlsplit takes and HTTP clients (httpx) refuse: every client sent there failed
     "http://[::1]x:1", "http://[::1]]:1", "http://[v1.x]:1", "http://[::g]:1", "http://h:1:2",
     "http://1.2.3.999:80", "http://256.1.1.1", "http://01.2.3.4:1",
     # IPv4 spellings other than the dotted quad, which clients read differently (and would alias another's URL)
     "http://127.1", "http://2130706433:80", "http://0x7f.0.0.1", "http://1.2.3.4.", "http://h:0", "http://w%31"],
)  # fmt: skip
def test_bad_url_is_invalid(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="url"):
        parse_report(report(url=bad))


@pytest.mark.parametrize("bad", ['w"1', "w\\1", "w\n", "w\u00e9", "", 1])
def test_bad_worker_id_is_invalid(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="id"):
        parse_report(report(id=bad))


@pytest.mark.parametrize(
    "fields",
    [{"max_perf": -1}, {"cur_load": -0.5}, {"in_flight": -1}, {"max_perf": None}, {"max_perf": "50"},
     {"max_perf": True}, {"in_flight": 1.5}, {"in_flight": True}, {"cur_load": float("nan")}],
)  # fmt: skip
def test_bad_numbers_are_invalid(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        parse_report(report(**fields))


@pytest.mark.parametrize("max_perf", [0, 0.0, -0.0])
def test_a_ready_worker_must_report_a_positive_max_perf(max_perf: float) -> None:
    # picking divides by max_perf: a ready worker without one would make every route answer "busy"
    with pytest.raises(InvalidRequest, match="'max_perf' must be > 0 for a worker reporting state 'ready'"):
        parse_report(report(max_perf=max_perf))


@pytest.mark.parametrize("state", ["loading", "error", "stopped"])
def test_a_worker_not_ready_may_report_no_perf(state: str) -> None:
    assert parse_report(report(state=state, max_perf=0))[1].max_perf == 0.0


@pytest.mark.parametrize("field", ["max_perf", "cur_load"])
def test_max_perf_and_cur_load_are_bounded(field: str) -> None:
    assert getattr(parse_report(report(**{field: MAX_REPORT_VALUE}))[1], field) == MAX_REPORT_VALUE
    for bad in (MAX_REPORT_VALUE * 1.000001, 1.7e308, 10**20):
        with pytest.raises(InvalidRequest, match=re.escape(f"'{field}' must be between 0 and {MAX_REPORT_VALUE:g}")):
            parse_report(report(**{field: bad}))


def test_a_reqnum_floor_is_read_as_an_integer_and_absent_or_null_is_none() -> None:
    """The floor below which a restarted worker process refuses assignments (WorkerReport.reqnum_floor)."""
    assert parse_report(report(reqnum_floor=1795405757743383))[1].reqnum_floor == 1795405757743383
    assert parse_report(report(reqnum_floor=7.0))[1].reqnum_floor == 7
    assert parse_report(report(reqnum_floor=0))[1].reqnum_floor == 0
    assert parse_report(report(reqnum_floor=MAX_REQNUM))[1].reqnum_floor == MAX_REQNUM
    assert parse_report(report(reqnum_floor=None))[1].reqnum_floor is None
    assert parse_report(report())[1].reqnum_floor is None  # Vast's own workers do not send it


@pytest.mark.parametrize(
    "bad",
    ["5", "", True, False, [], {}, -1, -1.0, 1.5, float("nan"), float("inf"), -float("inf"), MAX_REQNUM + 1,
     float(2**60), 10**30],
)  # fmt: skip
def test_a_bad_reqnum_floor_is_invalid(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="'reqnum_floor' must be an integer"):
        parse_report(report(reqnum_floor=bad))


def test_a_report_without_endpoint_is_invalid() -> None:
    data = report()
    del data["endpoint"]
    with pytest.raises(InvalidRequest, match="endpoint"):
        parse_report(data)


# -- POST /delete_requests/ -------------------------------------------------------------------------------------
def test_a_release() -> None:
    idxs = [1, 2, MAX_REQUEST_IDX]
    assert parse_release({"endpoint": "ep", "request_idxs": idxs}) == ("ep", idxs, True, None)
    assert parse_release({"endpoint": "ep", "request_idxs": [], "success": False}) == ("ep", [], False, None)
    assert parse_release({"endpoint": "ep", "request_idxs": [1], "id": "gpu-0"}) == ("ep", [1], True, "gpu-0")
    for bad_id in ("", 7, ["gpu-0"], "x" * (MAX_ID_CHARS + 1), 'gpu"0'):
        with pytest.raises(InvalidRequest, match="'id'"):
            parse_release({"endpoint": "ep", "request_idxs": [1], "id": bad_id})
    assert parse_release({"endpoint": "ep", "request_idxs": [1] * MAX_RELEASE_BATCH})[1] == [1] * MAX_RELEASE_BATCH


@pytest.mark.parametrize(
    "idxs",
    [None, "1", 1, {"1": 1}, [True], [1, False], [0], [-1], [1.5], [0.0], ["1"], [MAX_REQUEST_IDX + 1],
     [float(MAX_REQUEST_IDX + 2)], [1] * (MAX_RELEASE_BATCH + 1)],
)  # fmt: skip
def test_bad_request_idxs_are_invalid(idxs: object) -> None:
    with pytest.raises(InvalidRequest, match="request_idxs"):
        parse_release({"endpoint": "ep", "request_idxs": idxs})


@pytest.mark.parametrize("success", ["true", 1, None])
def test_success_must_be_a_boolean(success: object) -> None:
    with pytest.raises(InvalidRequest, match="success"):
        parse_release({"endpoint": "ep", "request_idxs": [1], "success": success})


def test_a_release_without_endpoint_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="endpoint"):
        parse_release({"request_idxs": [1]})


@pytest.mark.parametrize(
    ("url", "accepted"),
    [("http://10.0.0.5:8000", True), ("https://w.example/", True), ("http://proxy/workers/w-1~x", True),
     ("ftp://h", False), ("http://", False), ("http://a b", False), ('http://h/"', False), ("http://h\\x", False),
     ("http://u:p@h", False), ("http://h/?q=1", False), ("http://h/#f", False), ("http://h\u00e9", False),
     ("HTTP://h", True), ("http://h/a@b", False),
     # what the pattern took and the parser refuses: an empty or 6-digit port, '%' (host or path), empty, '.' and
     # '..' segments, a host of characters no name has
     ("http://h:", False), ("http://h:/x", False), ("http://h:123456", False), ("http://w%31", False),
     ("http://h/a%20b", False), ("http://h//a", False), ("http://h/a//b/", False), ("http://h/./a", False),
     ("http://h/a/.", False), ("http://h/../a", False), ("http://h/a/../", False), ("http://h<x>", False),
     ("http://h[1]", False), ("http://[::1", False),
     # and what both take: segments that only look like dots, trailing slashes, sub-delimiters, brackets in a path
     ("http://h/.a/a./..a/a../.../a.b", True), ("http://h//", True), ("http://h/a///", True),
     ("http://[::1]:8/x", True), ("http://h/a;b=c,d/~x_y-z/[q]:1", True), ("https://H.example:65535/", True),
     ("http://a-b_c~d!e$f&g'h(i)j*k+l", True)],
)  # fmt: skip
def test_openapis_worker_url_pattern_agrees_with_the_parser(url: str, accepted: bool) -> None:
    """The schema a worker's author codes against takes what the server takes (it took query strings and
    credentials the server refuses)."""
    assert (re.fullmatch(WORKER_URL_PATTERN, url) is not None) is accepted
    if accepted:
        parse_report(report(url=url))
    else:
        with pytest.raises(InvalidRequest):
            parse_report(report(url=url))


@pytest.mark.parametrize(("worker_id", "accepted"), [("w-1 a", True), ("~!#", True), ('w"', False), ("w\\", False),
                                                     ("w\u00e9", False), ("w\n", False)])  # fmt: skip
def test_openapis_worker_id_pattern_agrees_with_the_parser(worker_id: str, accepted: bool) -> None:
    assert (re.fullmatch(SAFE_ID_PATTERN, worker_id) is not None) is accepted
    assert is_safe_text(worker_id) is accepted


@pytest.mark.parametrize(
    ("header", "key"),
    [("abc-123", "abc-123"), ('"abc-123"', "abc-123"), (" k ", "k"), ("!#[]~", "!#[]~"), ("k" * 255, "k" * 255),
     ("", None), ('""', None), ("two words", None), ('a"b', None), ("a\\b", None), ("k" * 256, None),
     ("\u00e9", None), ('"open', None), ("\tk\t", "k"), ("\u00a0k", None), ("k\x85", None), ("\x1fk", None)],
)  # fmt: skip
def test_an_idempotency_key_is_visible_ascii_bare_or_quoted_and_the_openapi_pattern_agrees(
    header: str, key: str | None
) -> None:
    assert (re.search(IDEMPOTENCY_KEY_PATTERN, header) is not None) is (key is not None)
    if key is None:
        with pytest.raises(InvalidRequest, match="Idempotency-Key"):
            parse_idempotency_key(header)
    else:
        assert parse_idempotency_key(header) == key
    assert parse_idempotency_key(None) is None


@pytest.mark.parametrize("url", ["http://127.1", "http://h:0", "http://h:99999", "http://[::ffff:10.0.0.5]",
                                 "http://[1:2]", "http://1.2.3.999"])  # fmt: skip
def test_what_the_url_pattern_cannot_check_the_400_description_says(url: str) -> None:
    assert re.fullmatch(WORKER_URL_PATTERN, url) is not None
    with pytest.raises(InvalidRequest, match="url"):
        parse_report(report(url=url))
    bad_request = DOC["paths"]["/worker_status/"]["post"]["responses"]["400"]["description"]
    for what in ("IPv6", "IPv4-mapped", "dotted quad", "last label is not a number", "port in 1..65535"):
        assert what in bad_request


# -- the document's request schemas against the parser --------------------------------------------------------------
DOC = dispatcher_openapi(max_cost=MAX_COST, max_report_value=MAX_REPORT_VALUE)


def request_schema(path: str) -> Draft202012Validator:
    return Draft202012Validator(DOC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])


def accepted(parse: Callable[[], object]) -> bool:
    try:
        parse()
    except InvalidRequest:
        return False
    return True


@pytest.mark.parametrize(
    ("state", "max_perf"), [("ready", 0), ("ready", -0.0), ("ready", 1e-300), ("ready", 5), ("loading", 0),
                            ("error", 0.0), ("stopped", 0), ("loading", 5)],
)  # fmt: skip
def test_the_report_schema_wants_a_positive_max_perf_when_ready_as_the_server_does(state: str, max_perf: float) -> None:
    """The schema said minimum 0 whatever the state; the server refuses 0 for a ready worker."""
    data = report(state=state, max_perf=max_perf)
    assert request_schema("/worker_status/").is_valid(data) is accepted(lambda: parse_report(data))


# JSON Schema's "integer" takes a number with no fractional part, 5.0 too: the server takes those in range as well
INTEGERS = [0, 5, 5.0, 0.0, -0.0, 1.0, float(MAX_REQUEST_IDX), MAX_REQUEST_IDX, MAX_REQUEST_IDX + 1,
            float(MAX_REQUEST_IDX + 2), -1, -1.0, 1.5, 1e-9, True, False, "5", None]  # fmt: skip


@pytest.mark.parametrize("value", INTEGERS)
def test_integer_fields_take_what_the_schema_takes(value: object) -> None:
    route_request = body(request_idx=value)
    route_schema = Draft202012Validator(
        DOC["paths"]["/route/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    )
    assert route_schema.is_valid(route_request) is accepted(lambda: route(route_request))
    worker_report = report(in_flight=value)
    assert request_schema("/worker_status/").is_valid(worker_report) is accepted(lambda: parse_report(worker_report))
    restarted = report(reqnum_floor=value)
    assert request_schema("/worker_status/").is_valid(restarted) is accepted(lambda: parse_report(restarted))
    release = {"endpoint": "ep", "request_idxs": [3, value]}
    assert request_schema("/delete_requests/").is_valid(release) is accepted(lambda: parse_release(release))


def test_integral_floats_are_read_as_integers() -> None:
    assert route(body(request_idx=5.0)).request_idx == 5
    assert route(body(request_idx=0.0)).request_idx is None  # 0: a new request, as 0 is
    assert parse_report(report(in_flight=3.0))[1].in_flight == 3
    assert parse_release({"endpoint": "ep", "request_idxs": [1.0, 2]})[1] == [1, 2]
    assert all(type(i) is int for i in parse_release({"endpoint": "ep", "request_idxs": [1.0]})[1])


def test_in_flight_is_bounded_in_the_schema_and_the_server() -> None:
    assert parse_report(report(in_flight=MAX_IN_FLIGHT))[1].in_flight == MAX_IN_FLIGHT
    with pytest.raises(InvalidRequest, match=f"'in_flight' must be an integer between 0 and {MAX_IN_FLIGHT}"):
        parse_report(report(in_flight=MAX_IN_FLIGHT + 1))
    in_flight = request_schema("/worker_status/").schema["properties"]["in_flight"]
    assert (in_flight["minimum"], in_flight["maximum"]) == (0, MAX_IN_FLIGHT)


@pytest.mark.parametrize("worker_id", [None, "gpu-0", "", 7])
def test_a_release_may_name_its_worker_or_send_null(worker_id: object) -> None:
    release = {"endpoint": "ep", "request_idxs": [1], "id": worker_id}
    assert request_schema("/delete_requests/").is_valid(release) is accepted(lambda: parse_release(release))
    if worker_id is None:
        assert parse_release(release)[3] is None


def test_the_error_schema_documents_every_reason_sent() -> None:
    """Clients branch on error.reason (unknown_request_idx: route again as new), which the schema lacked."""
    reason = ERROR_SCHEMA["properties"]["error"]["properties"]["reason"]
    assert reason["type"] == "string"
    for value in (UNKNOWN_REQUEST_IDX, *RejectReason):
        assert value in reason["description"]
    assert Draft202012Validator(ERROR_SCHEMA).is_valid({"error": {"code": "c", "message": "m", "reason": "r"}})
