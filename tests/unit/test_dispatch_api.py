"""The dispatcher's HTTP API in process: httpx over ASGI, the Starlette lifespan run by hand, in-memory state."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.types import Message

from service.config import DispatcherSettings
from service.dispatch import api as api_module
from service.dispatch import app as dispatch_app
from service.dispatch import endpoints as endpoints_module
from service.dispatch.app import DispatcherService
from service.dispatch.endpoints import EndpointRegistry, EndpointSpec, hash_key, save_config
from service.dispatch.memory_store import MemoryStore
from service.dispatch.records import STATUS_KEYS, RouteOutcome
from service.dispatch.signing import Assignment, KeyRing, Signer, write_key_file
from service.dispatch.store import LoadStats, StoreUnavailable
from tests.openapi_check import assert_answers_as_documented

EP, API_KEY, WORKER_TOKEN = "ep", "dk_test-client-key", "wt_test-worker-token"
OTHER, OTHER_API_KEY, OTHER_WORKER_TOKEN = "other", "dk_other-client-key", "wt_other-worker-token"
WORKER_URL = "http://10.0.0.5:8000"
LIFESPAN_TIMEOUT_S = 10.0  # a guard against a hang, not an assertion about speed
HEALTH_PROBE_TIMEOUT_S = 2.0  # the readiness probe's timeoutSeconds in deploy/k8s/dispatcher.yaml

CLIENT = {"authorization": f"Bearer {API_KEY}"}
WORKER = {"authorization": f"Bearer {WORKER_TOKEN}"}


def registry() -> EndpointRegistry:
    return EndpointRegistry(
        {
            EP: EndpointSpec(EP, api_key_sha256=(hash_key(API_KEY),), worker_token_sha256=(hash_key(WORKER_TOKEN),)),
            OTHER: EndpointSpec(
                OTHER, api_key_sha256=(hash_key(OTHER_API_KEY),), worker_token_sha256=(hash_key(OTHER_WORKER_TOKEN),)
            ),
        }
    )


def make_service(store: MemoryStore | None = None, **overrides: Any) -> DispatcherService:
    settings = DispatcherSettings(autoscale_interval_s=3600.0, **overrides)  # the loop refreshes once, at startup
    return DispatcherService(settings, registry=registry(), store=store or MemoryStore(), signer=Signer.generate())


@contextlib.asynccontextmanager
async def lifespan(service: DispatcherService) -> AsyncIterator[None]:
    """Run the app's ASGI lifespan (startup, then shutdown, which closes the store)."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    task = asyncio.ensure_future(service.asgi(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    started = await asyncio.wait_for(from_app.get(), LIFESPAN_TIMEOUT_S)
    assert started["type"] == "lifespan.startup.complete", started
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        stopped = await asyncio.wait_for(from_app.get(), LIFESPAN_TIMEOUT_S)
        await asyncio.wait_for(task, LIFESPAN_TIMEOUT_S)
        assert stopped["type"] == "lifespan.shutdown.complete", stopped


@contextlib.asynccontextmanager
async def serving(service: DispatcherService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=service.asgi)
    async with lifespan(service), httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture
def service() -> DispatcherService:
    return make_service()


@pytest.fixture
async def client(service: DispatcherService) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(service) as c:
        yield c


async def register(
    client: httpx.AsyncClient,
    worker_id: str = "w1",
    *,
    url: str = WORKER_URL + "/",
    state: str = "ready",
    max_perf: float = 100.0,
    endpoint: str = EP,
    token: str = WORKER_TOKEN,
) -> dict[str, Any]:
    r = await client.post(
        "/worker_status/",
        json={"endpoint": endpoint, "id": worker_id, "url": url, "state": state, "max_perf": max_perf},
        headers={"authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def route(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    r = await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": 10.0, **fields})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body: dict[str, Any] = r.json()
    return body


async def workers(client: httpx.AsyncClient, endpoint: str = EP, key: str = API_KEY) -> list[dict[str, Any]]:
    r = await client.get(f"/endpoints/{endpoint}/", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["workers"]
    return found


async def keyring(client: httpx.AsyncClient) -> KeyRing:
    r = await client.get("/pubkey/")
    assert r.status_code == 200
    return KeyRing.from_hex(key["public_key"] for key in r.json()["keys"])


def assert_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    if status == 401:  # both the fast path and Starlette routes name the scheme (RFC 9110)
        assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["code"] == code
    assert error["message"]
    message: str = error["message"]
    return message


# -- the happy path ---------------------------------------------------------------------------------------------
async def test_a_registered_worker_gets_a_signed_assignment(
    client: httpx.AsyncClient, service: DispatcherService
) -> None:
    registered = await register(client)
    assert registered["ok"] is True
    assert (registered["endpoint"], registered["id"], registered["load"]) == (EP, "w1", 0.0)
    origin = registered["reqnum"]
    body = await route(client, request_idx=0, replay_timeout=60)  # what Vast's SDK sends on a first call
    assert (body["endpoint"], body["url"], body["cost"], body["reqnum"]) == (EP, WORKER_URL, 10.0, origin + 1)
    assert body["request_idx"] >= 1
    assert body["key_id"] == service.signer.key_id
    assert len(body["__request_id"]) == 36
    pubkey = (await client.get("/pubkey/")).json()
    assert (pubkey["algorithm"], pubkey["key_id"]) == ("ed25519", service.signer.key_id)
    assert pubkey["public_key"] == service.signer.public_key.hex()
    assert [k["current"] for k in pubkey["keys"]] == [True]
    ring = await keyring(client)
    assignment = Assignment.from_mapping(body)
    assert ring.verify(assignment, body["signature"])
    assert not ring.verify(Assignment.from_mapping({**body, "cost": 1.0}), body["signature"])
    assert not ring.verify(Assignment.from_mapping({**body, "reqnum": 2}), body["signature"])
    assert not KeyRing([Signer.generate().public_key]).verify(assignment, body["signature"])
    (worker,) = await workers(client)
    assert (worker["id"], worker["load"], worker["reqnum"], worker["state"], worker["active"]) == (
        "w1", 10.0, origin + 1, "ready", True
    )  # fmt: skip


async def test_new_requests_get_new_idxs_and_the_worker_counts_up(client: httpx.AsyncClient) -> None:
    origin = (await register(client))["reqnum"]
    first, second = await route(client), await route(client, request_idx=None, cost=2.5)
    assert first["request_idx"] != second["request_idx"]
    assert (first["reqnum"], second["reqnum"]) == (origin + 1, origin + 2)
    assert (await register(client))["reqnum"] == origin + 2  # a heartbeat keeps the counter
    (worker,) = await workers(client)
    assert worker["load"] == 12.5


@pytest.mark.parametrize("where", ["body", "bearer", "query"])
async def test_the_api_key_may_come_from_body_bearer_or_query(client: httpx.AsyncClient, where: str) -> None:
    await register(client)
    payload: dict[str, Any] = {"endpoint": EP, "cost": 1.0}
    headers: dict[str, str] = {}
    url = "/route/"
    if where == "body":
        payload["api_key"] = API_KEY
    elif where == "bearer":
        headers = CLIENT
    else:
        url = f"/route/?api_key={API_KEY}"
    r = await client.post(url, json=payload, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["url"] == WORKER_URL


def test_only_a_known_key_in_the_headers_or_query_vouches_for_a_body(service: DispatcherService) -> None:
    """Which budget /route/'s body is read against is settled before it is read: only a key that is some endpoint's
    (any endpoint's: which one the body names is checked later) moves it to the keyed clients' budget."""
    vouch = api_module.DispatcherApi(service).vouch
    bearer = {b"authorization": f"Bearer {API_KEY}".encode()}
    assert vouch(bearer, b"") == api_module.KnownKey(API_KEY, hash_key(API_KEY))
    assert vouch({}, f"api_key={OTHER_API_KEY}".encode()) == api_module.KnownKey(OTHER_API_KEY, hash_key(OTHER_API_KEY))
    assert vouch({b"authorization": b"Bearer dk_unknown"}, f"api_key={API_KEY}".encode()) is None  # the header rules
    basic, worker = f"Basic {API_KEY}".encode(), f"Bearer {WORKER_TOKEN}".encode()
    for headers, query in (({}, b""), ({b"authorization": basic}, b""), ({b"authorization": worker}, b""), ({}, b"x=")):
        assert vouch(headers, query) is None, (headers, query)


async def test_a_route_hashes_its_key_once(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """/route/ is the benchmarked path: the digest of a header key, computed to pick the body's budget, is the one
    authenticated with when the route's key is that key (Vast's SDK sends it in the body and the header alike)."""
    hashed: list[str] = []

    def counted(key: str) -> str:
        hashed.append(key)
        return hash_key(key)

    monkeypatch.setattr(api_module, "hash_key", counted)
    monkeypatch.setattr(endpoints_module, "hash_key", counted)
    for body_key, headers, times in (
        (None, CLIENT, 1),
        (API_KEY, CLIENT, 1),
        (API_KEY, {}, 1),
        ("dk_other", CLIENT, 2),
    ):
        hashed.clear()
        payload = (
            {"endpoint": EP, "cost": 1.0} if body_key is None else {"endpoint": EP, "cost": 1.0, "api_key": body_key}
        )
        r = await client.post("/route/", json=payload, headers=headers)
        assert r.status_code == (401 if body_key == "dk_other" else 200), r.text
        assert len(hashed) == times, (body_key, headers, hashed)


async def test_the_body_key_beats_a_valid_bearer(client: httpx.AsyncClient) -> None:
    r = await client.post("/route/", json={"endpoint": EP, "cost": 1.0, "api_key": "dk_wrong"}, headers=CLIENT)
    assert_error(r, 401, "unauthorized")


async def test_a_retry_keeps_its_idx_and_does_not_add_load(client: httpx.AsyncClient) -> None:
    await register(client)
    first = await route(client)
    retry = await route(client, request_idx=first["request_idx"])  # the only worker is the one it had
    assert (retry["request_idx"], retry["status"]["ready"]) == (first["request_idx"], 1) and "url" not in retry
    (worker,) = await workers(client)
    assert worker["load"] == 0.0
    poll = await route(client, request_idx=first["request_idx"])
    assert poll["request_idx"] == first["request_idx"]
    assert poll["reqnum"] == first["reqnum"] + 1
    assert poll["url"] == WORKER_URL
    (worker,) = await workers(client)
    assert worker["load"] == 10.0


async def test_a_retry_moves_to_another_worker_when_there_is_one(client: httpx.AsyncClient) -> None:
    await register(client, "w1", url="http://w1:8000")
    await register(client, "w2", url="http://w2:8000")
    first = await route(client)
    assert first["url"] == "http://w1:8000"  # equal waits and loads: the lower id
    retry = await route(client, request_idx=first["request_idx"])
    assert retry["url"] == "http://w2:8000"
    assert [(w["id"], w["load"]) for w in await workers(client)] == [("w1", 0.0), ("w2", 10.0)]


async def test_no_worker_answers_a_status_and_a_later_retry_is_assigned(client: httpx.AsyncClient) -> None:
    waiting = await route(client)
    assert "signature" not in waiting and "url" not in waiting
    assert waiting["endpoint"] == EP
    assert waiting["status"] == dict.fromkeys(STATUS_KEYS, 0)
    idx = waiting["request_idx"]
    assert idx >= 1
    await register(client, "loader", url="http://loader:1", state="loading", max_perf=0.0)
    still = await route(client, request_idx=idx)
    assert still["request_idx"] == idx
    assert still["status"] == {**dict.fromkeys(STATUS_KEYS, 0), "loading": 1}
    origin = (await register(client))["reqnum"]
    assigned = await route(client, request_idx=idx)
    assert (assigned["request_idx"], assigned["url"], assigned["reqnum"]) == (idx, WORKER_URL, origin + 1)
    assert (await keyring(client)).verify(Assignment.from_mapping(assigned), assigned["signature"])
    loads = {w["id"]: w["load"] for w in await workers(client)}
    assert loads == {"loader": 0.0, "w1": 10.0}


async def test_release_gives_the_load_back_and_counts_unknown_requests(client: httpx.AsyncClient) -> None:
    await register(client)
    a, b = await route(client), await route(client, cost=5.0)
    r = await client.post(
        "/delete_requests/", json={"endpoint": EP, "request_idxs": [a["request_idx"], 999_999]}, headers=WORKER
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "released": 1, "unknown": 1, "not_held": 0}
    assert (await workers(client))[0]["load"] == 5.0
    again = await client.post(
        "/delete_requests/",
        json={"endpoint": EP, "request_idxs": [a["request_idx"], b["request_idx"]], "success": False},
        headers=WORKER,
    )
    assert again.json() == {"ok": True, "released": 1, "unknown": 0, "not_held": 1}  # a was already released
    assert (await workers(client))[0]["load"] == 0.0
    # a released request is routed again when retried (a worker refused it; Vast's SDK retries by request_idx)
    # (after a no-ready answer, since the only worker is the one that released it)
    retry = {"endpoint": EP, "api_key": API_KEY, "cost": 1, "request_idx": a["request_idx"]}
    r = await client.post("/route/", json=retry)
    assert r.status_code == 200 and "url" not in r.json(), r.text
    r = await client.post("/route/", json=retry)
    assert r.status_code == 200, r.text
    assert r.json()["request_idx"] == a["request_idx"] and r.json()["url"] == a["url"]
    assert (await workers(client))[0]["load"] == 1.0


async def test_release_naming_its_worker_leaves_a_moved_request_with_the_new_one(client: httpx.AsyncClient) -> None:
    await register(client, "w1", url="http://w1:1")
    await register(client, "w2", url="http://w2:1", max_perf=1.0)
    first = await route(client)
    moved = await route(client, request_idx=first["request_idx"])  # the retry avoids w1
    assert (first["url"], moved["url"]) == ("http://w1:1", "http://w2:1")
    late = {"endpoint": EP, "id": "w1", "request_idxs": [first["request_idx"]]}
    r = await client.post("/delete_requests/", json=late, headers=WORKER)
    assert r.json() == {"ok": True, "released": 0, "unknown": 0, "not_held": 1}
    assert {w["id"]: w["load"] for w in await workers(client)} == {"w1": 0.0, "w2": 10.0}
    done = {**late, "id": "w2"}
    r = await client.post("/delete_requests/", json=done, headers=WORKER)
    assert r.json() == {"ok": True, "released": 1, "unknown": 0, "not_held": 0}
    assert {w["id"]: w["load"] for w in await workers(client)} == {"w1": 0.0, "w2": 0.0}


async def test_release_needs_the_endpoints_worker_token(client: httpx.AsyncClient) -> None:
    await register(client)
    a = await route(client)
    body = {"endpoint": EP, "request_idxs": [a["request_idx"]]}
    for headers in ({}, CLIENT, {"authorization": f"Bearer {OTHER_WORKER_TOKEN}"}):
        assert_error(await client.post("/delete_requests/", json=body, headers=headers), 401, "unauthorized")
    # another endpoint's worker cannot release this endpoint's request either
    r = await client.post(
        "/delete_requests/",
        json={"endpoint": OTHER, "request_idxs": [a["request_idx"]]},
        headers={"authorization": f"Bearer {OTHER_WORKER_TOKEN}"},
    )
    assert r.json() == {"ok": True, "released": 0, "unknown": 1, "not_held": 0}
    assert (await workers(client))[0]["load"] == 10.0


# -- authentication ---------------------------------------------------------------------------------------------
async def test_wrong_and_unknown_endpoint_keys_get_the_same_401(client: httpx.AsyncClient) -> None:
    await register(client)
    wrong = await client.post("/route/", json={"endpoint": EP, "api_key": "dk_wrong", "cost": 1})
    unknown = await client.post("/route/", json={"endpoint": "nope", "api_key": "dk_wrong", "cost": 1})
    unknown_right_key = await client.post("/route/", json={"endpoint": "nope", "api_key": API_KEY, "cost": 1})
    messages = {assert_error(r, 401, "unauthorized") for r in (wrong, unknown, unknown_right_key)}
    assert len(messages) == 1
    assert wrong.content == unknown.content


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({"endpoint": EP, "cost": 1}, {}),  # no key at all
        ({"endpoint": EP, "cost": 1, "api_key": WORKER_TOKEN}, {}),  # a worker token is not an api key
        ({"endpoint": EP, "cost": 1}, {"authorization": f"Bearer {WORKER_TOKEN}"}),
        ({"endpoint": EP, "cost": 1, "api_key": OTHER_API_KEY}, {}),  # another endpoint's key
        ({"endpoint": OTHER, "cost": 1, "api_key": API_KEY}, {}),
        ({"endpoint": EP, "cost": 1}, {"authorization": f"Basic {API_KEY}"}),
    ],
)
async def test_route_401s(client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]) -> None:
    await register(client)
    assert_error(await client.post("/route/", json=body, headers=headers), 401, "unauthorized")


async def test_worker_status_needs_the_worker_token(client: httpx.AsyncClient) -> None:
    report = {"endpoint": EP, "id": "w1", "url": WORKER_URL, "state": "ready", "max_perf": 1}
    for headers in ({}, CLIENT, {"authorization": f"Bearer {OTHER_WORKER_TOKEN}"}, {"authorization": "Bearer x"}):
        assert_error(await client.post("/worker_status/", json=report, headers=headers), 401, "unauthorized")
    unknown = {**report, "endpoint": "nope"}
    assert_error(await client.post("/worker_status/", json=unknown, headers=WORKER), 401, "unauthorized")
    assert await workers(client) == []


async def test_a_new_worker_beyond_the_endpoints_cap_is_refused() -> None:
    settings = DispatcherSettings(autoscale_interval_s=3600.0, max_workers_per_endpoint=2)
    service = DispatcherService(settings, registry=registry(), signer=Signer.generate())  # the store from settings
    async with serving(service) as client:
        report = {"endpoint": EP, "url": WORKER_URL, "state": "ready", "max_perf": 1}
        for worker_id in ("w1", "w2", "w1"):
            assert (await client.post("/worker_status/", json={**report, "id": worker_id}, headers=WORKER)).is_success
        refused = await client.post("/worker_status/", json={**report, "id": "w3"}, headers=WORKER)
        assert_error(refused, 409, "too_many_workers")
        assert "--max-workers-per-endpoint" in refused.json()["error"]["message"]
        assert [w["id"] for w in await workers(client)] == ["w1", "w2"]


async def test_a_new_request_beyond_the_endpoints_open_requests_is_answered_429() -> None:
    settings = DispatcherSettings(autoscale_interval_s=3600.0, max_open_requests=2, retry_after_s=3)
    service = DispatcherService(settings, registry=registry(), signer=Signer.generate())  # the store from settings
    async with serving(service) as client:
        first = await route(client)  # no worker: both wait, and are open
        await route(client)
        body = {"endpoint": EP, "api_key": API_KEY, "cost": 10.0}
        refused = await client.post("/route/", json=body)
        assert "--max-open-requests" in assert_error(refused, 429, "too_many_open_requests")
        assert refused.headers["retry-after"] == "3"
        polled = await route(client, request_idx=first["request_idx"])  # a poll is not a new request
        assert polled["request_idx"] == first["request_idx"]
        other = await client.post("/route/", json={**body, "endpoint": OTHER, "api_key": OTHER_API_KEY})
        assert other.status_code == 200  # the cap is the endpoint's
        text = (await client.get("/metrics")).text
        assert 'dispatcher_routes_total{endpoint="ep",outcome="too_many_open_requests"} 1.0' in text
        assert 'dispatcher_errors_total{code="too_many_open_requests"} 1.0' in text


async def test_another_endpoints_worker_cannot_take_a_url_by_spelling_it_differently(client: httpx.AsyncClient) -> None:
    """A URL is bound to one worker in its one spelling: another tenant's worker token reporting an alias of it would
    send its clients, with signed assignments, to this endpoint's worker."""
    await register(client, "w1", url="http://10.0.0.5:8000")
    await register(client, "named", url="HTTP://Worker.Example:80/")
    report = {"endpoint": OTHER, "id": "squatter", "state": "ready", "max_perf": 1}
    other = {"authorization": f"Bearer {OTHER_WORKER_TOKEN}"}
    for alias in (
        "HTTP://10.0.0.5:8000/",
        "http://10.0.0.5:08000",
        "http://worker.example",
        "http://WORKER.example:80",
    ):
        taken = await client.post("/worker_status/", json={**report, "url": alias}, headers=other)
        assert_error(taken, 409, "url_taken")
    for alias in ("http://10.0.5:8000", "http://167772165:8000"):  # 10.0.0.5 to inet_aton: refused outright
        refused = await client.post("/worker_status/", json={**report, "url": alias}, headers=other)
        assert "dotted quad" in assert_error(refused, 400, "invalid_request")
    assert [(w["id"], w["url"]) for w in await workers(client)] == [
        ("named", "http://worker.example"),
        ("w1", "http://10.0.0.5:8000"),
    ]
    assert (await route(client))["url"] in {"http://10.0.0.5:8000", "http://worker.example"}


@pytest.mark.parametrize("path", ["/worker_status/", "/delete_requests/"])
async def test_worker_paths_without_a_token_are_401_before_the_body_is_judged(
    client: httpx.AsyncClient, path: str
) -> None:
    # schemathesis found these answering 400 for a bad body when the required Authorization header was missing
    for content in (b'{"endpoint": "ep", "url": "not a url"}', b"{nope"):
        r = await client.post(path, content=content, headers={"content-type": "application/json"})
        assert_error(r, 401, "unauthorized")
    r = await client.post(path, content=b"{nope", headers={"content-type": "application/json", **WORKER})
    assert_error(r, 400, "invalid_request")  # with a token, the body is judged as before


async def test_endpoint_info_needs_the_endpoints_api_key(client: httpx.AsyncClient) -> None:
    for token in ("dk_wrong", WORKER_TOKEN, OTHER_API_KEY):
        r = await client.get(f"/endpoints/{EP}/", headers={"authorization": f"Bearer {token}"})
        assert_error(r, 401, "unauthorized")
    assert_error(await client.get(f"/endpoints/{EP}/"), 401, "unauthorized")
    assert_error(await client.get("/endpoints/nope/", headers=CLIENT), 401, "unauthorized")
    info = (await client.get(f"/endpoints/{EP}/", headers=CLIENT)).json()
    assert info["endpoint"] == EP
    assert info["settings"]["max_queue_time_s"] == 30.0
    assert info["autoscale"]["action"] == "hold"


async def test_the_admin_token_opens_every_endpoint() -> None:
    async with serving(make_service(admin_token="s3cret")) as client:
        admin = {"authorization": "Bearer s3cret"}
        assert (await client.get(f"/endpoints/{OTHER}/", headers=admin)).json()["endpoint"] == OTHER
        assert_error(await client.get("/endpoints/nope/", headers=admin), 404, "not_found")
        near_miss = {"authorization": "Bearer s3cre"}
        assert_error(await client.get("/endpoints/nope/", headers=near_miss), 401, "unauthorized")
        assert (await client.get(f"/endpoints/{EP}/", headers=CLIENT)).status_code == 200


# -- malformed requests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields",
    [{"cost": -1}, {"cost": 1e10}, {"cost": "10"}, {"cost": True}, {"cost": None}, {"request_idx": -1},
     {"request_idx": 1.5}, {"request_idx": "1"}, {"endpoint": ""}, {"endpoint": 5}, {"api_key": 5}],
)  # fmt: skip
async def test_route_400s(client: httpx.AsyncClient, fields: dict[str, Any]) -> None:
    await register(client)
    r = await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": 10.0, **fields})
    assert_error(r, 400, "invalid_request")
    assert (await workers(client))[0]["load"] == 0.0


async def test_a_negative_zero_cost_is_answered_and_signed_as_zero(client: httpx.AsyncClient) -> None:
    await register(client)
    r = await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": -0.0})
    assert r.status_code == 200, r.text
    assert '"cost":0.0' in r.text  # was -0.0, signed as "-0"
    body = r.json()
    assert math.copysign(1.0, body["cost"]) == 1.0
    assert (await keyring(client)).verify(Assignment.from_mapping(body), body["signature"])


async def test_a_ready_worker_without_perf_is_refused_with_the_field_named(client: httpx.AsyncClient) -> None:
    report = {"endpoint": EP, "id": "w1", "url": WORKER_URL, "state": "ready", "max_perf": 0}
    message = assert_error(await client.post("/worker_status/", json=report, headers=WORKER), 400, "invalid_request")
    assert "'max_perf'" in message
    assert await workers(client) == []  # before, it was kept and made every route answer "busy" forever
    await register(client, state="loading", max_perf=0.0)  # still measuring: fine
    assert (await route(client))["status"] == {**dict.fromkeys(STATUS_KEYS, 0), "loading": 1}


async def test_reported_numbers_are_bounded_by_max_report_value() -> None:
    async with serving(make_service(max_report_value=1000.0)) as client:
        for field in ("max_perf", "cur_load"):
            report = {"endpoint": EP, "id": "w1", "url": WORKER_URL, "state": "ready", "max_perf": 1, field: 1000.5}
            message = assert_error(
                await client.post("/worker_status/", json=report, headers=WORKER), 400, "invalid_request"
            )
            assert f"'{field}' must be between 0 and 1000" in message
        await register(client, max_perf=1000.0)
        assert [w["max_perf"] for w in await workers(client)] == [1000.0]


async def test_an_unknown_request_idx_is_400(client: httpx.AsyncClient) -> None:
    await register(client)
    message = assert_error(
        await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": 1, "request_idx": 424242}),
        400,
        "invalid_request",
    )
    assert "424242" in message
    # a request_idx issued for one endpoint is unknown to another
    issued = (await route(client))["request_idx"]
    r = await client.post(
        "/route/", json={"endpoint": OTHER, "api_key": OTHER_API_KEY, "cost": 1, "request_idx": issued}
    )
    assert_error(r, 400, "invalid_request")


@pytest.mark.parametrize(
    "content",
    [b"{nope", b"", b"[1, 2]", b'"text"', b"null", b'{"endpoint": "ep", "api_key": "k", "cost": NaN}',
     b'{"endpoint": "ep", "api_key": "k", "cost": Infinity}', b'{"endpoint": "ep", "cost": 1e400}',
     b'{"endpoint": "ep", "cost": 1' + b"0" * 400 + b"}", b"\xff\xfe"],
)  # fmt: skip
async def test_bodies_that_are_not_a_json_object_are_400(client: httpx.AsyncClient, content: bytes) -> None:
    r = await client.post("/route/", content=content, headers={"content-type": "application/json", **CLIENT})
    assert_error(r, 400, "invalid_request")


@pytest.mark.parametrize("path", ["/route/", "/worker_status/", "/delete_requests/"])
async def test_wrong_content_type_is_415(client: httpx.AsyncClient, path: str) -> None:
    r = await client.post(path, content=b'{"endpoint": "ep"}', headers={"content-type": "text/plain", **CLIENT})
    assert_error(r, 415, "invalid_request")


async def test_json_content_types_with_parameters_or_suffixes_are_accepted(client: httpx.AsyncClient) -> None:
    await register(client)
    content = b'{"endpoint": "ep", "cost": 1}'
    for content_type in ("application/json; charset=utf-8", "application/vnd.test+json", "Application/JSON"):
        r = await client.post("/route/", content=content, headers={"content-type": content_type, **CLIENT})
        assert r.status_code == 200, (content_type, r.text)


@pytest.mark.parametrize("path", ["/route/", "/worker_status/", "/delete_requests/"])
async def test_a_body_over_max_body_bytes_is_413(path: str) -> None:
    async with serving(make_service(max_body_bytes=200)) as client:
        r = await client.post(path, json={"endpoint": EP, "api_key": API_KEY, "cost": 1, "pad": "x" * 300},
                              headers=WORKER)  # fmt: skip
        assert_error(r, 413, "invalid_request")
        small = await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": 1, "pad": "x" * 50})
        assert small.status_code == 200, small.text


async def test_a_chunked_body_over_the_limit_is_413() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"endpoint": "ep", "api_key": "' + API_KEY.encode() + b'", "cost": 1, "pad": "'
        for _ in range(10):
            yield b"x" * 50
        yield b'"}'

    async with serving(make_service(max_body_bytes=200)) as client:
        r = await client.post("/route/", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_error(r, 413, "invalid_request")


async def test_wrong_method_and_unknown_path(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/route/"), 405, "method_not_allowed")
    assert_error(wrong := await client.post("/pubkey/", json={}), 405, "method_not_allowed")
    assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD"}  # RFC 9110: a 405 lists the methods that work
    assert (await client.request("TRACE", "/route/")).headers["allow"] == "POST"  # past the fast path
    assert_error(await client.get("/no/such/path"), 404, "not_found")
    # no 307 to the slashed path: it pointed at the client's Host over plain http, which behind a TLS load balancer
    # resent the body in the clear
    unslashed = await client.post("/route", json={})
    assert_error(unslashed, 404, "not_found")
    assert "did you mean /route/?" in unslashed.json()["error"]["message"]
    templated = await client.get("/endpoints/ep", headers=CLIENT)
    assert_error(templated, 404, "not_found")
    assert "did you mean /endpoints/ep/?" in templated.json()["error"]["message"]
    assert "did you mean" not in (await client.get("/no/such/path")).json()["error"]["message"]


# -- draining, health, metrics, docs ----------------------------------------------------------------------------
async def test_draining_refuses_new_routes_with_retry_after(
    client: httpx.AsyncClient, service: DispatcherService
) -> None:
    await register(client)
    service.begin_drain()
    r = await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": 1})
    assert_error(r, 503, "shutting_down")
    assert (r.headers["retry-after"], r.headers["connection"]) == ("1", "close")
    health = await client.get("/health")
    assert (health.status_code, health.json()["status"]) == (503, "draining")
    livez = await client.get("/livez")  # draining is alive: taken out of the balancer, never restarted
    assert (livez.status_code, livez.json()) == (200, {"status": "alive"})
    await register(client)  # workers still report while the dispatcher drains
    assert "dispatcher_ready 0.0" in (await client.get("/metrics")).text


async def test_health(client: httpx.AsyncClient, service: DispatcherService) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert (body["status"], body["store"], body["store_up"], body["endpoints"]) == ("ok", "memory", True, 2)
    assert body["key_id"] == service.signer.key_id
    assert body["version"]
    assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's sight


async def test_a_route_sent_again_with_its_idempotency_key_is_a_retry(client: httpx.AsyncClient) -> None:
    await register(client, "w1")
    await register(client, "w2", url="http://10.0.0.6:8000")
    body = {"endpoint": EP, "api_key": API_KEY, "cost": 10.0}
    first = await client.post("/route/", json=body, headers={"Idempotency-Key": "c4f2a9e0-req-1"})
    # the IETF draft's quoted form names the same key: the same request on the same worker, signed anew
    again = await client.post("/route/", json=body, headers={"Idempotency-Key": '"c4f2a9e0-req-1"'})
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert (again.json()["request_idx"], again.json()["url"]) == (first.json()["request_idx"], first.json()["url"])
    assert again.json()["reqnum"] == first.json()["reqnum"] + 1
    assert sorted(w["load"] for w in await workers(client)) == [0.0, 10.0]
    text = (await client.get("/metrics")).text
    assert 'dispatcher_routes_total{endpoint="ep",outcome="assigned"} 1.0' in text
    assert 'dispatcher_routes_total{endpoint="ep",outcome="reassigned"} 1.0' in text
    for bad in ("", "two words", 'a"b', "k" * 256, "é"):
        r = await client.post("/route/", json=body, headers={"Idempotency-Key": bad.encode()})
        assert "Idempotency-Key" in assert_error(r, 400, "invalid_request"), bad


async def test_metrics(client: httpx.AsyncClient) -> None:
    await route(client)  # no worker yet
    await register(client)
    first = await route(client)
    await register(client, "w2", url="http://w2:8000")  # where the retry goes: it avoids the first worker
    await route(client, request_idx=first["request_idx"])
    await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": 1, "request_idx": 777_777})
    await client.post("/route/", json={"endpoint": EP, "api_key": "dk_wrong", "cost": 1})
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in (
        'dispatcher_routes_total{endpoint="ep",outcome="no_ready_worker"} 1.0',
        'dispatcher_routes_total{endpoint="ep",outcome="assigned"} 1.0',
        'dispatcher_routes_total{endpoint="ep",outcome="reassigned"} 1.0',
        'dispatcher_routes_total{endpoint="ep",outcome="unknown_request"} 1.0',
        "dispatcher_pick_duration_seconds_count 4.0",  # every store call, not the 401
        "dispatcher_pick_duration_seconds_bucket",
        'dispatcher_worker_reports_total{endpoint="ep"} 2.0',
        'dispatcher_errors_total{code="unauthorized"} 1.0',
        'dispatcher_errors_total{code="invalid_request"} 1.0',
        'dispatcher_http_requests_total{method="POST",route="/route/",status="200"} 3.0',
        "dispatcher_ready 1.0",
    ):
        assert line in text, line
    assert 'endpoint="nope"' not in text


async def test_refresh_gauges_sets_worker_and_scaling_gauges(
    client: httpx.AsyncClient, service: DispatcherService
) -> None:
    await register(client, "w1", url="http://w1:1")
    await register(client, "w2", url="http://w2:1", state="loading", max_perf=0.0)
    before = (await client.get("/metrics")).text
    assert 'dispatcher_workers{endpoint="ep",state="ready"} 1.0' not in before  # the loop ran before the reports
    await route(client, cost=50.0)
    decisions = {d.endpoint: d for d in await service.refresh_gauges()}
    assert set(decisions) == {EP, OTHER}
    # demand = max(50 / 60 s window, 50 outstanding / 30 s) = 5/3 u/s; perf 100 * 0.9 -> 1 worker wanted
    assert decisions[EP].wanted_workers == 1
    assert decisions[OTHER].wanted_workers == 0
    waiting = await client.post("/route/", json={"endpoint": OTHER, "api_key": OTHER_API_KEY, "cost": 0})
    assert waiting.json()["status"]["ready"] == 0  # no worker at all: the client polls
    decisions = {d.endpoint: d for d in await service.refresh_gauges()}
    assert (decisions[OTHER].waiting_requests, decisions[OTHER].wanted_workers) == (1, 1)
    text = (await client.get("/metrics")).text
    for line in (
        'dispatcher_workers{endpoint="ep",state="ready"} 1.0',
        'dispatcher_workers{endpoint="ep",state="loading"} 1.0',
        'dispatcher_workers{endpoint="ep",state="inactive"} 0.0',
        'dispatcher_workers{endpoint="other",state="ready"} 0.0',
        'dispatcher_wanted_workers{endpoint="ep"} 1.0',
        'dispatcher_wanted_workers{endpoint="other"} 1.0',
        'dispatcher_waiting_requests{endpoint="other"} 1.0',
        'dispatcher_waiting_requests{endpoint="ep"} 0.0',
        'dispatcher_wanted_cold_workers{endpoint="ep"} 0.0',
        'dispatcher_outstanding_load{endpoint="ep"} 50.0',
        'dispatcher_open_requests{endpoint="ep"} 1.0',
        'dispatcher_open_requests{endpoint="other"} 1.0',
    ):
        assert line in text, line


async def test_silent_workers_are_forgotten_by_the_refresh_loop() -> None:
    settings = DispatcherSettings(heartbeat_timeout_s=0.1, worker_forget_s=0.3, autoscale_interval_s=0.02)
    service = DispatcherService(settings, registry=registry(), store=MemoryStore(), signer=Signer.generate())
    async with serving(service) as client:
        await register(client, "holding", url="http://holding:1")
        await register(client, "silent", url="http://silent:1")
        held = await route(client)  # "holding" wins the id tie-break
        assert held["url"] == "http://holding:1"

        async def ids() -> set[str]:
            return {w["id"] for w in await workers(client)}

        deadline = time.monotonic() + LIFESPAN_TIMEOUT_S
        while await ids() != {"holding"}:
            assert time.monotonic() < deadline, await ids()
            await asyncio.sleep(0.02)
        # "holding" is long silent but holds a request: kept until it is released
        await asyncio.sleep(0.5)
        assert await ids() == {"holding"}
        released = await client.post("/delete_requests/", json={"endpoint": EP, "request_idxs": [held["request_idx"]]},
                                     headers=WORKER)  # fmt: skip
        assert released.json()["released"] == 1
        while await ids():
            assert time.monotonic() < deadline, await ids()
            await asyncio.sleep(0.02)
        assert (await route(client))["status"] == dict.fromkeys(STATUS_KEYS, 0)  # none counted inactive
        assert await service.forget_silent_workers() == 0


class FlakyStatsStore(MemoryStore):
    """load_stats raises an unexpected error twice, then works."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 2

    async def load_stats(self, endpoint: str, window_s: float) -> LoadStats:
        if self.failures:
            self.failures -= 1
            raise ZeroDivisionError("a bug in one tick")
        return await super().load_stats(endpoint, window_s)


async def test_the_refresh_loop_outlives_an_unexpected_error_in_a_tick() -> None:
    """It used to catch StoreUnavailable only: one other error ended the gauges and the forget sweep for good."""
    store = FlakyStatsStore()
    service = DispatcherService(DispatcherSettings(autoscale_interval_s=0.02), registry=registry(), store=store,
                                signer=Signer.generate())  # fmt: skip
    async with serving(service) as client:
        await register(client, "w1")
        deadline = time.monotonic() + LIFESPAN_TIMEOUT_S
        while 'dispatcher_wanted_workers{endpoint="ep"}' not in (await client.get("/metrics")).text:
            assert time.monotonic() < deadline, "the gauges never refreshed after the failing ticks"
            await asyncio.sleep(0.02)
    assert store.failures == 0


async def test_openapi_states_the_configured_limits_and_the_query_key() -> None:
    async with serving(make_service(max_cost=500.0, max_report_value=1e6)) as client:
        spec = (await client.get("/openapi.json")).json()
    route_op = spec["paths"]["/route/"]["post"]
    body = route_op["requestBody"]["content"]["application/json"]["schema"]
    assert (body["properties"]["cost"]["minimum"], body["properties"]["cost"]["maximum"]) == (0, 500.0)
    assert {"name": "api_key", "in": "query"}.items() <= route_op["parameters"][0].items()
    report = spec["paths"]["/worker_status/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert report["properties"]["max_perf"]["maximum"] == report["properties"]["cur_load"]["maximum"] == 1e6
    assert "> 0 when state is ready" in report["properties"]["max_perf"]["description"]


async def test_openapi_is_valid(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    validate(spec)
    assert set(spec["paths"]) == {
        "/route/", "/worker_status/", "/delete_requests/", "/pubkey/", "/endpoints/{name}/", "/health", "/metrics",
        "/openapi.json", "/livez",
    }  # fmt: skip


# -- the state store down ---------------------------------------------------------------------------------------
class DownStore(MemoryStore):
    """Routes, pings and the start-up check fail as an unreachable Redis would; everything else works."""

    async def route(self, *args: object, **kwargs: object) -> RouteOutcome:
        raise StoreUnavailable("connection refused")

    async def ping(self) -> None:
        raise StoreUnavailable("connection refused")

    async def server_problems(self) -> list[str]:
        raise StoreUnavailable("connection refused")


class EvictingStore(MemoryStore):
    async def server_problems(self) -> list[str]:
        return ["maxmemory-policy is allkeys-lru: set maxmemory-policy noeviction"]


async def test_what_would_break_the_store_is_warned_about_at_start(caplog: pytest.LogCaptureFixture) -> None:
    down = "could not check the state store's settings at start: connection refused"
    for store, expected in ((EvictingStore(), "state store: maxmemory-policy is allkeys-lru"), (DownStore(), down)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="service.dispatch.app"):
            async with serving(make_service(store)):
                deadline = time.monotonic() + 5.0
                while expected not in caplog.text:  # checked off the way of serving, once
                    assert time.monotonic() < deadline, caplog.text
                    await asyncio.sleep(0.01)


async def test_store_unavailable_is_503_with_retry_after() -> None:
    async with serving(make_service(DownStore(), retry_after_s=7)) as client:
        r = await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": 1})
        message = assert_error(r, 503, "store_unavailable")
        assert "connection refused" in message
        assert r.headers["retry-after"] == "7"
        health = await client.get("/health")
        # still ready: every replica shares the store, and this 503 with Retry-After beats no replica at all
        assert (health.status_code, health.json()["status"], health.json()["store_up"]) == (200, "degraded", False)
        assert "connection refused" in health.json()["error"]
        text = (await client.get("/metrics")).text
        assert 'dispatcher_errors_total{code="store_unavailable"} 1.0' in text
        assert "dispatcher_store_up 0.0" in text


class HangingStore(MemoryStore):
    """A store whose PING never answers (a frozen Redis)."""

    async def ping(self) -> None:
        await asyncio.Event().wait()


async def test_health_answers_within_its_store_timeout_when_the_store_hangs() -> None:
    """A probe must get its answer: a PING waiting out the Redis timeouts (2 s) timed every replica's 2 s readiness
    probe out at once."""
    async with serving(make_service(HangingStore())) as client:
        health = await asyncio.wait_for(client.get("/health"), HEALTH_PROBE_TIMEOUT_S)  # as the probe would wait
    assert (health.status_code, health.json()["status"], health.json()["store_up"]) == (200, "degraded", False)
    assert "did not answer PING within 0.5 s" in health.json()["error"]


async def test_handlers_work_without_the_lifespan() -> None:
    """An embedding server that skips the lifespan still routes and signs."""
    service = make_service()
    transport = httpx.ASGITransport(app=service.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await register(client)
        body = await route(client)
        assert (await keyring(client)).verify(Assignment.from_mapping(body), body["signature"])


async def test_a_next_key_is_published_before_it_signs_so_workers_know_it_when_it_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file, next_file = tmp_path / "dispatch.key", tmp_path / "next.key"
    first = write_key_file(key_file)
    next_pub = tmp_path / "next.key.pub"  # keygen's NEXT.pub
    settings = DispatcherSettings(autoscale_interval_s=3600.0, signing_key_file=key_file, next_public_key_file=next_pub)
    service = DispatcherService(settings, registry=registry(), store=MemoryStore())  # no such file yet: none

    async def published() -> list[tuple[str, bool]]:
        return [(k["key_id"], k["current"]) for k in (await client.get("/pubkey/")).json()["keys"]]

    async with serving(service) as client:
        await register(client)
        assert await published() == [(first.key_id, True)]
        second = write_key_file(next_file)
        service.on_reload_signal()  # step 1: published, not signing
        assert await published() == [(first.key_id, True), (second.key_id, False)]
        assert (await route(client))["key_id"] == first.key_id
        worker_ring = await keyring(client)  # what a worker fetched between the two steps

        next_pub.write_text("not a key\n")  # a bad file: logged, the published keys stay as they were
        service.on_reload_signal()
        assert "next public key file rejected" in caplog.text
        assert await published() == [(first.key_id, True), (second.key_id, False)]

        next_pub.write_text(second.public_key.hex() + "\n")
        os.replace(next_file, key_file)  # step 2: the next key signs; its .pub stays in place
        service.on_reload_signal()
        assert await published() == [(second.key_id, True), (first.key_id, False)]  # listed once, as current
        after = await route(client)
        assert after["key_id"] == second.key_id
        assert worker_ring.verify(Assignment.from_mapping(after), after["signature"])  # no fetch needed

        next_pub.unlink()  # between rotations: nothing upcoming
        service.on_reload_signal()
        assert await published() == [(second.key_id, True), (first.key_id, False)]


async def test_an_endpoints_file_failing_unforeseen_on_sighup_does_not_skip_the_key_rotation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error other than ConfigError escaped the endpoints reload and the signal handler with it: the key rotation
    sent in the same SIGHUP was dropped, the old key signing on."""
    key_file, config = tmp_path / "dispatch.key", tmp_path / "endpoints.toml"
    first = write_key_file(key_file)
    save_config(config, registry())
    settings = DispatcherSettings(autoscale_interval_s=3600.0, signing_key_file=key_file, config=config)
    service = DispatcherService(settings, registry=registry(), store=MemoryStore())

    def broken(path: Path) -> EndpointRegistry:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(dispatch_app, "load_config", broken)
    async with serving(service) as client:
        await register(client)
        second = write_key_file(tmp_path / "new.key")
        os.replace(tmp_path / "new.key", key_file)
        service.on_reload_signal()
        assert "SIGHUP reload of the endpoints file failed" in caplog.text
        assert (await route(client))["key_id"] == second.key_id != first.key_id
        assert service.registry.get(EP) is not None  # the endpoints kept serving


async def test_a_signing_key_refused_on_sighup_keeps_the_next_key_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The promotion step (next key moved over the key file) with a key file the dispatcher refuses: the next key
    keeps being published, or workers fetching meanwhile would drop it and then refuse it once it signs."""
    key_file, next_pub = tmp_path / "dispatch.key", tmp_path / "next.key.pub"
    first = write_key_file(key_file)
    second = write_key_file(tmp_path / "next.key")
    settings = DispatcherSettings(autoscale_interval_s=3600.0, signing_key_file=key_file, next_public_key_file=next_pub)
    service = DispatcherService(settings, registry=registry(), store=MemoryStore())
    async with serving(service) as client:
        service.on_reload_signal()
        os.replace(tmp_path / "next.key", key_file)
        key_file.chmod(0o640)  # refused: group-readable
        next_pub.unlink()
        service.on_reload_signal()
        assert "signing key file rejected" in caplog.text
        keys = [(k["key_id"], k["current"]) for k in (await client.get("/pubkey/")).json()["keys"]]
        assert keys == [(first.key_id, True), (second.key_id, False)]
        key_file.chmod(0o600)
        service.on_reload_signal()
        keys = [(k["key_id"], k["current"]) for k in (await client.get("/pubkey/")).json()["keys"]]
        assert keys == [(second.key_id, True), (first.key_id, False)]


async def test_sighup_key_rotation_publishes_the_old_key_until_its_assignments_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch_app, "RETIRED_KEY_GRACE_S", 0.0)
    key_file = tmp_path / "dispatch.key"
    first = write_key_file(key_file)
    settings = DispatcherSettings(autoscale_interval_s=3600.0, signing_key_file=key_file, assignment_ttl_s=0.3)
    service = DispatcherService(settings, registry=registry(), store=MemoryStore())
    async with serving(service) as client:
        await register(client)
        before = await route(client)
        key_file.write_text("not a key")  # a bad file: logged, and the key in use keeps signing
        service.on_reload_signal()
        assert service.signer.key_id == first.key_id
        key_file.unlink()
        key_file.with_name("dispatch.key.pub").unlink()
        second = write_key_file(key_file)
        service.on_reload_signal()
        after = await route(client)
        assert (before["key_id"], after["key_id"]) == (first.key_id, second.key_id)
        assert after["reqnum"] == before["reqnum"] + 1  # same process, same state: reqnums carry on
        published = (await client.get("/pubkey/")).json()["keys"]
        assert [(k["key_id"], k["current"]) for k in published] == [(second.key_id, True), (first.key_id, False)]
        ring = await keyring(client)
        for answer in (before, after):
            assert ring.verify(Assignment.from_mapping(answer), answer["signature"])
        await asyncio.sleep(0.5)  # past the old key's last assignment's expiry
        published = (await client.get("/pubkey/")).json()["keys"]
        assert [k["key_id"] for k in published] == [second.key_id]


async def test_an_endpoint_removed_on_sighup_leaves_no_gauges_behind(tmp_path: Path) -> None:
    """Its last dispatcher_wanted_workers stayed exported: an autoscaler reading it kept scaling a pool that is gone."""
    config = tmp_path / "endpoints.toml"
    save_config(config, registry())
    service = make_service(config=config)
    async with serving(service) as client:
        await service.refresh_gauges()
        assert 'dispatcher_wanted_workers{endpoint="other"}' in (await client.get("/metrics")).text
        save_config(config, EndpointRegistry({EP: registry().endpoints[EP]}))
        service.on_reload_signal()
        await service.refresh_gauges()
        text = (await client.get("/metrics")).text
    assert 'dispatcher_wanted_workers{endpoint="ep"}' in text
    assert [line for line in text.splitlines() if 'endpoint="other"' in line] == []


async def test_the_workers_of_an_endpoint_removed_on_sighup_are_forgotten_too(tmp_path: Path) -> None:
    """The forget sweep went over the configured endpoints only: a removed one's records (its workers can no longer
    report) stayed in the store for good, in Redis across restarts too."""
    config = tmp_path / "endpoints.toml"
    save_config(config, registry())
    store = MemoryStore()
    service = make_service(store, config=config, heartbeat_timeout_s=0.1, worker_forget_s=0.2, request_ttl_s=1.0)
    async with serving(service) as client:
        await register(client, "v1", url="http://v1:1", endpoint=OTHER, token=OTHER_WORKER_TOKEN)
        await register(client, "v2", url="http://v2:1", endpoint=OTHER, token=OTHER_WORKER_TOKEN)
        held = await client.post("/route/", json={"endpoint": OTHER, "api_key": OTHER_API_KEY, "cost": 1.0})
        assert held.json()["url"] == "http://v1:1"
        save_config(config, EndpointRegistry({EP: registry().endpoints[EP]}))
        service.on_reload_signal()
        await asyncio.sleep(0.3)
        assert await service.forget_silent_workers() == 1  # v2; v1 holds a request until its ttl
        assert [w.worker_id for w in await store.workers(OTHER)] == ["v1"]
        await asyncio.sleep(0.8)
        assert await service.forget_silent_workers() == 1
        assert await store.workers(OTHER) == []
        save_config(config, registry())  # back again: its workers report afresh
        service.on_reload_signal()
        await register(client, "v1", url="http://v1:1", endpoint=OTHER, token=OTHER_WORKER_TOKEN)
        assert [w.worker_id for w in await store.workers(OTHER)] == ["v1"]
    # a process started with the endpoint already gone (a restart, another replica) forgets its records as well
    await asyncio.sleep(0.25)
    settings = DispatcherSettings(heartbeat_timeout_s=0.1, worker_forget_s=0.2, autoscale_interval_s=3600.0)
    only_ep = EndpointRegistry({EP: registry().endpoints[EP]})
    restarted = DispatcherService(settings, registry=only_ep, store=store, signer=Signer.generate())
    assert await restarted.forget_silent_workers() == 1
    assert await store.workers(OTHER) == []


async def test_a_refresh_under_way_when_an_endpoint_is_removed_does_not_bring_its_gauges_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "endpoints.toml"
    save_config(config, registry())
    store = MemoryStore()
    service = make_service(store, config=config)
    async with serving(service) as client:
        gate, original = asyncio.Event(), store.load_stats

        async def slow_load_stats(endpoint: str, window_s: float) -> LoadStats:
            await gate.wait()  # Redis taking its time: the pass is under way when SIGHUP comes
            return await original(endpoint, window_s)

        monkeypatch.setattr(store, "load_stats", slow_load_stats)
        refresh = asyncio.ensure_future(service.refresh_gauges())
        await asyncio.sleep(0.01)
        save_config(config, EndpointRegistry({EP: registry().endpoints[EP]}))
        service.on_reload_signal()
        gate.set()
        await refresh
        text = (await client.get("/metrics")).text
    assert 'dispatcher_wanted_workers{endpoint="ep"}' in text
    assert [line for line in text.splitlines() if 'endpoint="other"' in line] == []


# -- the document against live answers ----------------------------------------------------------------------------
async def test_every_answer_is_as_the_openapi_document_says() -> None:
    """Each operation's answers validate against their documented schema, with every key they always carry listed
    as required (most 200s were documented as a bare object, /health as one for all of its states), and each 401's
    WWW-Authenticate documented."""
    service = make_service(admin_token="s3cret")
    admin = {"authorization": "Bearer s3cret"}
    async with serving(service) as client:
        spec = (await client.get("/openapi.json")).json()

        def check(path: str, answer: httpx.Response, method: str = "post") -> None:
            assert_answers_as_documented(spec, path, method, answer)

        check("/worker_status/", await client.post("/worker_status/", json=report_body(), headers=WORKER))
        loading = report_body(id="w2", url="http://10.0.0.6:8000", state="loading", max_perf=0)
        check("/worker_status/", await client.post("/worker_status/", json=loading, headers=WORKER))
        assigned = await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": 1})
        check("/route/", assigned)
        no_ready = await client.post("/route/", json={"endpoint": OTHER, "api_key": OTHER_API_KEY, "cost": 1})
        check("/route/", no_ready)
        assert set(no_ready.json()["status"]) == set(STATUS_KEYS)
        unknown = await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": 1, "request_idx": 9})
        check("/route/", unknown)
        assert unknown.json()["error"]["reason"] == "unknown_request_idx"
        idx = assigned.json()["request_idx"]
        release = {"endpoint": EP, "request_idxs": [idx, 12345], "id": None}
        check("/delete_requests/", await client.post("/delete_requests/", json=release, headers=WORKER))
        check("/pubkey/", await client.get("/pubkey/"), "get")
        for headers in (CLIENT, admin):
            info = await client.get(f"/endpoints/{EP}/", headers=headers)
            check("/endpoints/{name}/", info, "get")
            assert len(info.json()["workers"]) == 2
        check("/endpoints/{name}/", await client.get("/endpoints/nope/", headers=admin), "get")  # 404
        check("/health", await client.get("/health"), "get")
        # every 401 names its scheme, as documented
        check("/route/", await client.post("/route/", json={"endpoint": EP, "cost": 1}))
        check("/worker_status/", await client.post("/worker_status/", json=report_body()))
        check("/delete_requests/", await client.post("/delete_requests/", json=release))
        check("/endpoints/{name}/", await client.get(f"/endpoints/{EP}/"), "get")
        check("/worker_status/", await client.post("/worker_status/", content=b"{}", headers={"content-type": "a/b"}))
        service.begin_drain()
        check("/health", await client.get("/health"), "get")  # 503 draining
        draining = await client.post("/worker_status/", json=report_body(), headers=WORKER)
        assert draining.status_code == 200  # the 503 is store_unavailable only: workers report while it drains
        check("/worker_status/", draining)
        check("/route/", await client.post("/route/", json={"endpoint": EP, "api_key": API_KEY, "cost": 1}))
    async with serving(make_service(DownStore())) as client:
        spec = (await client.get("/openapi.json")).json()
        degraded = await client.get("/health")
        assert degraded.json()["status"] == "degraded"
        assert_answers_as_documented(spec, "/health", "get", degraded)


def report_body(**fields: Any) -> dict[str, Any]:
    return {"endpoint": EP, "id": "w1", "url": WORKER_URL, "state": "ready", "max_perf": 100.0, **fields}


async def test_the_admin_token_is_documented_where_it_is_taken() -> None:
    """/endpoints/{name}/ takes --admin-token beside the endpoint's key: the document says so when one is set, and
    only then (it is cached per setting)."""
    async with serving(make_service()) as client:
        plain = (await client.get("/openapi.json")).json()
    async with serving(make_service(admin_token="s3cret")) as client:
        spec = (await client.get("/openapi.json")).json()
    validate(spec)
    assert spec["paths"]["/endpoints/{name}/"]["get"]["security"] == [{"apiKey": []}, {"adminToken": []}]
    assert {"type": "http", "scheme": "bearer"}.items() <= spec["components"]["securitySchemes"]["adminToken"].items()
    assert plain["paths"]["/endpoints/{name}/"]["get"]["security"] == [{"apiKey": []}]
    assert "adminToken" not in plain["components"]["securitySchemes"]


async def test_the_document_says_what_the_worker_paths_answer_while_draining_and_which_bodies_they_take(
    client: httpx.AsyncClient,
) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path in ("/worker_status/", "/delete_requests/"):
        responses = spec["paths"][path]["post"]["responses"]
        assert responses["503"]["description"] == "store_unavailable"  # they answer 200 while draining
        assert "application/*+json" in responses["415"]["description"]  # body.BodyReader takes those too
        r = await client.post(path, content=b"{}", headers={"content-type": "application/vnd.x+json", **WORKER})
        assert_error(r, 400, "invalid_request")  # read and judged, not refused for its type
    assert "shutting_down" in spec["paths"]["/route/"]["post"]["responses"]["503"]["description"]
