"""Ed25519 (PyNaCl) signatures over worker assignments, and the one canonical encoding both sides use.

The signed message is ``DOMAIN`` followed by a canonical JSON object of exactly the signed fields::

    llm-dispatch-assignment-v1\\n{"cost":"242","endpoint":"my-endpoint","expires_at_ms":1764000000000,
    "key_id":"9f86d081884c7d65","reqnum":12345,"request_idx":2421,"url":"http://10.0.0.5:8000"}

* keys in ascending byte order, no whitespace, UTF-8;
* ``cost`` as a JSON *string*: C ``printf("%.17g", cost)`` (so every language renders the same float the same
  way: 242.0 -> ``"242"``, 0.1 -> ``"0.10000000000000001"``);
* ``expires_at_ms``, ``reqnum``, ``request_idx`` as JSON integers;
* ``endpoint``, ``url`` and ``key_id`` are printable ASCII without ``"`` or ``\\`` (the dispatcher refuses anything
  else when a worker registers), so they are written verbatim between quotes: no escaping question arises.

``signature`` is the 64-byte Ed25519 signature in lowercase hex; ``key_id`` is the first 16 hex digits of
SHA-256 over the 32-byte public key. Public keys travel as lowercase hex (``GET /pubkey/``).

Batch signatures (the dispatcher's default, ``--no-batch-signatures`` turns them off): the assignments routed in one
event-loop iteration share one signature, as Roughtime servers sign a batch of replies. Each assignment's leaf is a
16-byte random nonce followed by its canonical bytes, in an RFC 9162 (Certificate Transparency v2) Merkle tree with
SHA-256 (leaf hash ``SHA-256(0x00 || nonce || bytes)``, node hash ``SHA-256(0x01 || left || right)``), and the
signed message is ``BATCH_DOMAIN``, the tree's size as 4 bytes big-endian, then its 32-byte root. Each answer
carries ``batch``: ``{"index": i, "size": n, "nonce": hex, "path": [hex, ...]}``, its nonce and its leaf's RFC 9162
inclusion proof (section 2.1.3.2 gives the verifier's algorithm). An answer without ``batch`` is signed alone, over
its canonical bytes. The two domains differ, so neither kind of signature passes for the other; the size is signed,
so a proof's index and size cannot be changed either. The nonce is what keeps a batch's members apart: without it,
whoever held one answer could guess a neighbour's assignment (its fields are predictable: the same endpoint and
expiry, nearby counters), check the guess against the sibling hash in their own proof, and present it with the
shared signature. Only the leaf's own answer carries its nonce, so a sibling hash cannot be inverted.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from nacl.bindings import crypto_sign, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

DOMAIN = b"llm-dispatch-assignment-v1\n"
BATCH_DOMAIN = b"llm-dispatch-batch-v1\n"
# RFC 9162's prefixes: a leaf's hash can never equal an inner node's, so no proof passes off one for the other
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
HASH_BYTES = 32
HASH_HEX_DIGITS = 2 * HASH_BYTES
BATCH_SIZE_BYTES = 4
NONCE_BYTES = 16  # 128 random bits per leaf: no guessed assignment can be checked against a sibling hash
NONCE_HEX_DIGITS = 2 * NONCE_BYTES
# Leaves in one signed tree. More assignments in one loop iteration make several trees: proofs stay short.
MAX_BATCH_LEAVES = 256
# What a verifier accepts: a proof of a tree this large has at most 16 hashes (bounded work per request).
MAX_VERIFIED_BATCH_SIZE = 1 << 16
ALGORITHM = "ed25519"
SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
KEY_ID_HEX_DIGITS = 16
SIGNATURE_BYTES = 64
SIGNATURE_HEX_DIGITS = 2 * SIGNATURE_BYTES
# How far a worker's clock may run ahead of the dispatcher's: the verifier's default, and how long past its last
# assignment's expiry the dispatcher keeps a replaced key published.
DEFAULT_CLOCK_SKEW_S = 5.0
# Printable ASCII except '"' and '\\': what may appear in a signed string field.
SAFE_TEXT = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]+$")
HASH_HEX = re.compile(f"[0-9a-f]{{{HASH_HEX_DIGITS}}}")  # lowercase only, as signatures
NONCE_HEX = re.compile(f"[0-9a-f]{{{NONCE_HEX_DIGITS}}}")
SIGNED_FIELDS = ("cost", "endpoint", "expires_at_ms", "key_id", "reqnum", "request_idx", "url")


T = TypeVar("T")


class KeyFileError(ValueError):
    """A signing-key file is missing, malformed or readable by others."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """What the dispatcher signs: which worker serves which request, until when, under which key."""

    endpoint: str
    url: str
    cost: float
    reqnum: int
    request_idx: int
    expires_at_ms: int
    key_id: str

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Assignment:
        """The signed fields of an assignment as received (``auth_data``); ``ValueError`` if any is missing or
        of the wrong type."""
        missing = [name for name in SIGNED_FIELDS if name not in data]
        if missing:
            raise ValueError(f"assignment lacks {', '.join(missing)}")
        cost = data["cost"]
        ints = {name: data[name] for name in ("reqnum", "request_idx", "expires_at_ms")}
        texts = {name: data[name] for name in ("endpoint", "url", "key_id")}
        if isinstance(cost, bool) or not isinstance(cost, int | float):
            raise ValueError("cost must be a number")
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer")
        for name, value in texts.items():
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
            if not is_safe_text(value):  # what the dispatcher signs; a lone surrogate could not even be answered
                raise ValueError(f"{name} must be printable ASCII without quotes or backslashes")
        try:
            as_float = float(cost)  # an int past float's range (stdlib json parses one) overflows here
        except OverflowError:
            raise ValueError("cost is out of range") from None
        if not math.isfinite(as_float):
            raise ValueError("cost must be finite")
        return cls(cost=as_float, **ints, **texts)


def is_safe_text(value: str) -> bool:
    return SAFE_TEXT.fullmatch(value) is not None  # fullmatch: '$' alone would accept a trailing newline


def format_cost(cost: float) -> str:
    return format(cost, ".17g")


def canonical_bytes(a: Assignment) -> bytes:
    """The exact bytes that are signed (see the module docstring)."""
    if not (a.endpoint and a.url and a.key_id and is_safe_text(a.endpoint + a.url + a.key_id)):  # one regex, hot
        for name, value in (("endpoint", a.endpoint), ("url", a.url), ("key_id", a.key_id)):
            if not is_safe_text(value):
                raise ValueError(f"{name} must be printable ASCII without quotes or backslashes")
    return DOMAIN + (
        f'{{"cost":"{format_cost(a.cost)}","endpoint":"{a.endpoint}","expires_at_ms":{a.expires_at_ms},'
        f'"key_id":"{a.key_id}","reqnum":{a.reqnum},"request_idx":{a.request_idx},"url":"{a.url}"}}'
    ).encode("ascii")


def leaf_hash(message: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + message).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def batch_message(size: int, root: bytes) -> bytes:
    """The bytes a batch signature signs: the domain, the tree's size (4 bytes, big-endian) and its root."""
    return BATCH_DOMAIN + size.to_bytes(BATCH_SIZE_BYTES, "big") + root


def merkle_levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """RFC 9162's tree over ``leaves`` (leaf hashes), level by level from the leaves up to ``[root]``.

    A lone last node moves up unpaired: that gives RFC 9162's shape (its left subtree holds the largest power of
    two of leaves below the size), and each node's parent sits at half its index."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    levels = [list(leaves)]
    level = levels[0]
    while len(level) > 1:
        parents = [node_hash(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            parents.append(level[-1])
        levels.append(parents)
        level = parents
    return levels


def inclusion_path(levels: Sequence[Sequence[T]], index: int) -> list[T]:
    """Leaf ``index``'s RFC 9162 inclusion proof: its sibling on each level that has one, bottom up. ``levels``
    as ``merkle_levels`` returns them, or any same-shaped copy (their hex)."""
    path = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index >>= 1
    return path


def root_from_proof(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    """The root that ``path`` proves ``leaf`` (at ``index`` of ``size``) under, or None when the proof cannot be
    one: RFC 9162, section 2.1.3.2, step for step."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


class BatchProof(NamedTuple):  # a tuple: made once per routed request, a frozen dataclass costs twice as much
    """Where an assignment sits in the batch its signature covers: the answer's ``batch``, path in hex as sent."""

    leaf_index: int  # RFC 9162's names; "index" and "size" on the wire
    tree_size: int
    nonce: str
    path: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.leaf_index, "size": self.tree_size, "nonce": self.nonce, "path": list(self.path)}

    def root(self, message: bytes) -> bytes | None:
        """The root this proof puts the assignment of canonical bytes ``message`` under, or None when it is no
        proof of a batch this verifier accepts (a proof built in code is held to the wire's rules too)."""
        if _proof_problem(self.leaf_index, self.tree_size, self.nonce, self.path) is not None:
            return None
        leaf = leaf_hash(bytes.fromhex(self.nonce) + message)
        return root_from_proof(leaf, self.leaf_index, self.tree_size, [bytes.fromhex(node) for node in self.path])

    @classmethod
    def from_json(cls, data: object) -> BatchProof:
        """``ValueError`` unless ``data`` is a well-formed ``batch`` object (lowercase hex, bounded size)."""
        if not isinstance(data, Mapping):
            raise ValueError("batch must be an object")
        index, size, nonce, path = data.get("index"), data.get("size"), data.get("nonce"), data.get("path")
        if not isinstance(path, list):
            raise ValueError("batch.path must be a list of hashes")
        problem = _proof_problem(index, size, nonce, path)
        if problem is not None:
            raise ValueError(problem)
        return cls(index, size, nonce, tuple(path))  # type: ignore[arg-type]  # checked by _proof_problem


def _proof_problem(index: object, size: object, nonce: object, path: Sequence[object]) -> str | None:
    """What makes these no batch proof a verifier accepts, or None: the rules of the wire format, in one place."""
    if isinstance(index, bool) or not isinstance(index, int) or isinstance(size, bool) or not isinstance(size, int):
        return "batch.index and batch.size must be integers"
    if not 2 <= size <= MAX_VERIFIED_BATCH_SIZE or not 0 <= index < size:
        return f"batch.size must be 2 to {MAX_VERIFIED_BATCH_SIZE} and batch.index below it"
    if not isinstance(nonce, str) or not NONCE_HEX.fullmatch(nonce):
        return f"batch.nonce must be {NONCE_HEX_DIGITS} lowercase hex digits"
    if len(path) > (size - 1).bit_length():
        return "batch.path must hold at most ceil(log2(size)) hashes"
    if not all(isinstance(node, str) and HASH_HEX.fullmatch(node) for node in path):
        return f"batch.path must hold {HASH_HEX_DIGITS} lowercase hex digits per hash"
    return None


class Signature(NamedTuple):
    """A signature as an answer carries it: hex, and its batch proof unless it signs this assignment alone."""

    hex: str
    batch: BatchProof | None = None


def key_id_for(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:KEY_ID_HEX_DIGITS]


class Signer:
    """The dispatcher's current signing key."""

    def __init__(self, key: SigningKey, *, ephemeral: bool = False) -> None:
        _, self._secret = crypto_sign_seed_keypair(bytes(key))  # libsodium's 64-byte secret key
        self.public_key = bytes(key.verify_key)
        self.key_id = key_id_for(self.public_key)
        self.ephemeral = ephemeral

    @classmethod
    def generate(cls, seed: bytes | None = None) -> Signer:
        """An ephemeral key: a new one, or the one of ``seed`` (several processes sharing an ephemeral key)."""
        return cls(SigningKey.generate() if seed is None else SigningKey(seed), ephemeral=True)

    @classmethod
    def from_seed_hex(cls, seed_hex: str) -> Signer:
        return cls(SigningKey(parse_hex(seed_hex, SEED_BYTES, "signing key")))

    def sign(self, assignment: Assignment) -> str:
        return self.sign_bytes(canonical_bytes(assignment)).hex()

    def sign_batch(self, messages: Sequence[bytes]) -> list[Signature]:
        """One signature over the canonical bytes ``messages`` (``canonical_bytes``) of one batch; a batch of one
        is signed alone, as ``sign`` does."""
        if len(messages) == 1:
            return [Signature(self.sign_bytes(messages[0]).hex())]
        size = len(messages)
        random = os.urandom(NONCE_BYTES * size)  # one call for the batch
        nonces = [random[i * NONCE_BYTES : (i + 1) * NONCE_BYTES] for i in range(size)]
        levels = merkle_levels([leaf_hash(nonce + message) for nonce, message in zip(nonces, messages, strict=True)])
        signature = self.sign_bytes(batch_message(size, levels[-1][0])).hex()
        in_hex = [[node.hex() for node in level] for level in levels]  # each node once, shared by the paths
        return [
            Signature(signature, BatchProof(i, size, nonces[i].hex(), tuple(inclusion_path(in_hex, i))))
            for i in range(size)
        ]

    def sign_bytes(self, message: bytes) -> bytes:
        """The 64-byte signature of ``message``: one libsodium call, which runs without the GIL."""
        return crypto_sign(message, self._secret)[:SIGNATURE_BYTES]


@dataclass(frozen=True)
class PublishedKey:
    key_id: str
    public_key_hex: str
    current: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "algorithm": ALGORITHM,
            "public_key": self.public_key_hex,
            "current": self.current,
        }


class KeyRing:
    """Public keys a verifier accepts, by key id: the current one plus those still published after a rotation."""

    def __init__(self, public_keys: Iterable[bytes]) -> None:
        self._keys = {key_id_for(pk): VerifyKey(pk) for pk in public_keys}

    @classmethod
    def from_hex(cls, public_keys_hex: Iterable[str]) -> KeyRing:
        return cls(parse_hex(pk, PUBLIC_KEY_BYTES, "public key") for pk in public_keys_hex)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def verify(self, assignment: Assignment, signature_hex: str, batch: BatchProof | None = None) -> bool:
        """True when ``signature_hex`` is a valid signature of ``assignment`` by the key it names: alone, or with
        ``batch``, of the batch that proof places it in."""
        key = self._keys.get(assignment.key_id)
        if key is None or len(signature_hex) != SIGNATURE_HEX_DIGITS:
            return False
        try:
            signature = bytes.fromhex(signature_hex)
            message = canonical_bytes(assignment)
            if batch is not None:
                root = batch.root(message)
                if root is None:
                    return False
                message = batch_message(batch.tree_size, root)
            key.verify(message, signature)
        except (ValueError, BadSignatureError):
            return False
        return True


def publish(signer: Signer, previous_public_keys: Iterable[bytes] = ()) -> list[PublishedKey]:
    """What ``GET /pubkey/`` lists: the current key first, then retired keys workers should still accept."""
    keys = [PublishedKey(signer.key_id, signer.public_key.hex(), True)]
    seen = {signer.key_id}
    for pk in previous_public_keys:
        key_id = key_id_for(pk)
        if key_id not in seen:
            seen.add(key_id)
            keys.append(PublishedKey(key_id, pk.hex(), False))
    return keys


def parse_hex(text: str, size: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise KeyFileError(f"{what} is not hex") from None
    if len(raw) != size:
        raise KeyFileError(f"{what} must be {size} bytes ({size * 2} hex digits), got {len(raw)}")
    return raw


# -- key files ------------------------------------------------------------------------------------------------
def write_key_file(path: Path) -> Signer:
    """Create a new signing key at ``path`` (mode 0600, never overwriting) and its public key at ``path.pub``."""
    key = SigningKey.generate()
    signer = Signer(key)
    public_path = Path(f"{path}.pub")
    # O_EXCL for both: it also refuses a symlink, dangling or not (writing the public key through one, planted in the
    # key folder, created or filled a file of the planter's choice, as root when keygen ran as root)
    with os.fdopen(os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as public:
        try:
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as private:
                private.write(bytes(key).hex() + "\n")
            public.write(signer.public_key.hex() + "\n")
        except OSError:  # the private key exists already, or a full disk: no half pair left behind
            public_path.unlink()
            raise
    return signer


def read_key_file(path: Path) -> Signer:
    """The signing key in ``path``; refuses a file that group or others may read (as ssh does)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"signing key {path} is accessible by others (mode {oct(mode & 0o777)}); chmod 600 it")
    try:
        return Signer.from_seed_hex(path.read_text())
    except (ValueError, OSError) as exc:  # not hex, the wrong length, not text: name the file
        raise KeyFileError(f"signing key {path}: {exc}") from None


def read_public_key_file(path: Path) -> bytes | None:
    """The public key in ``path`` (keygen's ``PATH.pub``: hex), or None when the file is missing or blank (a
    Kubernetes ConfigMap key left empty between rotations)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable, a folder, not text: name the file
        raise KeyFileError(f"public key {path}: {exc}") from None
    if not text.strip():
        return None
    return parse_hex(text, PUBLIC_KEY_BYTES, f"public key {path}")


def read_public_keys(text: str) -> list[bytes]:
    """Public keys from a comma/whitespace separated hex list (retired keys still published)."""
    return [parse_hex(item, PUBLIC_KEY_BYTES, "public key") for item in re.split(r"[\s,]+", text) if item]
