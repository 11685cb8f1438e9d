"""End-to-end: the real dispatcher (``python -m service serve-dispatcher``), real example workers, real Redis,
all as subprocesses talking HTTP; endpoints and keys made with the real CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from nacl.signing import VerifyKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.dispatch.client import DispatchClient
from service.dispatch.records import STATUS_KEYS
from service.dispatch.signing import KeyRing
from service.dispatch.verifier import AssignmentRejected, AssignmentVerifier, RejectReason, fetch_keyring
from tests.e2e.conftest import REPO, Server, free_port, start_process, start_server
from tests.openapi_check import assert_answers_as_documented

ENDPOINT = "echo-ep"
JSON = {"content-type": "application/json"}
WAIT_S = 30.0
POLL_S = 0.05
HEARTBEAT_TIMEOUT_S = 1.5
REPORT_INTERVAL_S = 0.3
BAD_ROUTE_BODIES: tuple[dict[str, Any], ...] = (
    {"cost": -1},
    {"cost": 1e300},  # over --max-cost
    {"cost": "1"},
    {"cost": True},
    {"cost": 1, "request_idx": 999_999},  # never issued
    {"cost": 1, "request_idx": -3},
    {"cost": 1, "endpoint": 5},
)
BAD_REPORT_FIELDS: tuple[dict[str, Any], ...] = (
    {"max_perf": 0},  # ready with no speed: every route would answer busy
    {"max_perf": 1.7e308},  # over --max-report-value: autoscaling's mean overflowed
    {"max_perf": 10, "cur_load": 1e300},
    {"max_perf": 10, "reqnum_floor": -1},
    {"max_perf": 10, "reqnum_floor": "12"},
    {"max_perf": 10, "reqnum_floor": 2**60},
)
RESTART_WAIT_S = 10.0  # far below the request ttl (600 s), which the lost requests' load used to wait for


@dataclass
class Deployment:
    """An endpoints file and a signing key made by the CLI, with the plaintext keys it printed."""

    tmp: Path
    config: Path
    key_file: Path
    api_key: str
    worker_token: str

    def dispatcher(self, *args: str, wait: bool = True, port: int | None = None) -> Server:
        base = ("--config", str(self.config), "--signing-key-file", str(self.key_file))
        return start_server(self.tmp, *base, *args, command="serve-dispatcher", wait=wait, port=port)

    def worker(self, dispatcher: Server, worker_id: str, *, max_perf: float = 1000.0) -> Server:
        port = free_port()
        argv = [
            sys.executable, "-m", "service.dispatch.example_worker", "--dispatcher", dispatcher.url,
            "--endpoint", ENDPOINT, "--worker-token", self.worker_token, "--port", str(port), "--id", worker_id,
            "--max-perf", str(max_perf), "--report-interval", str(REPORT_INTERVAL_S),
        ]  # fmt: skip
        return start_process(self.tmp, argv, url=f"http://127.0.0.1:{port}", name=f"worker-{worker_id}")


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout


def add_endpoint(config: Path, name: str) -> tuple[str, str]:
    out = cli("add-endpoint", name, "--config", str(config))
    api_key = re.search(r"api key:\s+(\S+)", out)
    token = re.search(r"worker token:\s+(\S+)", out)
    assert api_key and token, out
    return api_key.group(1), token.group(1)


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    config, key_file = tmp_path / "endpoints.toml", tmp_path / "dispatch.key"
    cli("keygen", str(key_file))
    assert key_file.stat().st_mode & 0o777 == 0o600
    api_key, worker_token = add_endpoint(config, ENDPOINT)
    assert api_key not in config.read_text() and worker_token not in config.read_text()  # only hashes stored
    return Deployment(tmp_path, config, key_file, api_key, worker_token)


@pytest.fixture
def stack(deployment: Deployment) -> Iterator[tuple[Server, list[Server]]]:
    """A dispatcher (in-memory state) with two example workers."""
    dispatcher = deployment.dispatcher("--heartbeat-timeout-s", str(HEARTBEAT_TIMEOUT_S))
    workers = [deployment.worker(dispatcher, f"w{i}") for i in (1, 2)]
    yield dispatcher, workers
    for worker in workers:
        worker.stop()
    assert dispatcher.stop() == 0, dispatcher.log()


def route(dispatcher: Server, api_key: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{dispatcher.url}/route/", json={"endpoint": ENDPOINT, "cost": 10.0, **body},
                      headers={"authorization": f"Bearer {api_key}"}, timeout=10)  # fmt: skip


def wait_for(predicate: Any, what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for {what}")


async def polled_without_a_worker(dispatcher: Server, *, times: int) -> None:
    """Until the dispatcher has answered "no ready worker" ``times`` times."""
    pattern = re.compile(rf'dispatcher_routes_total{{endpoint="{ENDPOINT}",outcome="no_ready_worker"}} (\S+)')

    def count() -> float:
        found = pattern.search(httpx.get(f"{dispatcher.url}/metrics").text)
        return float(found.group(1)) if found else 0.0

    deadline = time.monotonic() + WAIT_S
    while await asyncio.to_thread(count) < times:
        assert time.monotonic() < deadline, "no no-ready answers counted"
        await asyncio.sleep(POLL_S)


def endpoint_state(dispatcher: Server, api_key: str, name: str = ENDPOINT) -> dict[str, Any]:
    answer = httpx.get(f"{dispatcher.url}/endpoints/{name}/", headers={"authorization": f"Bearer {api_key}"})
    assert answer.status_code == 200, answer.text
    state: dict[str, Any] = answer.json()
    return state


def ready_workers(dispatcher: Server, api_key: str, count: int) -> bool:
    workers = endpoint_state(dispatcher, api_key)["workers"]
    return sum(w["state"] == "ready" and w["active"] for w in workers) >= count


def test_route_then_call_the_worker_with_the_signed_assignment(
    deployment: Deployment, stack: tuple[Server, list[Server]]
) -> None:
    dispatcher, _ = stack
    wait_for(lambda: ready_workers(dispatcher, deployment.api_key, 2), "two ready workers")
    answer = route(dispatcher, deployment.api_key, cost=242.0)
    assert answer.status_code == 200, answer.text
    assignment = answer.json()
    assert {"endpoint", "url", "cost", "reqnum", "request_idx", "signature", "key_id", "expires_at_ms",
            "__request_id"} <= set(assignment)  # fmt: skip
    assert assignment["endpoint"] == ENDPOINT and assignment["cost"] == 242.0
    uuid.UUID(assignment["__request_id"])
    pubkey = httpx.get(f"{dispatcher.url}/pubkey/").json()
    assert pubkey["key_id"] == assignment["key_id"]
    assert pubkey["public_key"] == (deployment.key_file.parent / "dispatch.key.pub").read_text().strip()

    # the README's recipe, with nothing of the package: the bytes a worker in another language would build
    fields = {k: assignment[k] for k in ("endpoint", "expires_at_ms", "key_id", "reqnum", "request_idx", "url")}
    signed = "llm-dispatch-assignment-v1\n" + (
        f'{{"cost":"{assignment["cost"]:.17g}","endpoint":"{fields["endpoint"]}",'
        f'"expires_at_ms":{fields["expires_at_ms"]},"key_id":"{fields["key_id"]}","reqnum":{fields["reqnum"]},'
        f'"request_idx":{fields["request_idx"]},"url":"{fields["url"]}"}}'
    )
    VerifyKey(bytes.fromhex(pubkey["public_key"])).verify(signed.encode(), bytes.fromhex(assignment["signature"]))

    echo = httpx.post(f"{assignment['url']}/echo", json={"auth_data": assignment, "payload": {"prompt": "hi"}})
    assert echo.status_code == 200, echo.text
    assert echo.json()["payload"] == {"prompt": "hi"} and echo.json()["reqnum"] == assignment["reqnum"]

    replay = httpx.post(f"{assignment['url']}/echo", json={"auth_data": assignment, "payload": {"prompt": "hi"}})
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "invalid_assignment"
    assert "replayed" in replay.text

    # the worker reported the request done: its load is back to zero
    wait_for(
        lambda: all(w["load"] == 0 for w in endpoint_state(dispatcher, deployment.api_key)["workers"]),
        "the worker to release the request",
    )
    metrics = httpx.get(f"{dispatcher.url}/metrics").text
    assert f'dispatcher_routes_total{{endpoint="{ENDPOINT}",outcome="assigned"}} 1.0' in metrics
    assert f'dispatcher_released_requests_total{{endpoint="{ENDPOINT}",success="true"}} 1.0' in metrics


async def test_sighup_rotates_the_signing_key_and_assignments_in_flight_still_serve(
    deployment: Deployment, stack: tuple[Server, list[Server]]
) -> None:
    dispatcher, _ = stack
    await asyncio.to_thread(wait_for, lambda: ready_workers(dispatcher, deployment.api_key, 2), "two ready workers")
    kept = (await asyncio.to_thread(route, dispatcher, deployment.api_key)).json()  # used after the rotation
    old_key_id = kept["key_id"]
    fresh = deployment.tmp / "next.key"
    cli("keygen", str(fresh))
    os.replace(fresh, deployment.key_file)
    os.kill(dispatcher.process.pid, signal.SIGHUP)
    pubkey = await asyncio.to_thread(
        wait_for,
        lambda: (keys := httpx.get(f"{dispatcher.url}/pubkey/").json())["key_id"] != old_key_id and keys,
        "the new signing key",
    )
    assert [(k["key_id"], k["current"]) for k in pubkey["keys"]] == [(pubkey["key_id"], True), (old_key_id, False)]

    # the workers still hold the old key only: each fetches the new one before answering, so a client that never
    # retries a refusal (Vast's SDK) is served at the first try
    # both routed before either is served: the first holds its load, so the second goes to the other worker
    fresh = [(await asyncio.to_thread(route, dispatcher, deployment.api_key)).json() for _ in range(2)]
    assert len({a["url"] for a in fresh}) == 2 and {a["key_id"] for a in fresh} == {pubkey["key_id"]}
    for fresh_assignment in fresh:
        served = await asyncio.to_thread(
            httpx.post, f"{fresh_assignment['url']}/echo", json={"auth_data": fresh_assignment, "payload": "new key"}
        )
        assert served.status_code == 200, served.text
    # the state carried on in the same process, so the worker's replay window still takes the older assignment
    late = await asyncio.to_thread(
        httpx.post, f"{kept['url']}/echo", json={"auth_data": kept, "payload": "signed before the rotation"}
    )
    assert late.status_code == 200, late.text
    assert "signing key file rejected" not in dispatcher.log()


def test_every_single_byte_change_to_a_signed_field_is_refused_by_the_worker(
    deployment: Deployment, stack: tuple[Server, list[Server]]
) -> None:
    dispatcher, _ = stack
    wait_for(lambda: ready_workers(dispatcher, deployment.api_key, 2), "two ready workers")
    assignment = route(dispatcher, deployment.api_key, cost=242.5).json()
    worker_url = assignment["url"]
    variants = list(_tampered(assignment))
    assert len(variants) > 100
    with httpx.Client(timeout=10) as client:
        for field_name, tampered in variants:
            answer = client.post(f"{worker_url}/echo", json={"auth_data": tampered, "payload": {}})
            # a key id the worker does not know may be a rotation it has not fetched yet: 503, route it again
            refused = (503, "unknown_key") if field_name == "key_id" else (401, answer.json()["error"]["reason"])
            assert (answer.status_code, answer.json()["error"]["reason"]) == refused, (field_name, tampered)
        # untouched, it is still accepted: the refusals did not burn its reqnum
        assert client.post(f"{worker_url}/echo", json={"auth_data": assignment, "payload": {}}).status_code == 200


async def concurrent_routes(dispatcher: Server, api_key: str, count: int) -> list[dict[str, Any]]:
    auth = {"authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=count), timeout=30) as http:
        answers = await asyncio.gather(
            *(http.post(f"{dispatcher.url}/route/", json={"endpoint": ENDPOINT, "cost": 1.0}, headers=auth)
              for _ in range(count))
        )  # fmt: skip
        spec = (await http.get(f"{dispatcher.url}/openapi.json")).json()
    for answer in answers:  # batch proofs included
        assert answer.status_code == 200, answer.text
        assert_answers_as_documented(spec, "/route/", "post", answer)
    return [dict(a.json()) for a in answers]


def signature_batches(dispatcher: Server) -> dict[str, float]:
    """``dispatcher_signature_batch_size``: signatures made alone, signatures, and the assignments they signed."""
    text = httpx.get(f"{dispatcher.url}/metrics").text
    values = {}
    for name, pattern in (("alone", r'_bucket\{le="1.0"\}'), ("count", "_count"), ("sum", "_sum")):
        found = re.search(rf"^dispatcher_signature_batch_size{pattern} (\S+)$", text, re.MULTILINE)
        assert found, name
        values[name] = float(found.group(1))
    return values


def rfc9162_root(entry: bytes, index: int, size: int, path: list[bytes]) -> bytes:
    """The README's recipe, with nothing of the package: RFC 9162, section 2.1.3.2."""
    fn, sn, r = index, size - 1, hashlib.sha256(b"\x00" + entry).digest()
    for p in path:
        assert sn != 0
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0
    return r


async def test_concurrent_routes_share_batch_signatures_that_workers_verify(
    deployment: Deployment, stack: tuple[Server, list[Server]]
) -> None:
    dispatcher, _ = stack
    await asyncio.to_thread(wait_for, lambda: ready_workers(dispatcher, deployment.api_key, 2), "two ready workers")
    answers: list[dict[str, Any]] = []
    for _ in range(10):  # requests that arrive in one loop iteration share a signature: 64 at once make some
        answers += await concurrent_routes(dispatcher, deployment.api_key, 64)
        if any("batch" in a for a in answers):
            break
    batched = [a for a in answers if "batch" in a]
    assert batched, "no two of 640 concurrent routes were signed together"
    pubkey = (await asyncio.to_thread(httpx.get, f"{dispatcher.url}/pubkey/")).json()
    key = VerifyKey(bytes.fromhex(pubkey["public_key"]))
    for a in batched:  # verified as the README tells a worker in another language to
        signed = "llm-dispatch-assignment-v1\n" + (
            f'{{"cost":"{a["cost"]:.17g}","endpoint":"{a["endpoint"]}","expires_at_ms":{a["expires_at_ms"]},'
            f'"key_id":"{a["key_id"]}","reqnum":{a["reqnum"]},"request_idx":{a["request_idx"]},"url":"{a["url"]}"}}'
        )
        batch = a["batch"]
        entry = bytes.fromhex(batch["nonce"]) + signed.encode()
        root = rfc9162_root(entry, batch["index"], batch["size"], [bytes.fromhex(p) for p in batch["path"]])
        message = b"llm-dispatch-batch-v1\n" + batch["size"].to_bytes(4, "big") + root
        key.verify(message, bytes.fromhex(a["signature"]))
    shared = {a["signature"] for a in batched}
    assert len(shared) < len(batched)  # one signature, several assignments
    batches = await asyncio.to_thread(signature_batches, dispatcher)
    assert batches["count"] < len(answers) == batches["sum"] and batches["alone"] < batches["count"]
    async with httpx.AsyncClient(timeout=10) as http:
        tampered = dict(batched[0])
        path = list(tampered["batch"]["path"])
        path[0] = ("1" if path[0][0] != "1" else "2") + path[0][1:]
        tampered["batch"] = {**tampered["batch"], "path": path}
        refused = await http.post(f"{tampered['url']}/echo", json={"auth_data": tampered, "payload": {}})
        assert (refused.status_code, refused.json()["error"]["reason"]) == (401, "bad_signature")
        for a in answers:  # every one, batched or alone, is served by its worker
            served = await http.post(f"{a['url']}/echo", json={"auth_data": a, "payload": {"n": a["reqnum"]}})
            assert served.status_code == 200, served.text


async def test_without_batch_signatures_every_assignment_is_signed_alone(deployment: Deployment) -> None:
    dispatcher = deployment.dispatcher("--no-batch-signatures")
    auth = {"authorization": f"Bearer {deployment.worker_token}"}
    try:
        report = {"endpoint": ENDPOINT, "id": "w", "url": "http://10.0.0.1:8000", "state": "ready", "max_perf": 1e9}
        answer = await asyncio.to_thread(httpx.post, f"{dispatcher.url}/worker_status/", json=report, headers=auth)
        assert answer.status_code == 200, answer.text
        answers = await concurrent_routes(dispatcher, deployment.api_key, 64)
        assert not any("batch" in a for a in answers)
        pubkey = (await asyncio.to_thread(httpx.get, f"{dispatcher.url}/pubkey/")).json()
        verifier = AssignmentVerifier(
            KeyRing.from_hex([pubkey["public_key"]]), own_urls=["http://10.0.0.1:8000"], endpoint=ENDPOINT
        )
        assert sorted(verifier.verify(a).reqnum for a in answers) == sorted(a["reqnum"] for a in answers)
        assert await asyncio.to_thread(signature_batches, dispatcher) == {"alone": 64, "count": 64, "sum": 64}
    finally:
        assert dispatcher.stop() == 0, dispatcher.log()


def _tampered(assignment: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each signed field with one byte changed, at every position (numbers through their JSON text)."""
    for name in ("endpoint", "url", "key_id", "signature", "cost", "reqnum", "request_idx", "expires_at_ms"):
        value = assignment[name]
        text = value if isinstance(value, str) else repr(value)
        for position in range(len(text)):
            original = text[position]
            replacement = "1" if original != "1" else "2"
            if not isinstance(value, str) and not original.isdigit():
                continue  # a number's '.' or 'e' changed to a digit is another number, tried via its digits
            changed = text[:position] + replacement + text[position + 1 :]
            new_value: Any = changed if isinstance(value, str) else type(value)(changed)
            if new_value == value:
                continue
            yield name, {**assignment, name: new_value}


async def test_expired_assignment_is_refused(deployment: Deployment, tmp_path: Path) -> None:
    dispatcher = deployment.dispatcher("--assignment-ttl-s", "1")
    try:
        async with httpx.AsyncClient() as http:
            await http.post(
                f"{dispatcher.url}/worker_status/",
                json={"endpoint": ENDPOINT, "id": "w", "url": "http://w:1", "state": "ready", "max_perf": 10},
                headers={"authorization": f"Bearer {deployment.worker_token}"},
            )
            answer = (await http.post(f"{dispatcher.url}/route/", json={"endpoint": ENDPOINT, "cost": 1},
                                      headers={"authorization": f"Bearer {deployment.api_key}"})).json()  # fmt: skip
            keyring = await fetch_keyring(dispatcher.url, http)
        now = time.time()
        fresh = AssignmentVerifier(keyring, own_urls=["http://w:1"], endpoint=ENDPOINT, clock=lambda: now)
        assert fresh.verify(answer).reqnum == answer["reqnum"]
        later = AssignmentVerifier(
            keyring, own_urls=["http://w:1"], endpoint=ENDPOINT, clock=lambda: now + 1 + 10, clock_skew_s=5
        )
        with pytest.raises(AssignmentRejected) as rejected:
            later.verify(answer)
        assert rejected.value.reason is RejectReason.EXPIRED
    finally:
        assert dispatcher.stop() == 0


def test_a_silent_worker_gets_no_more_requests_and_retries_land_elsewhere(
    deployment: Deployment, stack: tuple[Server, list[Server]]
) -> None:
    dispatcher, workers = stack
    wait_for(lambda: ready_workers(dispatcher, deployment.api_key, 2), "two ready workers")
    first = route(dispatcher, deployment.api_key).json()
    victim = next(w for w in workers if w.url == first["url"])
    survivor = next(w for w in workers if w is not victim)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    wait_for(
        lambda: any(not w["active"] for w in endpoint_state(dispatcher, deployment.api_key)["workers"]),
        "the killed worker to count as inactive",
    )
    urls = {route(dispatcher, deployment.api_key).json()["url"] for _ in range(10)}
    assert urls == {survivor.url}
    retried = route(dispatcher, deployment.api_key, request_idx=first["request_idx"]).json()
    assert (retried["url"], retried["request_idx"]) == (survivor.url, first["request_idx"])
    assert retried["reqnum"] > 0
    status = endpoint_state(dispatcher, deployment.api_key)
    by_id = {w["id"]: w for w in status["workers"]}
    assert [w["active"] for w in by_id.values()].count(False) == 1
    # the retried request's cost moved: the dead worker holds none of it
    dead = next(w for w in by_id.values() if not w["active"])
    assert dead["load"] == 0.0


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_worker_restarted_under_its_id_sheds_the_load_of_the_requests_lost_with_it(
    deployment: Deployment, store: str, request: pytest.FixtureRequest
) -> None:
    """The example worker reports its reqnum_floor: the requests the killed process held stop counting on its id at
    once, not at the request ttl, and a client retrying one of them is routed again."""
    options = () if store == "memory" else ("--redis-url", request.getfixturevalue("redis_url"),
                                            "--redis-prefix", f"e2e-{uuid.uuid4().hex[:8]}:")  # fmt: skip
    dispatcher = deployment.dispatcher(*options)
    worker = deployment.worker(dispatcher, "w1")
    try:
        wait_for(lambda: ready_workers(dispatcher, deployment.api_key, 1), "a ready worker")
        lost = [route(dispatcher, deployment.api_key).json() for _ in range(3)]  # routed, never sent to it
        assert [answer["url"] for answer in lost] == [worker.url] * 3

        def load() -> float:
            [record] = endpoint_state(dispatcher, deployment.api_key)["workers"]
            return float(record["load"])

        assert load() == 30.0
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait()
        worker = deployment.worker(dispatcher, "w1")  # the same id, come back (on another port here)
        wait_for(lambda: load() == 0.0, "the lost requests' load to be given back", timeout_s=RESTART_WAIT_S)
        metrics = httpx.get(f"{dispatcher.url}/metrics").text
        assert f'dispatcher_restart_given_back_requests_total{{endpoint="{ENDPOINT}"}} 3.0' in metrics
        assert "restarted: 3 request(s) it held gave their load back" in dispatcher.log()
        retried = route(dispatcher, deployment.api_key, request_idx=lost[0]["request_idx"])
        assert retried.status_code == 200, retried.text  # known still: routed again, not unknown_request_idx
        assert retried.json()["request_idx"] == lost[0]["request_idx"]
    finally:
        worker.stop()
        assert dispatcher.stop() == 0, dispatcher.log()


async def test_package_client_retries_with_the_same_request_idx_until_a_worker_is_ready(
    deployment: Deployment,
) -> None:
    dispatcher = deployment.dispatcher()
    worker: Server | None = None
    try:
        async with DispatchClient(dispatcher.url, deployment.api_key, max_attempts=60, backoff_max_s=0.5) as client:
            pending = asyncio.ensure_future(client.request(ENDPOINT, "/echo", {"n": 1}, cost=5.0))
            await polled_without_a_worker(dispatcher, times=2)
            assert not pending.done()  # no worker yet: the client polls with its request_idx
            worker = await asyncio.to_thread(deployment.worker, dispatcher, "late")
            response = await asyncio.wait_for(pending, WAIT_S)
        assert response.status == 200 and response.json()["payload"] == {"n": 1}
        assert response.attempts > 1
        metrics = (await asyncio.to_thread(httpx.get, f"{dispatcher.url}/metrics")).text
        assert f'dispatcher_routes_total{{endpoint="{ENDPOINT}",outcome="no_ready_worker"}}' in metrics
        # the poll that found a worker is the request's first assignment: no retry (it counted as "reassigned")
        assert f'dispatcher_routes_total{{endpoint="{ENDPOINT}",outcome="assigned"}} 1.0' in metrics
        assert "reassigned" not in metrics
    finally:
        if worker is not None:
            worker.stop()
        assert dispatcher.stop() == 0


class LoseTheFirstRouteAnswer(httpx.AsyncBaseTransport):
    """The dispatcher gets and serves the first /route/, but its answer never reaches the client."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path == "/route/" and not self.lost:
            await response.aread()
            await response.aclose()
            self.lost += 1
            raise httpx.ReadTimeout("the answer was lost on the way", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_first_route_whose_answer_was_lost_holds_no_load_once_served(deployment: Deployment) -> None:
    """Without the client's Idempotency-Key its repeat was a second request, and the first one's load stayed on a
    worker until the request ttl (600 s)."""
    dispatcher = deployment.dispatcher()
    worker = await asyncio.to_thread(deployment.worker, dispatcher, "w1")
    transport = LoseTheFirstRouteAnswer()
    try:
        await asyncio.to_thread(wait_for, lambda: ready_workers(dispatcher, deployment.api_key, 1), "a ready worker")
        async with httpx.AsyncClient(transport=transport) as http:
            client = DispatchClient(dispatcher.url, deployment.api_key, http=http, backoff_max_s=0.1)
            response = await client.request(ENDPOINT, "/echo", {"n": 1}, cost=7.0)
        assert (response.status, response.attempts, transport.lost) == (200, 2, 1)
        metrics = (await asyncio.to_thread(httpx.get, f"{dispatcher.url}/metrics")).text
        assert f'dispatcher_routes_total{{endpoint="{ENDPOINT}",outcome="assigned"}} 1.0' in metrics
        assert f'dispatcher_routes_total{{endpoint="{ENDPOINT}",outcome="reassigned"}} 1.0' in metrics
        await asyncio.to_thread(
            wait_for,
            lambda: [w["load"] for w in endpoint_state(dispatcher, deployment.api_key)["workers"]] == [0.0],
            "the served request's release to leave no load behind",
        )
    finally:
        worker.stop()
        assert dispatcher.stop() == 0


async def test_vast_sdk_serverless_client_works_unchanged(deployment: Deployment) -> None:
    """Vast's own SDK (``vastai`` on PyPI) against this dispatcher: request_idx 0 on the first call,
    ``replay_timeout`` in the body, the key in body, Bearer header and query string, polling while no worker is
    ready, then the call to the worker with ``auth_data``."""
    from vastai.serverless.client import CoroutineServerless, Endpoint

    dispatcher = deployment.dispatcher()
    worker: Server | None = None
    client = CoroutineServerless(api_key=deployment.api_key, autoscaler_url=dispatcher.url, max_poll_interval=0.5)
    # The SDK downloads Vast's root certificate for TLS to Vast's servers; nothing here is TLS and there is no
    # internet, so hand it a default context instead (the protocol is untouched).
    client._ssl_context = ssl.create_default_context()
    try:
        endpoint = Endpoint(client, name=ENDPOINT, id=1, api_key=deployment.api_key)
        pending = asyncio.ensure_future(endpoint.request("/echo", {"hello": "vast"}, cost=50))
        await polled_without_a_worker(dispatcher, times=2)  # the SDK got "no ready worker" and polls
        worker = await asyncio.to_thread(deployment.worker, dispatcher, "sdk")
        result = await asyncio.wait_for(pending, WAIT_S)
        assert result["ok"] is True and result["status"] == 200, result
        assert result["response"]["payload"] == {"hello": "vast"}
        assert result["request_idx"] > 0 and result["url"] == worker.url
    finally:
        await client.close()
        if worker is not None:
            worker.stop()
        assert dispatcher.stop() == 0


class RefusingWorker:
    """A worker as Vast's pyworker behaves when it cannot take a request: it releases it (``/delete_requests/``,
    ``success: false``) and answers 503; it serves the ones after. Hypercorn in this process, on a free port."""

    def __init__(self, dispatcher: Server, worker_token: str) -> None:
        self.dispatcher = dispatcher
        self.auth = {"authorization": f"Bearer {worker_token}"}
        self.url = f"http://127.0.0.1:{free_port()}"
        self.seen: list[int] = []  # the request_idx of every call, in order
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def echo(self, request: Request) -> Response:
        body = await request.json()
        idx = body["auth_data"]["request_idx"]
        self.seen.append(idx)
        release = {"endpoint": ENDPOINT, "id": "refuser", "request_idxs": [idx], "success": len(self.seen) > 1}
        async with httpx.AsyncClient() as http:
            released = await http.post(f"{self.dispatcher.url}/delete_requests/", json=release, headers=self.auth)
        assert released.json()["released"] == 1, released.text
        if len(self.seen) == 1:
            return JSONResponse({"error": "busy"}, status_code=503)
        return JSONResponse({"payload": body["payload"]})

    async def __aenter__(self) -> RefusingWorker:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [self.url.removeprefix("http://")]
        app = Starlette(routes=[Route("/echo", self.echo, methods=["POST"])])
        self._task = asyncio.ensure_future(serve(app, config, shutdown_trigger=self._stop.wait))  # type: ignore[arg-type]
        report = {"endpoint": ENDPOINT, "id": "refuser", "url": self.url, "state": "ready", "max_perf": 1000.0}
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{self.dispatcher.url}/worker_status/", json=report, headers=self.auth)
        assert answer.status_code == 200, answer.text
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def test_vast_sdk_retries_a_request_its_worker_refused_and_released(deployment: Deployment) -> None:
    """The SDK retries a worker's 429/5xx by routing the same request_idx again; the worker released the request
    when it refused it (as Vast's pyworker does), and the retry is served, its load held once. The only worker is
    the one that refused it: the retry is answered "no ready worker", and the SDK's poll gets that worker again."""
    from vastai.serverless.client import CoroutineServerless, Endpoint

    dispatcher = deployment.dispatcher()
    client = CoroutineServerless(api_key=deployment.api_key, autoscaler_url=dispatcher.url, max_poll_interval=0.5)
    client._ssl_context = ssl.create_default_context()  # as in the test above: no TLS here
    try:
        async with RefusingWorker(dispatcher, deployment.worker_token) as worker:
            # built as the README says for a long-lived client: a week old, it does not call Vast's web API
            endpoint = Endpoint(client, name=ENDPOINT, id=1, api_key=deployment.api_key,
                                soft_refresh_threshold=float("inf"), hard_refresh_threshold=float("inf"))  # fmt: skip
            endpoint.last_refresh = time.time() - 7 * 24 * 3600
            result = await asyncio.wait_for(endpoint.request("/echo", {"hello": "again"}, cost=50), WAIT_S)
            assert result["ok"] is True and result["status"] == 200, result
            assert result["response"]["payload"] == {"hello": "again"}
            assert len(worker.seen) == 2 and worker.seen[0] == worker.seen[1] == result["request_idx"]
        state = await asyncio.to_thread(endpoint_state, dispatcher, deployment.api_key)
        assert [w["load"] for w in state["workers"]] == [0.0]
        metrics = (await asyncio.to_thread(httpx.get, f"{dispatcher.url}/metrics")).text
        assert f'dispatcher_routes_total{{endpoint="{ENDPOINT}",outcome="no_ready_worker"}} 1.0' in metrics
        assert f'dispatcher_routes_total{{endpoint="{ENDPOINT}",outcome="assigned"}} 2.0' in metrics
    finally:
        await client.close()
        assert dispatcher.stop() == 0


@pytest.mark.parametrize("variable", ["PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"])
def test_an_inherited_prometheus_multiproc_dir_is_ignored(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """One folder set in the environment (by an image, for another program) was used by every run: counters carried
    on from the last run, and its dead process's last dispatcher_ready 0 held the merged gauge at 0 for ever."""
    shared = tmp_path / "multiproc"
    shared.mkdir()
    monkeypatch.setenv(variable, str(shared))
    for _ in range(2):
        dispatcher = deployment.dispatcher()
        try:
            assert httpx.get(f"{dispatcher.url}/pubkey/").status_code == 200
            metrics = httpx.get(f"{dispatcher.url}/metrics").text
        finally:
            assert dispatcher.stop() == 0
        assert "\ndispatcher_ready 1.0\n" in metrics
        assert 'dispatcher_http_requests_total{method="GET",route="/pubkey/",status="200"} 1.0' in metrics
    assert not any(shared.iterdir())
    assert f"{variable} ignored" in dispatcher.log()


async def test_worker_processes_without_a_configured_key_share_one_ephemeral_key(
    deployment: Deployment, redis_url: str
) -> None:
    """Each process of `--workers 2` made its own ephemeral key: /pubkey/ answered one or the other by connection,
    and a worker that fetched it once rejected about half of its assignments as signed by an unknown key."""
    prefix = f"e2e-{uuid.uuid4().hex[:8]}:"
    argv = ("--config", str(deployment.config), "--redis-url", redis_url, "--redis-prefix", prefix, "--workers", "2")
    dispatcher = start_server(deployment.tmp, *argv, command="serve-dispatcher")
    try:
        key_ids = set()
        for _ in range(12):  # a connection each: the kernel spreads them over both processes
            async with httpx.AsyncClient() as http:
                key_ids |= {k["key_id"] for k in (await http.get(f"{dispatcher.url}/pubkey/")).json()["keys"]}
        assert len(key_ids) == 1, key_ids
        async with httpx.AsyncClient() as http:
            keyring = await fetch_keyring(dispatcher.url, http)
            report = {"endpoint": ENDPOINT, "id": "w", "url": "http://w:1", "state": "ready", "max_perf": 1e9}
            worker = {"authorization": f"Bearer {deployment.worker_token}"}
            assert (await http.post(f"{dispatcher.url}/worker_status/", json=report, headers=worker)).is_success
        verifier = AssignmentVerifier(keyring, own_urls=["http://w:1"], endpoint=ENDPOINT)
        for _ in range(10):
            async with httpx.AsyncClient() as http:
                answer = await http.post(f"{dispatcher.url}/route/", json={"endpoint": ENDPOINT, "cost": 1},
                                         headers={"authorization": f"Bearer {deployment.api_key}"})  # fmt: skip
            assert verifier.verify(answer.json()).reqnum == answer.json()["reqnum"]
        assert (
            dispatcher.log().count(
                f"NO SIGNING KEY CONFIGURED: using an ephemeral Ed25519 key (key id {key_ids.pop()})"
            )
            == 2
        )
    finally:
        assert dispatcher.stop() == 0


async def test_two_dispatchers_on_one_redis_keep_reqnums_unique_and_loads_exact(
    deployment: Deployment, redis_url: str
) -> None:
    prefix = f"e2e-{uuid.uuid4().hex[:8]}:"
    dispatchers = [
        deployment.dispatcher("--redis-url", redis_url, "--redis-prefix", prefix, "--workers", "2"),
        deployment.dispatcher("--redis", redis_url, "--redis-prefix", prefix),  # the spelling of the flag
    ]
    auth = {"authorization": f"Bearer {deployment.api_key}"}
    worker_auth = {"authorization": f"Bearer {deployment.worker_token}"}
    try:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=200), timeout=30) as http:
            origins = {}
            for i in range(3):
                report = {"endpoint": ENDPOINT, "id": f"w{i}", "url": f"http://10.0.0.{i}:8000", "state": "ready",
                          "max_perf": 1e9}  # fmt: skip
                answer = await http.post(f"{dispatchers[i % 2].url}/worker_status/", json=report, headers=worker_auth)
                origins[report["url"]] = answer.json()["reqnum"]
            costs = [float(1 + i % 13) for i in range(500)]  # integers: every sum is exact

            async def one(i: int, cost: float) -> dict[str, Any]:
                body = {"endpoint": ENDPOINT, "cost": cost, "request_idx": 0}
                answer = await http.post(f"{dispatchers[i % 2].url}/route/", json=body, headers=auth)
                assert answer.status_code == 200, answer.text
                return dict(answer.json())

            answers = await asyncio.gather(*(one(i, cost) for i, cost in enumerate(costs)))
            assert all("url" in a for a in answers)
            by_worker: dict[str, list[int]] = defaultdict(list)
            for a in answers:
                by_worker[a["url"]].append(a["reqnum"])
            for url, reqnums in by_worker.items():
                start = origins[url]
                assert sorted(reqnums) == list(range(start + 1, start + len(reqnums) + 1)), url
            idxs = [a["request_idx"] for a in answers]
            assert len(set(idxs)) == len(idxs)

            async def loads(dispatcher: Server) -> dict[str, float]:
                state = (await http.get(f"{dispatcher.url}/endpoints/{ENDPOINT}/", headers=auth)).json()
                return {w["url"]: w["load"] for w in state["workers"]}

            expected = defaultdict(float)
            for a, cost in zip(answers, costs, strict=True):
                expected[a["url"]] += cost
            assert await loads(dispatchers[0]) == await loads(dispatchers[1]) == dict(expected)

            released = await asyncio.gather(
                *(
                    http.post(f"{dispatchers[n % 2].url}/delete_requests/", headers=worker_auth,
                              json={"endpoint": ENDPOINT, "request_idxs": idxs[n::10], "success": True})
                    for n in range(10)
                )
            )  # fmt: skip
            assert sum(r.json()["released"] for r in released) == len(idxs)
            assert set((await loads(dispatchers[1])).values()) == {0.0}
    finally:
        for dispatcher in dispatchers:
            assert dispatcher.stop() == 0, dispatcher.log()


def test_a_silent_worker_is_forgotten_once_it_holds_no_request(deployment: Deployment, redis_url: str) -> None:
    prefix = f"e2e-{uuid.uuid4().hex[:8]}:"
    dispatcher = deployment.dispatcher(
        "--redis-url", redis_url, "--redis-prefix", prefix, "--heartbeat-timeout-s", "0.5", "--worker-forget-s", "1",
        "--autoscale-interval-s", "0.1",
    )  # fmt: skip
    worker_auth = {"authorization": f"Bearer {deployment.worker_token}"}

    def ids() -> set[str]:
        return {w["id"] for w in endpoint_state(dispatcher, deployment.api_key)["workers"]}

    try:
        for worker_id in ("holding", "silent"):
            report = {"endpoint": ENDPOINT, "id": worker_id, "url": f"http://{worker_id}:8000", "state": "ready",
                      "max_perf": 10.0}  # fmt: skip
            assert httpx.post(f"{dispatcher.url}/worker_status/", json=report, headers=worker_auth).status_code == 200
        held = route(dispatcher, deployment.api_key).json()
        assert held["url"] == "http://holding:8000"  # the id tie-break
        # both stop reporting; the one holding a request is kept until it is released
        wait_for(lambda: ids() == {"holding"}, "the silent idle worker to be forgotten")
        released = httpx.post(f"{dispatcher.url}/delete_requests/", headers=worker_auth,
                              json={"endpoint": ENDPOINT, "request_idxs": [held["request_idx"]]})  # fmt: skip
        assert released.json()["released"] == 1
        wait_for(lambda: not ids(), "the released worker to be forgotten")
        # gone from Redis too: no-ready answers no longer count them as inactive
        assert route(dispatcher, deployment.api_key).json()["status"] == dict.fromkeys(STATUS_KEYS, 0)
    finally:
        assert dispatcher.stop() == 0, dispatcher.log()


def test_errors_over_http(deployment: Deployment) -> None:
    dispatcher = deployment.dispatcher()
    try:
        wrong_key = httpx.post(f"{dispatcher.url}/route/", json={"endpoint": ENDPOINT, "cost": 1, "api_key": "x"})
        unknown = httpx.post(f"{dispatcher.url}/route/", json={"endpoint": "nope", "cost": 1, "api_key": "x"})
        assert wrong_key.status_code == unknown.status_code == 401
        assert wrong_key.json() == unknown.json()  # the same answer whether or not the endpoint exists
        assert deployment.api_key not in dispatcher.log()
        for body in BAD_ROUTE_BODIES:
            answer = route(dispatcher, deployment.api_key, **body)
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request", body
        for fields in BAD_REPORT_FIELDS:
            report = {"endpoint": ENDPOINT, "id": "w", "url": "http://w:1", "state": "ready", **fields}
            answer = httpx.post(f"{dispatcher.url}/worker_status/", json=report,
                                headers={"authorization": f"Bearer {deployment.worker_token}"})  # fmt: skip
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request", fields
        assert endpoint_state(dispatcher, deployment.api_key)["workers"] == []
        nan = httpx.post(f"{dispatcher.url}/route/", content=b'{"endpoint":"echo-ep","cost":NaN}', headers=JSON)
        assert nan.status_code == 400
        text = httpx.post(f"{dispatcher.url}/route/", content=b"{}", headers={"content-type": "text/plain"})
        assert text.status_code == 415
        assert httpx.get(f"{dispatcher.url}/route/").status_code == 405
    finally:
        assert dispatcher.stop() == 0


def test_default_start_sighup_reload_and_drain(deployment: Deployment, tmp_path: Path) -> None:
    bare = start_server(tmp_path, command="serve-dispatcher")  # no config, no key: the embedded default
    try:
        health = httpx.get(f"{bare.url}/health").json()
        assert health["status"] == "ok" and health["endpoints"] == 0 and health["store"] == "memory"
        assert "NO SIGNING KEY CONFIGURED" in bare.log()
    finally:
        assert bare.stop() == 0

    dispatcher = deployment.dispatcher()
    try:
        new_key, _ = add_endpoint(deployment.config, "added-later")
        body = {"endpoint": "added-later", "cost": 1.0, "api_key": new_key}
        assert httpx.post(f"{dispatcher.url}/route/", json=body).status_code == 401
        os.kill(dispatcher.process.pid, signal.SIGHUP)
        answer = wait_for(
            lambda: (r := httpx.post(f"{dispatcher.url}/route/", json=body)).status_code == 200 and r,
            "the reloaded endpoints",
        )
        assert answer.json()["status"]["ready"] == 0  # no workers yet: the no-ready breakdown
        started = time.monotonic()
        assert dispatcher.stop() == 0
        assert time.monotonic() - started < 10
    finally:
        dispatcher.stop()


def test_a_stalled_request_body_is_answered_408_and_its_connection_closed(tmp_path: Path) -> None:
    """Headers, then nothing: the connection (and its file descriptor) was held for as long as the client liked,
    so enough such clients took the server down without any key. Others are served meanwhile."""
    server = start_server(tmp_path, "--body-timeout-s", "1", command="serve-dispatcher")
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    try:
        stalled = [socket.create_connection((host, port), timeout=30) for _ in range(20)]
        for sock in stalled:
            sock.sendall(b"POST /route/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")  # fmt: skip
        assert httpx.get(f"{server.url}/health").status_code == 200
        for sock in stalled:
            answer = b""
            while chunk := sock.recv(65536):  # read until the server closes the connection
                answer += chunk
            head = answer.split(b"\r\n\r\n", 1)[0].lower()
            assert head.startswith(b"http/1.1 408") and b"connection: close" in head, answer
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
            sock.close()
        assert "request_timeout" in httpx.get(f"{server.url}/metrics").text
    finally:
        assert server.stop() == 0, server.log()


def test_a_client_that_leaves_mid_upload_is_counted_499_not_as_our_error(tmp_path: Path) -> None:
    """Half a body, then the client closes: nobody is answered, so neither the fast path (/route/) nor a Starlette
    route (/worker_status/) may count a 500 or an internal error (the 5xx-rate and internal-error alerts)."""
    server = start_server(tmp_path, command="serve-dispatcher")
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    try:
        for path in ("/route/", "/worker_status/"):
            with socket.create_connection((host, port), timeout=30) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             "Authorization: Bearer t\r\nContent-Length: 100\r\n\r\n{".encode())  # fmt: skip

        def counted(path: str) -> float:
            pattern = rf'dispatcher_http_requests_total{{method="POST",route="{re.escape(path)}",status="499"}} (\S+)'
            found = re.search(pattern, httpx.get(f"{server.url}/metrics").text)
            return float(found.group(1)) if found else 0.0

        wait_for(lambda: counted("/route/") == 1 and counted("/worker_status/") == 1, "both departures counted")
        metrics = httpx.get(f"{server.url}/metrics").text
        assert not re.search(r'dispatcher_http_requests_total\{[^}]*status="5\d\d"\}', metrics), metrics
        assert re.search(r'dispatcher_errors_total\{code="internal_error"\} 0\.0', metrics), metrics
    finally:
        assert server.stop() == 0, server.log()
    assert "unhandled error" not in server.log()


def test_the_access_log_is_off_by_default_and_never_holds_an_api_key(tmp_path: Path) -> None:
    """Vast's SDK sends the api key in the body, the Bearer header and the query string: none reaches the log."""
    secret = "sk-do-not-log-0123456789"
    for flags, logged in (((), False), (("--access-log", "--log-level", "warning"), True)):
        server = start_server(tmp_path, *flags, command="serve-dispatcher")
        try:
            refused = httpx.post(
                f"{server.url}/route/",
                params={"api_key": secret},
                headers={"Authorization": f"Bearer {secret}", "User-Agent": "probe/1"},
                json={"endpoint": "nowhere", "api_key": secret, "cost": 1.0},
            )
            assert refused.status_code == 401
            assert httpx.get(f"{server.url}/health").status_code == 200
        finally:
            assert server.stop() == 0, server.log()
        log = server.log()
        assert secret not in log
        line = re.search(r'127\.0\.0\.1:\d+ "POST /route/ HTTP/1\.1" 401 \d+ \d+\.\d{6} "probe/1"', log)
        assert (line is not None) is logged, log
        assert ('"GET /health HTTP/1.1" 200' in log) is logged, log


def test_no_api_key_or_worker_token_reaches_any_log_even_at_debug_level(deployment: Deployment) -> None:
    """Every path that handles a credential, logged as much as the services can: routes with the key in the body,
    the query and the header, right and wrong; worker reports and releases; a wrong worker token; a SIGHUP reload of
    the endpoints file (whose keys are hashes). Neither the dispatcher's log nor the worker's holds a key."""
    dispatcher = deployment.dispatcher("--log-level", "debug", "--access-log")
    worker = deployment.worker(dispatcher, "w1")
    key, token = deployment.api_key, deployment.worker_token
    try:
        wait_for(lambda: ready_workers(dispatcher, key, 1), "a ready worker")
        assignment = httpx.post(
            f"{dispatcher.url}/route/",
            params={"api_key": key},
            headers={"Authorization": f"Bearer {key}"},
            json={"endpoint": ENDPOINT, "api_key": key, "cost": 1.0, "request_idx": 0},
        )
        assert assignment.status_code == 200, assignment.text
        served = httpx.post(f"{assignment.json()['url']}/echo", json={"auth_data": assignment.json(), "payload": 1})
        assert served.status_code == 200, served.text
        for wrong in (key + "x", token, key[:-1]):
            refused = httpx.post(f"{dispatcher.url}/route/", params={"api_key": wrong},
                                 json={"endpoint": ENDPOINT, "api_key": wrong, "cost": 1.0})  # fmt: skip
            assert refused.status_code == 401
        report = {"endpoint": ENDPOINT, "id": "w9", "url": "http://127.0.0.1:9", "state": "ready", "max_perf": 1.0}
        bad_token = httpx.post(f"{dispatcher.url}/worker_status/", json=report,
                               headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert bad_token.status_code == 401
        os.kill(dispatcher.process.pid, signal.SIGHUP)
        wait_for(lambda: "SIGHUP reload: now serving" in dispatcher.log(), "the reload")
        wait_for(
            lambda: all(w["load"] == 0 for w in endpoint_state(dispatcher, key)["workers"]), "the worker's release"
        )
    finally:
        worker.stop()
        assert dispatcher.stop() == 0, dispatcher.log()
    logs = {"dispatcher": dispatcher.log(), "worker": worker.log()}
    assert "'log_level': 'debug'" in logs["dispatcher"]
    assert (
        '"POST /route/ HTTP/1.1" 200' in logs["dispatcher"]
        and '"POST /worker_status/ HTTP/1.1" 401' in logs["dispatcher"]
    )
    for name, log in logs.items():
        assert key not in log and token not in log, name


def test_a_connection_its_client_closed_is_closed_at_once(tmp_path: Path) -> None:
    """Hypercorn kept such a socket (CLOSE-WAIT, a file descriptor) until the 75 s keep-alive timer ran out: clients
    that open a connection per request used up the descriptors and the server stopped answering."""
    dispatcher = start_server(tmp_path, command="serve-dispatcher")
    try:
        port = int(dispatcher.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as conn:
            conn.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                answer += conn.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            conn.shutdown(socket.SHUT_WR)  # the client is done: the server's end must close now, not in 75 s
            conn.settimeout(10.0)
            assert conn.recv(4096) == b""
        assert time.monotonic() - started < 5.0
    finally:
        assert dispatcher.stop() == 0


def test_bodies_stalled_without_a_known_key_leave_keyed_clients_served(deployment: Deployment) -> None:
    """About 64 connections stalling a body each without any credential held the whole buffered-body budget, and
    every /route/ got 429 until their body timeout: now they fill only the untrusted share of it (a quarter by
    default), and requests with a known key in their headers are read against the rest."""
    max_body, buffered = 1000, 8000
    untrusted = buffered // 4  # the default share of --max-unauthenticated-body-bytes
    dispatcher = deployment.dispatcher("--max-body-bytes", str(max_body), "--max-buffered-body-bytes", str(buffered))
    host, port = "127.0.0.1", int(dispatcher.url.rsplit(":", 1)[1])
    # enough to hold the whole budget as before; past the untrusted share they are refused at once
    stalled = [socket.create_connection((host, port), timeout=WAIT_S) for _ in range(buffered // max_body)]
    try:
        for sock in stalled:  # one byte short of each body, no key anywhere
            sock.sendall(b"POST /route/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % max_body + b" " * (max_body - 1))  # fmt: skip
        body_key = {"endpoint": ENDPOINT, "cost": 1.0, "api_key": deployment.api_key}
        refused = wait_for(  # once the stalled bytes are in
            lambda: (r := httpx.post(f"{dispatcher.url}/route/", json=body_key, timeout=10)).status_code == 429 and r,
            f"a body with its key only in the body refused while the untrusted {untrusted} bytes are held",
        )
        assert refused.json()["error"]["code"] == "overloaded" and "retry-after" in refused.headers
        assert refused.headers["connection"] == "close"
        spec = httpx.get(f"{dispatcher.url}/openapi.json").json()
        assert_answers_as_documented(spec, "/route/", "post", refused)
        assert route(dispatcher, deployment.api_key).status_code == 200  # Bearer: the keyed clients' budget
        by_query = httpx.post(f"{dispatcher.url}/route/", params={"api_key": deployment.api_key},
                              json={"endpoint": ENDPOINT, "cost": 1.0}, timeout=10)  # fmt: skip
        assert by_query.status_code == 200
        assert route(dispatcher, "dk_not-a-key").status_code == 429  # an unknown key is no key
        report = {"endpoint": ENDPOINT, "id": "w", "url": "http://w:1", "state": "loading", "max_perf": 1.0}
        for token, status in ((deployment.worker_token, 200), ("wt_not-a-token", 429)):
            answer = httpx.post(f"{dispatcher.url}/worker_status/", json=report,
                                headers={"authorization": f"Bearer {token}"}, timeout=10)  # fmt: skip
            assert answer.status_code == status, answer.text
            assert_answers_as_documented(spec, "/worker_status/", "post", answer)
    finally:
        for sock in stalled:
            sock.close()
        assert dispatcher.stop() == 0, dispatcher.log()
    assert deployment.api_key not in dispatcher.log()
