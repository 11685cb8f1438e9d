"""The worker's assignment middleware over ASGI (httpx.ASGITransport): what it lets through, what it answers itself."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Message, Scope

from service.dispatch import worker_auth as worker_auth_module
from service.dispatch.signing import Assignment, KeyRing, Signer
from service.dispatch.verifier import AssignmentRejected, AssignmentVerifier, RejectReason
from service.dispatch.worker_auth import AssignmentAuthMiddleware, verify_request_body
from service.errors import InvalidRequest

NOW_S = 1_764_000_000.0
URL = "http://worker-1:8000"
ENDPOINT = "my-endpoint"
TTL_MS = 30_000
BASE = "http://worker-1:8000"
SMALL_LIMIT = 1024


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
def verifier(signer: Signer) -> AssignmentVerifier:
    return AssignmentVerifier(KeyRing([signer.public_key]), own_urls=[URL], endpoint=ENDPOINT, clock=lambda: NOW_S)


def auth(signer: Signer, reqnum: int = 1, **overrides: Any) -> dict[str, Any]:
    a = Assignment(
        endpoint=ENDPOINT,
        url=URL,
        cost=10.0,
        reqnum=reqnum,
        request_idx=100 + reqnum,
        expires_at_ms=int(NOW_S * 1000) + TTL_MS,
        key_id=signer.key_id,
    )
    a = dataclasses.replace(a, **overrides)
    return {**dataclasses.asdict(a), "signature": signer.sign(a), "__request_id": "req-1"}


async def work(request: Request) -> Response:
    assignment: Assignment = request.state.assignment
    body = await request.json()  # the middleware replays the body it read
    return JSONResponse(
        {"reqnum": assignment.reqnum, "payload": request.state.payload, "body_payload": body.get("payload")}
    )


async def open_route(request: Request) -> Response:
    return JSONResponse({"open": True, "has_assignment": hasattr(request.state, "assignment")})


def build_app(verifier: AssignmentVerifier, protected: list[str] | None = None, **options: Any) -> Starlette:
    return Starlette(
        routes=[
            Route("/work", work, methods=["POST"]),
            Route("/work", open_route, methods=["GET"]),
            Route("/open", open_route, methods=["POST"]),
        ],
        middleware=[Middleware(AssignmentAuthMiddleware, verifier=verifier, protected_paths=protected, **options)],
    )


@pytest.fixture
async def client(verifier: AssignmentVerifier) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(verifier, ["/work"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        yield c


async def test_a_valid_assignment_reaches_the_handler_with_state(client: httpx.AsyncClient, signer: Signer) -> None:
    r = await client.post("/work", json={"auth_data": auth(signer, 3), "payload": {"prompt": "hi"}})
    assert r.status_code == 200, r.text
    assert r.json() == {"reqnum": 3, "payload": {"prompt": "hi"}, "body_payload": {"prompt": "hi"}}


async def test_what_vast_sdk_adds_is_tolerated(client: httpx.AsyncClient, signer: Signer) -> None:
    r = await client.post(
        "/work?api_key=client-key",
        json={"auth_data": auth(signer), "payload": [1, 2], "session_id": None},
        headers={"Authorization": "Bearer client-key"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["payload"] == [1, 2]


async def rejected(client: httpx.AsyncClient, body: object) -> dict[str, str]:
    r = await client.post("/work", content=orjson.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 401, r.text
    error: dict[str, str] = r.json()["error"]
    assert error["code"] == "invalid_assignment"
    assert error["reason"] in error["message"]
    return error


async def test_invalid_assignments_answer_401_with_the_reason(client: httpx.AsyncClient, signer: Signer) -> None:
    tampered = {**auth(signer, 1), "cost": 1.0}
    assert (await rejected(client, {"auth_data": tampered}))["reason"] == "bad_signature"
    assert (await rejected(client, {"auth_data": auth(signer, url="http://other:1")}))["reason"] == "wrong_url"
    assert (await rejected(client, {"payload": {}}))["reason"] == "bad_format"
    assert (await rejected(client, {"auth_data": "x"}))["reason"] == "bad_format"


async def test_assignments_routing_again_mends_answer_503_with_retry_after(
    client: httpx.AsyncClient, signer: Signer
) -> None:
    """A key not fetched yet, or an assignment that came late: Vast's SDK retries a 5xx by routing the request again
    (a fresh assignment); it ended the request on the 401 these were, and its load stayed reserved."""
    late = auth(signer, 1, expires_at_ms=1_000)
    for body, reason in (({"auth_data": auth(Signer.generate())}, "unknown_key"), ({"auth_data": late}, "expired")):
        r = await client.post("/work", json=body)
        assert (r.status_code, r.headers.get("retry-after")) == (503, "1"), r.text
        assert (r.json()["error"]["code"], r.json()["error"]["reason"]) == ("invalid_assignment", reason)


async def test_the_payload_reaches_the_app_with_its_numbers_exact(client: httpx.AsyncClient, signer: Signer) -> None:
    payload = {"big": 12345678901234567890123, "negative": -(2**70), "tenth": 0.1, "text": "é"}
    r = await client.post("/work", json={"auth_data": auth(signer, 4), "payload": payload})
    assert r.status_code == 200, r.text
    assert json.loads(r.content)["payload"] == payload  # orjson would have made the big ones floats


async def test_a_cost_too_large_for_a_float_is_a_bad_format_not_a_crash(
    client: httpx.AsyncClient, signer: Signer
) -> None:
    json_body = {"content-type": "application/json"}
    huge = json.dumps({"auth_data": {**auth(signer, 5), "cost": 10**400}})
    r = await client.post("/work", content=huge, headers=json_body)  # orjson refuses it; the exact parse reads it
    assert r.status_code == 401 and r.json()["error"]["reason"] == "bad_format", r.text
    r = await client.post("/work", content=json.dumps({"auth_data": {**auth(signer, 5), "cost": 2**70}}))
    assert r.status_code == 401 and r.json()["error"]["reason"] == "bad_signature", r.text  # not what was signed
    r = await client.post("/work", content=b'{"auth_data": {"cost": NaN}}', headers=json_body)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


@pytest.fixture
def exact_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the bodies the middleware parsed exactly (the slow parser), in order."""
    sizes: list[int] = []
    real = worker_auth_module.parse_exact_json_object

    def counting(body: bytes) -> dict[str, Any]:
        sizes.append(len(body))
        return real(body)

    monkeypatch.setattr(worker_auth_module, "parse_exact_json_object", counting)
    return sizes


async def test_an_unsigned_body_is_refused_without_the_exact_parse(
    client: httpx.AsyncClient, signer: Signer, exact_parses: list[int]
) -> None:
    """The exact parser took 1.8-3.9 s of the event loop for 15 MiB of numbers, before the signature was even
    checked: anyone could stall a worker (and its heartbeat). Only a verified request pays for it now."""
    numbers = {"payload": [1.5] * 100_000}
    assert (await rejected(client, {"auth_data": {**auth(signer, 6), "cost": 1.0}, **numbers}))["reason"] == (
        "bad_signature"
    )
    assert (await rejected(client, numbers))["reason"] == "bad_format"
    assert exact_parses == []
    served = await client.post("/work", json={"auth_data": auth(signer, 6), "payload": [1.5]})
    assert served.status_code == 200 and len(exact_parses) == 1


async def test_json_that_orjson_refuses_is_read_exactly_and_a_bad_payload_keeps_its_reqnum(
    client: httpx.AsyncClient, signer: Signer
) -> None:
    """orjson first (the exact parse of an unsigned body held the loop) refused what JSON allows and the exact parser
    reads (an integer past a double, a lone surrogate escape): 200 before, 400 then. And a payload refused after the
    signature had checked used the reqnum up: the fixed request, same assignment, got 401 replayed for good."""
    json_body = {"content-type": "application/json"}
    huge = int("10" * 250)  # past a double: orjson refuses the whole body
    body = f'{{"auth_data": {json.dumps(auth(signer, 40))}, "payload": [{huge}]}}'
    r = await client.post("/work", content=body, headers=json_body)
    assert r.status_code == 200 and json.loads(r.content)["payload"] == [huge], r.text
    deep = f'{{"auth_data": {json.dumps(auth(signer, 90))}, "payload": {"[" * 5000 + "]" * 5000}}}'
    r = await client.post("/work", content=deep, headers=json_body)
    assert r.status_code == 400, r.text
    fixed = await client.post("/work", json={"auth_data": auth(signer, 90), "payload": [1]})
    assert fixed.status_code == 200, fixed.text


async def test_json_orjson_refuses_for_no_good_reason_is_a_400_not_an_exact_parse(
    client: httpx.AsyncClient, signer: Signer, exact_parses: list[int]
) -> None:
    """Every body orjson refused took the exact parse, before any check: 16 MiB of garbage held the GIL for seconds.
    And a lone surrogate in a signed text field answered 500 (its refusal could not be encoded)."""
    garbage = b'{"payload": [' + b"1.5," * 10_000 + b"1] x"
    r = await client.post("/work", content=garbage, headers={"content-type": "application/json"})
    assert r.status_code == 400 and exact_parses == [], r.text
    forged = {**auth(signer, 50), "url": "http://evil\ud800:1", "key_id": "0" * 16}
    r = await client.post(
        "/work", content=json.dumps({"auth_data": forged}), headers={"content-type": "application/json"}
    )
    assert r.status_code == 401 and r.json()["error"]["reason"] == "bad_format", r.text


async def test_a_replayed_request_is_refused(client: httpx.AsyncClient, signer: Signer) -> None:
    body = {"auth_data": auth(signer, 9), "payload": None}
    assert (await client.post("/work", json=body)).status_code == 200
    assert (await rejected(client, body))["reason"] == "replayed"


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b""])
async def test_a_body_that_is_not_a_json_object_answers_400(client: httpx.AsyncClient, body: bytes) -> None:
    r = await client.post("/work", content=body)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"


async def test_a_body_that_is_not_json_answers_415(client: httpx.AsyncClient) -> None:
    r = await client.post("/work", content=b"<x/>", headers={"content-type": "text/xml"})
    assert (r.status_code, r.json()["error"]["code"]) == (415, "invalid_request")


async def test_an_oversized_body_answers_413(verifier: AssignmentVerifier, signer: Signer) -> None:
    app = build_app(verifier, ["/work"], max_body_bytes=SMALL_LIMIT)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        r = await c.post("/work", json={"auth_data": auth(signer), "payload": "x" * SMALL_LIMIT})
    assert r.status_code == 413


async def test_unprotected_paths_pass_through(client: httpx.AsyncClient) -> None:
    assert (await client.post("/open", content=b"anything")).json() == {"open": True, "has_assignment": False}


async def test_every_method_on_a_protected_path_is_checked(client: httpx.AsyncClient) -> None:
    # a handler of another method on the same path (PUT, a GET with side effects) must not run unsigned work
    bodiless = await client.get("/work")
    assert bodiless.status_code == 400  # no JSON object to read auth_data from
    assert bodiless.json()["error"]["code"] == "invalid_request"
    unsigned = await client.request("GET", "/work", json={"payload": {}})
    assert unsigned.status_code == 401
    assert unsigned.json()["error"]["code"] == "invalid_assignment"


async def test_a_trailing_slash_does_not_bypass_the_check(client: httpx.AsyncClient) -> None:
    r = await client.post("/work/", json={"payload": {}})
    assert r.status_code == 401


async def test_every_method_but_the_safe_ones_is_protected_without_a_path_list(verifier: AssignmentVerifier) -> None:
    app = build_app(verifier, None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        assert (await c.post("/open", json={})).status_code == 401
        assert (await c.put("/open", json={})).status_code == 401
        assert (await c.get("/work")).json() == {"open": True, "has_assignment": False}  # GET, HEAD, OPTIONS pass


@pytest.mark.parametrize("mounted", [False, True], ids=["root_path", "mount"])
async def test_a_path_below_a_root_path_or_a_mount_is_checked(
    verifier: AssignmentVerifier, signer: Signer, mounted: bool
) -> None:
    # the router matches routes below the root path; the check must match the same paths, not the full one
    app = build_app(verifier, ["/work"])
    if mounted:
        transport = httpx.ASGITransport(app=Starlette(routes=[Mount("/v1", app=app)]))
    else:
        transport = httpx.ASGITransport(app=app, root_path="/v1")
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        refused = await c.post("/v1/work", json={"payload": "unsigned"})
        assert refused.status_code == 401, refused.text
        assert (await c.post("/v1/work/", json={"payload": "unsigned"})).status_code == 401
        served = await c.post("/v1/work/", json={"auth_data": auth(signer, 5), "payload": "signed"})
        assert served.status_code == 200, served.text
        assert served.json()["reqnum"] == 5


async def test_a_chunked_body_is_read_whole_and_replayed(verifier: AssignmentVerifier, signer: Signer) -> None:
    raw = orjson.dumps({"auth_data": auth(signer), "payload": {"n": 1}})
    chunks = [raw[:10], raw[10:50], raw[50:]]
    incoming: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)
    ]
    seen: list[bytes] = []
    scopes: list[Scope] = []

    async def app(scope: Scope, receive: Any, _send: Any) -> None:
        scopes.append(scope)
        message = await receive()
        seen.append(message["body"])
        assert (await receive())["type"] == "http.disconnect"  # after the replay, the server's own messages

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(_message: Message) -> None:
        raise AssertionError("the middleware must not answer a valid request")

    middleware = AssignmentAuthMiddleware(app, verifier, ["/work"])
    await middleware({"type": "http", "method": "POST", "path": "/work", "headers": []}, receive, send)
    assert seen == [raw]
    assert scopes[0]["state"]["assignment"].reqnum == 1


def test_verify_request_body_for_other_servers(verifier: AssignmentVerifier, signer: Signer) -> None:
    assignment, payload = verify_request_body(verifier, orjson.dumps({"auth_data": auth(signer, 4), "payload": 7}))
    assert (assignment.reqnum, payload) == (4, 7)
    with pytest.raises(InvalidRequest):
        verify_request_body(verifier, b"{")
    with pytest.raises(AssignmentRejected) as rejected:  # reqnum 4 was just used
        verify_request_body(verifier, orjson.dumps({"auth_data": auth(signer, 4)}))
    assert rejected.value.reason is RejectReason.REPLAYED


async def test_an_unknown_key_is_fetched_and_the_request_verified_again_before_any_401(
    verifier: AssignmentVerifier, signer: Signer
) -> None:
    """The dispatcher signs with a new key as soon as it rotates; Vast's SDK does not retry the 401 a worker still
    on the old keys answered. Other rejections never fetch keys."""
    rotated = Signer.generate()
    fetches: list[str] = []

    async def refresh_keys() -> bool:
        fetches.append("fetched")
        verifier.update_keys(KeyRing([rotated.public_key, signer.public_key]))
        return True

    app = build_app(verifier, ["/work"], refresh_keys=refresh_keys)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        bad_signature = {**auth(signer, 1), "cost": 2.0}
        assert (await c.post("/work", json={"auth_data": bad_signature})).status_code == 401
        elsewhere = auth(rotated, 3, url="http://elsewhere:8000")  # unknown key, but not ours anyway: no fetch
        refused = await c.post("/work", json={"auth_data": elsewhere})
        assert refused.status_code == 401 and refused.json()["error"]["reason"] == "wrong_url"
        assert fetches == []
        assert (await c.post("/work", json={"auth_data": auth(rotated, 2)})).status_code == 200
        assert fetches == ["fetched"]


async def test_an_unknown_key_is_refused_when_no_keys_could_be_fetched(
    verifier: AssignmentVerifier, signer: Signer
) -> None:
    async def refresh_keys() -> bool:
        return False  # the dispatcher did not answer, or the last fetch was too recent

    app = build_app(verifier, ["/work"], refresh_keys=refresh_keys)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        answer = await c.post("/work", json={"auth_data": auth(Signer.generate())})
    assert answer.status_code == 503 and answer.json()["error"]["reason"] == "unknown_key"
    assert "www-authenticate" not in answer.headers  # the credential is in the body: no HTTP scheme to name
