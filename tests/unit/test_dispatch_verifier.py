"""The worker-side assignment check: authenticity down to every byte, targeting, expiry, replay, threads, rotation."""

from __future__ import annotations

import dataclasses
import random
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from service.dispatch.signing import Assignment, KeyRing, Signer, canonical_bytes, publish
from service.dispatch.verifier import (
    AssignmentRejected,
    AssignmentVerifier,
    KeyFetchError,
    RejectReason,
    ReplayWindow,
    fetch_keyring,
    keyring_from_pubkey_answer,
)

NOW_S = 1_764_000_000.0
NOW_MS = int(NOW_S * 1000)
TTL_MS = 30_000
URL = "http://10.0.0.5:8000"
ENDPOINT = "my-endpoint"
WINDOW = 4096
THREADS = 8
PER_THREAD = 150
STRING_FIELDS = ("endpoint", "url", "key_id")
NUMBER_FIELDS = ("cost", "reqnum", "request_idx", "expires_at_ms")
ALL_BYTES = range(256)


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


def make_verifier(signer: Signer, **overrides: Any) -> AssignmentVerifier:
    options: dict[str, Any] = {"own_urls": [URL], "endpoint": ENDPOINT, "clock": lambda: NOW_S}
    options.update(overrides)
    return AssignmentVerifier(KeyRing([signer.public_key]), **options)


def assignment(signer: Signer, reqnum: int = 1, **overrides: Any) -> Assignment:
    base = Assignment(
        endpoint=ENDPOINT,
        url=URL,
        cost=242.5,
        reqnum=reqnum,
        request_idx=2421,
        expires_at_ms=NOW_MS + TTL_MS,
        key_id=signer.key_id,
    )
    return dataclasses.replace(base, **overrides)


def signed(signer: Signer, a: Assignment) -> dict[str, Any]:
    """``auth_data`` as a client forwards it: the route answer, signature and extra fields included."""
    return {**dataclasses.asdict(a), "signature": signer.sign(a), "__request_id": "00000000-0000-0000-0000-0000"}


def auth(signer: Signer, reqnum: int = 1, **overrides: Any) -> dict[str, Any]:
    return signed(signer, assignment(signer, reqnum, **overrides))


def rejection(verifier: AssignmentVerifier, auth_data: dict[str, Any]) -> RejectReason:
    with pytest.raises(AssignmentRejected) as caught:
        verifier.verify(auth_data)
    return caught.value.reason


# -- authenticity ----------------------------------------------------------------------------------------------
def test_valid_assignment_is_accepted(signer: Signer) -> None:
    expected = assignment(signer, reqnum=7)
    assert make_verifier(signer).verify(signed(signer, expected)) == expected


def string_mutations(value: str) -> Iterator[str]:
    """Every single-character change of ``value`` (each position, each of the 255 other byte values)."""
    for position, original in enumerate(value):
        for code in ALL_BYTES:
            if code != ord(original):
                yield value[:position] + chr(code) + value[position + 1 :]


def number_mutations(value: float) -> Iterator[object]:
    """Every value reachable by changing one byte of ``value`` as JSON renders it (changes that do not parse or
    parse to the same number are not value changes, so they are skipped)."""
    text = orjson.dumps(value)
    for position in range(len(text)):
        for code in ALL_BYTES:
            if code == text[position]:
                continue
            try:
                parsed = orjson.loads(text[:position] + bytes([code]) + text[position + 1 :])
            except orjson.JSONDecodeError:
                continue
            if parsed != value or type(parsed) is not type(value):
                yield parsed


def test_every_single_byte_change_of_a_signed_field_is_rejected(signer: Signer) -> None:
    verifier = make_verifier(signer)
    genuine = auth(signer, reqnum=5)
    tried: Counter[str] = Counter()
    for name in (*STRING_FIELDS, *NUMBER_FIELDS):
        mutations = string_mutations(genuine[name]) if name in STRING_FIELDS else number_mutations(genuine[name])
        for mutated in mutations:
            tampered = {**genuine, name: mutated}
            with pytest.raises(AssignmentRejected):
                verifier.verify(tampered)
            tried[name] += 1
    for name in STRING_FIELDS:
        assert tried[name] == len(genuine[name]) * (len(ALL_BYTES) - 1)
    assert all(tried[name] > 0 for name in NUMBER_FIELDS), tried
    # none of the rejected copies used up the genuine reqnum
    assert verifier.verify(genuine).reqnum == 5


def test_changed_signature_is_rejected(signer: Signer) -> None:
    verifier = make_verifier(signer)
    genuine = auth(signer)
    signature = bytes.fromhex(genuine["signature"])
    for position in range(len(signature)):
        for flip in (0x01, 0x80, 0xFF):
            changed = bytearray(signature)
            changed[position] ^= flip
            assert rejection(verifier, {**genuine, "signature": changed.hex()}) is RejectReason.BAD_SIGNATURE
    assert verifier.verify(genuine).reqnum == 1


def test_signature_must_be_lowercase_hex_of_the_right_length(signer: Signer) -> None:
    verifier = make_verifier(signer)
    genuine = auth(signer)
    for bad in (genuine["signature"].upper(), genuine["signature"][:-2], genuine["signature"] + "00", None, 5):
        assert rejection(verifier, {**genuine, "signature": bad}) is RejectReason.BAD_FORMAT


def test_malformed_fields_are_bad_format(signer: Signer) -> None:
    verifier = make_verifier(signer)
    genuine = auth(signer)
    missing = {k: v for k, v in genuine.items() if k != "reqnum"}
    for bad in (missing, {**genuine, "reqnum": "1"}, {**genuine, "reqnum": True}, {**genuine, "cost": "242.5"}):
        assert rejection(verifier, bad) is RejectReason.BAD_FORMAT


def test_a_signature_by_another_key_is_rejected(signer: Signer) -> None:
    other = Signer.generate()
    verifier = make_verifier(signer)
    assert rejection(verifier, auth(other)) is RejectReason.UNKNOWN_KEY
    # claiming the trusted key id does not help a signature made by another key
    forged = assignment(signer)
    assert rejection(verifier, {**dataclasses.asdict(forged), "signature": other.sign(forged)}) == "bad_signature"


def batch_signed(signer: Signer, items: list[Assignment]) -> list[dict[str, Any]]:
    """``auth_data`` of assignments signed together, as the dispatcher answers them under load."""
    signatures = signer.sign_batch([canonical_bytes(a) for a in items])
    answers = []
    for a, signature in zip(items, signatures, strict=True):
        assert signature.batch is not None
        answers.append({**dataclasses.asdict(a), "signature": signature.hex, "batch": signature.batch.to_json()})
    return answers


def test_batch_signed_assignments_are_accepted_each_once(signer: Signer) -> None:
    verifier = make_verifier(signer)
    items = [assignment(signer, reqnum=n) for n in range(1, 8)]
    answers = batch_signed(signer, items)
    assert [verifier.verify(a) for a in answers] == items
    assert all(rejection(verifier, a) is RejectReason.REPLAYED for a in answers)


def test_every_single_byte_change_of_a_batch_signed_assignment_is_rejected(signer: Signer) -> None:
    verifier = make_verifier(signer)
    genuine = batch_signed(signer, [assignment(signer, reqnum=n) for n in range(1, 6)])[2]
    tried: Counter[str] = Counter()
    for name in (*STRING_FIELDS, *NUMBER_FIELDS):
        mutations = string_mutations(genuine[name]) if name in STRING_FIELDS else number_mutations(genuine[name])
        for mutated in mutations:
            with pytest.raises(AssignmentRejected):
                verifier.verify({**genuine, name: mutated})
            tried[name] += 1
    batch = genuine["batch"]
    hex_digits = set("0123456789abcdef")

    def reason(changed_batch: dict[str, Any]) -> RejectReason:
        return rejection(verifier, {**genuine, "batch": changed_batch})

    for name in ("index", "size"):
        for mutated in number_mutations(batch[name]):
            changed = {**batch, name: mutated}
            index, size = changed["index"], changed["size"]
            parses = type(mutated) is int and size >= 2 and 0 <= index < size
            parses = parses and len(batch["path"]) <= (size - 1).bit_length()
            # a proof that still parses reaches the signature check, and fails there
            assert reason(changed) is (RejectReason.BAD_SIGNATURE if parses else RejectReason.BAD_FORMAT), mutated
            tried[f"{name} {'signature' if parses else 'format'}"] += 1
    for position, original in enumerate(batch["nonce"]):
        for code in ALL_BYTES:
            if chr(code) != original:
                nonce = batch["nonce"][:position] + chr(code) + batch["nonce"][position + 1 :]
                expected = RejectReason.BAD_SIGNATURE if chr(code) in hex_digits else RejectReason.BAD_FORMAT
                assert reason({**batch, "nonce": nonce}) is expected
                tried["nonce"] += 1
    for j, node in enumerate(batch["path"]):
        for changed in string_mutations(node):
            path = [*batch["path"][:j], changed, *batch["path"][j + 1 :]]
            expected = RejectReason.BAD_SIGNATURE if set(changed) <= hex_digits else RejectReason.BAD_FORMAT
            assert reason({**batch, "path": path}) is expected
            tried["path"] += 1
    assert tried["path"] == sum(len(node) for node in batch["path"]) * (len(ALL_BYTES) - 1)
    assert tried["nonce"] == len(batch["nonce"]) * (len(ALL_BYTES) - 1)
    kinds = (*STRING_FIELDS, *NUMBER_FIELDS, "index signature", "index format", "size signature", "size format")
    assert all(tried[name] > 0 for name in kinds), tried
    assert verifier.verify(genuine).reqnum == 3  # the rejected copies did not use its reqnum up


@pytest.mark.parametrize(
    "batch",
    [[], {"index": 0, "size": 1, "path": []}, {"index": "2", "size": 5, "path": []}, {"index": 2, "size": 5}],
)
def test_a_malformed_batch_is_bad_format(signer: Signer, batch: object) -> None:
    genuine = batch_signed(signer, [assignment(signer, reqnum=n) for n in range(1, 6)])[2]
    assert rejection(make_verifier(signer), {**genuine, "batch": batch}) is RejectReason.BAD_FORMAT


def test_a_batch_signature_without_its_proof_or_a_lone_one_with_a_proof_is_rejected(signer: Signer) -> None:
    verifier = make_verifier(signer)
    genuine = batch_signed(signer, [assignment(signer, reqnum=n) for n in range(1, 3)])[0]
    without = {k: v for k, v in genuine.items() if k != "batch"}
    assert rejection(verifier, without) is RejectReason.BAD_SIGNATURE
    assert rejection(verifier, {**genuine, "batch": None}) is RejectReason.BAD_SIGNATURE  # null: no proof
    lone = auth(signer, reqnum=9)
    assert rejection(verifier, {**lone, "batch": genuine["batch"]}) is RejectReason.BAD_SIGNATURE


# -- target and expiry -----------------------------------------------------------------------------------------
def test_an_assignment_for_another_worker_is_rejected(signer: Signer) -> None:
    verifier = make_verifier(signer)
    assert rejection(verifier, auth(signer, url="http://10.0.0.6:8000")) is RejectReason.WRONG_URL
    assert rejection(verifier, auth(signer, endpoint="other-endpoint")) is RejectReason.WRONG_ENDPOINT


def test_urls_compare_without_trailing_slash(signer: Signer) -> None:
    assert make_verifier(signer, own_urls=[URL + "/"]).verify(auth(signer)).url == URL
    assert make_verifier(signer).verify(auth(signer, url=URL + "/")).reqnum == 1


def test_urls_compare_in_their_one_spelling(signer: Signer) -> None:
    """The dispatcher signs the URL a worker reported in its canonical spelling (``worker_url``): a worker that knows
    itself as ``HTTP://W1:80/`` accepts the ``http://w1`` it is sent, and nothing that is another server."""
    verifier = make_verifier(signer, own_urls=["HTTP://W1:80/"])
    assert verifier.verify(auth(signer, 1, url="http://w1")).url == "http://w1"
    assert verifier.verify(auth(signer, 2, url="http://W1:080")).reqnum == 2
    for other in ("http://w1:8080", "https://w1", "http://w1/x", "http://w2", "http://127.1", "not a url"):
        assert rejection(verifier, auth(signer, 3, url=other)) is RejectReason.WRONG_URL, other


def test_own_urls_must_be_worker_urls(signer: Signer) -> None:
    with pytest.raises(ValueError, match="must"):
        make_verifier(signer, own_urls=["10.0.0.5:8000"])


@pytest.mark.parametrize("endpoint", [None, ""])
def test_the_endpoint_is_required(signer: Signer, endpoint: str | None) -> None:
    # any endpoint's worker token can report this worker's URL: without its endpoint, a worker would do their work
    with pytest.raises(ValueError, match="endpoint"):
        make_verifier(signer, endpoint=endpoint)


def test_another_endpoints_assignment_leaves_the_replay_window_alone(signer: Signer) -> None:
    verifier = make_verifier(signer)
    assert verifier.verify(auth(signer, 1_000)).reqnum == 1_000
    # another endpoint's worker record reporting this URL has reqnums far above ours
    far_above = 1_000 + 10 * WINDOW
    assert rejection(verifier, auth(signer, far_above, endpoint="other")) is RejectReason.WRONG_ENDPOINT
    assert verifier.verify(auth(signer, 1_001)).reqnum == 1_001


def test_expired_assignments_are_rejected_beyond_the_clock_skew(signer: Signer) -> None:
    verifier = make_verifier(signer, clock_skew_s=5.0)
    assert verifier.verify(auth(signer, 1, expires_at_ms=NOW_MS - 4_999)).reqnum == 1
    assert rejection(verifier, auth(signer, 2, expires_at_ms=NOW_MS - 5_000)) is RejectReason.EXPIRED
    assert rejection(verifier, auth(signer, 3, expires_at_ms=NOW_MS - 60_000)) is RejectReason.EXPIRED
    # the rejected reqnums were not used up
    assert verifier.verify(auth(signer, 2)).reqnum == 2


def test_own_urls_may_not_be_empty(signer: Signer) -> None:
    with pytest.raises(ValueError, match="own_urls"):
        make_verifier(signer, own_urls=[])


# -- replay ----------------------------------------------------------------------------------------------------
def test_the_same_reqnum_is_accepted_once(signer: Signer) -> None:
    verifier = make_verifier(signer)
    genuine = auth(signer, reqnum=3)
    verifier.verify(genuine)
    assert rejection(verifier, genuine) is RejectReason.REPLAYED


def test_reqnums_out_of_order_within_the_window_are_accepted_once(signer: Signer) -> None:
    verifier = make_verifier(signer)
    for reqnum in (10, 8, 9, 7, 12, 11):
        assert verifier.verify(auth(signer, reqnum)).reqnum == reqnum
    for reqnum in (7, 8, 9, 10, 11, 12):
        assert rejection(verifier, auth(signer, reqnum)) is RejectReason.REPLAYED


def test_reqnums_far_below_the_highest_are_rejected(signer: Signer) -> None:
    verifier = make_verifier(signer, replay_window=WINDOW)
    highest = 10 * WINDOW
    verifier.verify(auth(signer, highest))
    assert rejection(verifier, auth(signer, highest - WINDOW)) is RejectReason.TOO_OLD
    assert rejection(verifier, auth(signer, 1)) is RejectReason.TOO_OLD
    assert verifier.verify(auth(signer, highest - WINDOW + 1)).reqnum == highest - WINDOW + 1


def test_a_jump_past_the_window_forgets_the_old_reqnums(signer: Signer) -> None:
    verifier = make_verifier(signer, replay_window=WINDOW)
    verifier.verify(auth(signer, 1))
    verifier.verify(auth(signer, 10**15))
    assert rejection(verifier, auth(signer, 1)) is RejectReason.TOO_OLD
    assert verifier.verify(auth(signer, 10**15 - 1)).reqnum == 10**15 - 1


def test_reqnums_issued_before_a_restart_can_be_refused(signer: Signer) -> None:
    """Refused with a reason of their own, which workers answer 503: routing the request again mends it. They were
    "replayed" (401), which Vast's SDK does not retry: every request in flight to a restarted worker failed."""
    verifier = make_verifier(signer)
    verifier.reject_up_to(100)  # a fresh worker learns the last reqnum issued to its URL
    assert rejection(verifier, auth(signer, 100)) is RejectReason.ISSUED_BEFORE_START
    assert rejection(verifier, auth(signer, 1)) is RejectReason.ISSUED_BEFORE_START
    assert verifier.verify(auth(signer, 102)).reqnum == 102
    assert rejection(verifier, auth(signer, 102)) is RejectReason.REPLAYED
    verifier.reject_up_to(101)  # below the highest: raises the floor, keeps the rest
    assert rejection(verifier, auth(signer, 101)) is RejectReason.ISSUED_BEFORE_START
    assert verifier.verify(auth(signer, 103)).reqnum == 103
    verifier.reject_up_to(50)  # a lower floor never lowers it
    assert rejection(verifier, auth(signer, 99)) is RejectReason.ISSUED_BEFORE_START
    refused = AssignmentRejected(RejectReason.ISSUED_BEFORE_START, "x")
    assert (refused.status, refused.retry_after) == (503, True)
    assert AssignmentRejected(RejectReason.REPLAYED, "x").status == 401


def test_replay_window_memory_is_bounded() -> None:
    window = ReplayWindow(64)
    for reqnum in range(0, 10_000, 3):
        window.check(reqnum)
        window.record(reqnum)
    assert window.highest == 9999
    assert window._seen.bit_length() <= 64
    with pytest.raises(ValueError):
        ReplayWindow(0)


def test_threads_accept_each_distinct_reqnum_exactly_once(signer: Signer) -> None:
    verifier = make_verifier(signer)
    batches = [[auth(signer, t * PER_THREAD + i + 1) for i in range(PER_THREAD)] for t in range(THREADS)]
    accepted = _hammer(verifier, batches)
    assert sorted(accepted) == list(range(1, THREADS * PER_THREAD + 1))


def test_duplicates_sent_from_several_threads_are_accepted_once(signer: Signer) -> None:
    verifier = make_verifier(signer)
    shared = [auth(signer, reqnum) for reqnum in range(1, PER_THREAD + 1)]
    batches = [random.Random(seed).sample(shared, len(shared)) for seed in range(THREADS)]
    accepted = _hammer(verifier, batches)
    assert Counter(accepted) == Counter(range(1, PER_THREAD + 1))


def _hammer(verifier: AssignmentVerifier, batches: list[list[dict[str, Any]]]) -> list[int]:
    """Verify each batch in its own thread, all starting together; the reqnums accepted, over all threads.
    Every refusal must be a replay (checked here, in the test's thread: an assert in a worker thread fails nothing)."""
    start = threading.Barrier(len(batches))
    accepted: list[list[int]] = [[] for _ in batches]
    refusals: list[list[RejectReason]] = [[] for _ in batches]

    def run(index: int) -> None:
        start.wait()
        for item in batches[index]:
            try:
                accepted[index].append(verifier.verify(item).reqnum)
            except AssignmentRejected as exc:
                refusals[index].append(exc.reason)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {reason for per_thread in refusals for reason in per_thread} <= {RejectReason.REPLAYED}
    return [reqnum for per_thread in accepted for reqnum in per_thread]


# -- key rotation ----------------------------------------------------------------------------------------------
def test_a_previous_key_still_published_is_accepted(signer: Signer) -> None:
    previous = Signer.generate()
    verifier = make_verifier(previous)
    assert rejection(verifier, auth(signer, 1)) is RejectReason.UNKNOWN_KEY
    verifier.update_keys(KeyRing([signer.public_key, previous.public_key]))
    assert verifier.verify(auth(signer, 1)).key_id == signer.key_id
    assert verifier.verify(auth(previous, 2)).key_id == previous.key_id
    verifier.update_keys(KeyRing([signer.public_key]))  # the previous key is no longer published
    assert rejection(verifier, auth(previous, 3)) is RejectReason.UNKNOWN_KEY
    # rotation keeps the replay state
    assert rejection(verifier, auth(signer, 1)) is RejectReason.REPLAYED


def pubkey_answer(signer: Signer, *previous: Signer) -> dict[str, Any]:
    keys = publish(signer, [p.public_key for p in previous])
    return {
        "algorithm": "ed25519",
        "key_id": signer.key_id,
        "public_key": signer.public_key.hex(),
        "keys": [key.to_json() for key in keys],
    }


async def test_fetch_keyring_accepts_every_listed_key(signer: Signer) -> None:
    previous = Signer.generate()

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/pubkey/"
        return httpx.Response(200, json=pubkey_answer(signer, previous))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        keyring = await fetch_keyring("http://dispatcher:8081/", client)
    assert keyring.key_ids == {signer.key_id, previous.key_id}
    verifier = make_verifier(signer)
    verifier.update_keys(keyring)
    assert verifier.verify(auth(previous, 1)).reqnum == 1


async def test_fetch_keyring_raises_on_an_error_answer() -> None:
    transport = httpx.MockTransport(lambda _request: httpx.Response(503, json={"error": {"code": "x"}}))
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.HTTPStatusError):
            await fetch_keyring("http://dispatcher:8081", client)


def test_pubkey_answers_are_checked(signer: Signer) -> None:
    only_current = {k: v for k, v in pubkey_answer(signer).items() if k != "keys"}
    assert keyring_from_pubkey_answer(only_current).key_ids == {signer.key_id}
    wrong_id = pubkey_answer(signer)
    wrong_id["keys"][0]["key_id"] = "0" * 16
    bad_algorithm = pubkey_answer(signer)
    bad_algorithm["keys"][0]["algorithm"] = "rsa"
    bad_answers: list[object] = [wrong_id, bad_algorithm, {"keys": []}, {"keys": [{"public_key": "zz"}]}, [1]]
    for bad in bad_answers:
        with pytest.raises(KeyFetchError):
            keyring_from_pubkey_answer(bad)
