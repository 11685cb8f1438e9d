"""The worker's side of a signed assignment: is this request really one the dispatcher sent *here*, and only once?

A worker must not trust that a caller went through the dispatcher: the route answer a client forwards as
``auth_data`` is signed (see ``signing``), so the worker checks, in this order,

1. the shape of the signed fields (``bad_format``);
2. the signing key, among those ``GET /pubkey/`` publishes (``unknown_key``), and the signature (``bad_signature``),
   alone or, with ``batch``, through its Merkle proof;
3. that the assignment names this worker (``wrong_url``) and, when configured, its endpoint (``wrong_endpoint``);
4. that it has not expired (``expired``), allowing for some clock skew between the two machines;
5. that its ``reqnum`` was not used before (``replayed``, ``too_old``) nor issued before this process started
   (``issued_before_start``).

Checks 3 to 5 only run on authentic assignments, so their reason codes describe what the dispatcher really said.
A refusal is a 401, except those that routing the request again mends (``TRANSIENT``): a key not fetched yet, an
assignment that came too late or from before a restart. Those are 503 with Retry-After, which Vast's SDK retries
by routing the request again (a 401 ended its request, and the load stayed reserved until the request ttl).
``reqnum`` grows per worker, so replays are caught the way IPsec does (RFC 4303, section 3.4.3): the highest
reqnum seen plus a bitmap of the ``replay_window`` reqnums below it. Memory stays bounded whatever arrives, and
requests that overtake each other (several client connections) are still accepted once each. A reqnum is only
recorded once every other check has passed, so a forged or expired copy cannot burn a genuine one.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from enum import StrEnum
from typing import Any

import httpx

from service.dispatch.signing import (
    ALGORITHM,
    DEFAULT_CLOCK_SKEW_S,
    PUBLIC_KEY_BYTES,
    SIGNATURE_HEX_DIGITS,
    Assignment,
    BatchProof,
    KeyRing,
    Signature,
    key_id_for,
    parse_hex,
)
from service.dispatch.worker_url import canonical_url
from service.errors import InvalidAssignment

DEFAULT_REPLAY_WINDOW = 4096  # reqnums below the highest seen that may still arrive late
MS_PER_S = 1000
PUBKEY_PATH = "/pubkey/"
PUBKEY_TIMEOUT_S = 10.0
SIGNATURE_HEX = re.compile(f"[0-9a-f]{{{SIGNATURE_HEX_DIGITS}}}")  # lowercase only: one spelling per signature


class RejectReason(StrEnum):
    """Why an assignment was refused; the value is the machine-readable code workers answer with."""

    BAD_FORMAT = "bad_format"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_URL = "wrong_url"
    WRONG_ENDPOINT = "wrong_endpoint"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    TOO_OLD = "too_old"  # below the replay window: it cannot be told from a replay any more
    # at or below the last reqnum the dispatcher had issued to this URL when this process started (reject_up_to)
    ISSUED_BEFORE_START = "issued_before_start"


TRANSIENT = frozenset(
    {RejectReason.UNKNOWN_KEY, RejectReason.EXPIRED, RejectReason.TOO_OLD, RejectReason.ISSUED_BEFORE_START}
)
HTTP_SERVICE_UNAVAILABLE = 503


class AssignmentRejected(InvalidAssignment):
    """``verify`` refused an assignment; ``reason`` is a ``RejectReason`` value (also in the error body)."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        transient = reason in TRANSIENT
        super().__init__(
            f"{reason.value}: {message}" + ("; route the request again" if transient else ""),
            status=HTTP_SERVICE_UNAVAILABLE if transient else None,
            details={"reason": reason.value},
        )
        self.reason = reason
        self.retry_after = transient


class KeyFetchError(ValueError):
    """``GET /pubkey/`` answered something that is not a usable list of keys."""


def normalise_url(url: str) -> str:
    """URLs compare without trailing slashes: ``http://h:8000/`` and ``http://h:8000`` name the same worker."""
    return url.rstrip("/")


def _canonical_or_none(url: str) -> str | None:
    try:
        return canonical_url(url)
    except ValueError:
        return None


class ReplayWindow:
    """The reqnums accepted so far, as the highest one plus a bitmap of the ``size`` below it (not thread-safe:
    the verifier holds its lock around it). Bit ``i`` of the bitmap is set when ``highest - i`` was accepted."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("replay_window must be >= 1")
        self.size = size
        self._mask = (1 << size) - 1
        self._highest: int | None = None
        self._seen = 0
        self._floor: int | None = None  # reject_up_to's: issued before this process started

    @property
    def highest(self) -> int | None:
        return self._highest

    def check(self, reqnum: int) -> None:
        """Raise ``AssignmentRejected`` if ``reqnum`` may not be accepted now; record nothing."""
        if self._floor is not None and reqnum <= self._floor:
            raise AssignmentRejected(
                RejectReason.ISSUED_BEFORE_START, f"reqnum {reqnum} was issued before this worker started"
            )
        if self._highest is None or reqnum > self._highest:
            return
        offset = self._highest - reqnum
        if offset >= self.size:
            raise AssignmentRejected(
                RejectReason.TOO_OLD, f"reqnum {reqnum} is {offset} below the highest seen, window is {self.size}"
            )
        if self._seen >> offset & 1:
            raise AssignmentRejected(RejectReason.REPLAYED, f"reqnum {reqnum} was already used")

    def reject_up_to(self, floor: int) -> None:
        """Refuse every reqnum <= ``floor`` as issued before this process started."""
        self._floor = floor if self._floor is None else max(self._floor, floor)

    def record(self, reqnum: int) -> None:
        """Mark ``reqnum`` as used; call only after ``check`` passed (under the same lock)."""
        if self._highest is None:
            self._highest, self._seen = reqnum, 1
        elif reqnum > self._highest:
            advance = reqnum - self._highest
            # a jump past the whole window forgets everything: never shift by an unbounded amount
            self._seen = 1 if advance >= self.size else (self._seen << advance | 1) & self._mask
            self._highest = reqnum
        else:
            self._seen |= 1 << (self._highest - reqnum)


class AssignmentVerifier:
    """Verifies ``auth_data`` for one worker. Thread-safe: signatures are checked without the lock (they are
    the costly part), the replay window under it."""

    def __init__(
        self,
        keyring: KeyRing,
        *,
        own_urls: Collection[str],
        endpoint: str,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
        clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        urls = frozenset(canonical_url(url) for url in own_urls)  # the spelling the dispatcher signs
        if not urls:
            raise ValueError("own_urls must name at least one URL (the one this worker reports)")
        if not endpoint:
            # required: a worker token of any endpoint can report any URL, so the dispatcher may sign another
            # endpoint's work for this URL, and accepting it would also move the replay window past its own reqnums
            raise ValueError("endpoint must name the endpoint this worker serves")
        if clock_skew_s < 0:
            raise ValueError("clock_skew_s must be >= 0")
        self._keyring = keyring
        self._own_urls = urls
        self._endpoint = endpoint
        self._skew_ms = round(clock_skew_s * MS_PER_S)
        self._clock = clock
        self._window = ReplayWindow(replay_window)
        self._lock = threading.Lock()

    @property
    def key_ids(self) -> frozenset[str]:
        return self._keyring.key_ids

    def update_keys(self, keyring: KeyRing) -> None:
        """Accept the keys of ``keyring`` from now on (after a rotation); replay state is kept."""
        self._keyring = keyring  # one reference swap: verifications in flight finish with the old ring

    def reject_up_to(self, reqnum: int) -> None:
        """Refuse every reqnum <= ``reqnum`` from now on: a worker that starts afresh calls it with the last
        reqnum the dispatcher issued to its URL (``POST /worker_status/`` answers it), since its empty replay
        window cannot know which of those were already served by the process before it."""
        with self._lock:
            self._window.reject_up_to(reqnum)

    def verify(self, auth_data: Mapping[str, Any]) -> Assignment:
        """The assignment in ``auth_data`` if it is authentic, meant for this worker, fresh and unused; its
        reqnum is then used up. Raises ``AssignmentRejected`` otherwise."""
        return self.use(self.authenticate(auth_data))

    def authenticate(self, auth_data: Mapping[str, Any]) -> Assignment:
        """``verify`` without using the reqnum up (``use`` does): a request refused for its payload after this can
        be sent again with the same assignment."""
        assignment, signature = _parse(auth_data)
        self._check_signature(assignment, signature)
        self._check_target(assignment)
        self._check_expiry(assignment)
        with self._lock:
            self._window.check(assignment.reqnum)
        return assignment

    def use(self, assignment: Assignment) -> Assignment:
        """Use up the reqnum of an ``authenticate``d assignment; ``AssignmentRejected`` (replayed) when another
        request used it meanwhile."""
        with self._lock:
            self._window.check(assignment.reqnum)
            self._window.record(assignment.reqnum)
        return assignment

    def _check_signature(self, assignment: Assignment, signature: Signature) -> None:
        keyring = self._keyring
        if assignment.key_id not in keyring.key_ids:
            # unknown_key makes a worker fetch the dispatcher's keys: only for an assignment that could be its own
            self._check_target(assignment)
            self._check_expiry(assignment)
            raise AssignmentRejected(RejectReason.UNKNOWN_KEY, f"key {assignment.key_id!r} is not a published key")
        if not keyring.verify(assignment, signature.hex, signature.batch):
            raise AssignmentRejected(RejectReason.BAD_SIGNATURE, "signature does not match the assignment")

    def _check_target(self, assignment: Assignment) -> None:
        if _canonical_or_none(assignment.url) not in self._own_urls:
            raise AssignmentRejected(RejectReason.WRONG_URL, f"assigned to {assignment.url}, not this worker")
        if assignment.endpoint != self._endpoint:
            raise AssignmentRejected(
                RejectReason.WRONG_ENDPOINT, f"assigned for endpoint {assignment.endpoint!r}, not {self._endpoint!r}"
            )

    def _check_expiry(self, assignment: Assignment) -> None:
        now_ms = int(self._clock() * MS_PER_S)
        if assignment.expires_at_ms + self._skew_ms <= now_ms:
            raise AssignmentRejected(
                RejectReason.EXPIRED, f"expired {now_ms - assignment.expires_at_ms} ms ago (clock skew allowed)"
            )


def _parse(auth_data: Mapping[str, Any]) -> tuple[Assignment, Signature]:
    if not isinstance(auth_data, Mapping):
        raise AssignmentRejected(RejectReason.BAD_FORMAT, "auth_data must be a JSON object")
    try:
        assignment = Assignment.from_mapping(auth_data)
        batch = None if auth_data.get("batch") is None else BatchProof.from_json(auth_data["batch"])
    except ValueError as exc:
        raise AssignmentRejected(RejectReason.BAD_FORMAT, str(exc)) from None
    signature = auth_data.get("signature")
    if not isinstance(signature, str) or not SIGNATURE_HEX.fullmatch(signature):
        raise AssignmentRejected(RejectReason.BAD_FORMAT, "signature must be 128 lowercase hex digits")
    return assignment, Signature(signature, batch)


# -- fetching the published keys ----------------------------------------------------------------------------------
async def fetch_keyring(dispatcher_url: str, client: httpx.AsyncClient | None = None) -> KeyRing:
    """Every key ``GET /pubkey/`` lists (the current one and those retired but still published).

    Raises ``httpx.HTTPError`` when the dispatcher cannot be reached or answers an error, ``KeyFetchError`` when
    the answer is not a valid key list."""
    url = normalise_url(dispatcher_url) + PUBKEY_PATH
    if client is None:
        async with httpx.AsyncClient(timeout=PUBKEY_TIMEOUT_S) as own:
            response = await own.get(url)
    else:
        response = await client.get(url, timeout=PUBKEY_TIMEOUT_S)
    response.raise_for_status()
    try:
        data = response.json()
    except ValueError:
        raise KeyFetchError(f"{url} did not answer JSON") from None
    return keyring_from_pubkey_answer(data)


def keyring_from_pubkey_answer(data: object) -> KeyRing:
    """The ``KeyRing`` of a ``GET /pubkey/`` answer; each listed key id must match its key."""
    if not isinstance(data, dict):
        raise KeyFetchError("pubkey answer must be a JSON object")
    entries = data.get("keys")
    if entries is None:  # a dispatcher that publishes only its current key
        entries = [{name: data.get(name) for name in ("key_id", "algorithm", "public_key")}]
    if not isinstance(entries, list) or not entries:
        raise KeyFetchError("pubkey answer lists no keys")
    return KeyRing(_public_key(entry) for entry in entries)


def _public_key(entry: object) -> bytes:
    if not isinstance(entry, dict):
        raise KeyFetchError("each published key must be a JSON object")
    algorithm = entry.get("algorithm")
    if algorithm not in (None, ALGORITHM):
        raise KeyFetchError(f"unsupported key algorithm {algorithm!r}")
    text = entry.get("public_key")
    if not isinstance(text, str):
        raise KeyFetchError("public_key must be a hex string")
    try:
        public_key = parse_hex(text, PUBLIC_KEY_BYTES, "public key")
    except ValueError as exc:
        raise KeyFetchError(str(exc)) from None
    listed_id = entry.get("key_id")
    if listed_id is not None and listed_id != key_id_for(public_key):
        raise KeyFetchError(f"key id {listed_id!r} does not belong to its public key")
    return public_key
