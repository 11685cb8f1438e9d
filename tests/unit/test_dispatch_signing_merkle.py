"""Batch signatures: RFC 9162's Merkle tree and inclusion proofs, the signed batch message, and what a verifier
refuses. The tree and the proofs are checked against RFC 9162's recursive definitions (written out here on their
own) and Certificate Transparency's published test vectors."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest

from service.dispatch.signing import (
    BATCH_DOMAIN,
    MAX_VERIFIED_BATCH_SIZE,
    Assignment,
    BatchProof,
    KeyRing,
    Signer,
    canonical_bytes,
    inclusion_path,
    leaf_hash,
    merkle_levels,
    root_from_proof,
)

# Certificate Transparency's test leaves and the roots of their first 1..8 (certificate-transparency-go,
# merkle/merkle_tree_test.go, the same in transparency-dev/merkle's testdata)
CT_LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                         "606162636465666768696a6b6c6d6e6f")]  # fmt: skip
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
SIZES = range(1, 40)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(entries: list[bytes]) -> bytes:
    """RFC 9162, section 2.1.1: MTH(D[n]) over the entries themselves."""
    if len(entries) == 1:
        return sha256(b"\x00" + entries[0])
    k = 1 << ((len(entries) - 1).bit_length() - 1)  # the largest power of two below n
    return sha256(b"\x01" + mth(entries[:k]) + mth(entries[k:]))


def rfc_path(m: int, entries: list[bytes]) -> list[bytes]:
    """RFC 9162, section 2.1.3.1: PATH(m, D[n])."""
    if len(entries) == 1:
        return []
    k = 1 << ((len(entries) - 1).bit_length() - 1)
    if m < k:
        return [*rfc_path(m, entries[:k]), mth(entries[k:])]
    return [*rfc_path(m - k, entries[k:]), mth(entries[:k])]


def entries(n: int) -> list[bytes]:
    return [f"entry {i}".encode() for i in range(n)]


def assignments(signer: Signer, n: int) -> list[Assignment]:
    common = {"endpoint": "ep", "expires_at_ms": 1764000000000, "key_id": signer.key_id}
    return [
        Assignment(url=f"http://10.0.0.{i % 4}:8000", cost=1.0 + i, reqnum=1000 + i, request_idx=5000 + i, **common)
        for i in range(n)
    ]


# -- the tree --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(1, len(CT_LEAVES) + 1))
def test_roots_match_certificate_transparency_test_vectors(n: int) -> None:
    levels = merkle_levels([leaf_hash(leaf) for leaf in CT_LEAVES[:n]])
    assert levels[-1] == [bytes.fromhex(CT_ROOTS[n - 1])]


@pytest.mark.parametrize("n", SIZES)
def test_root_and_every_inclusion_path_match_rfc_9162(n: int) -> None:
    data = entries(n)
    levels = merkle_levels([leaf_hash(entry) for entry in data])
    assert levels[-1] == [mth(data)]
    for m in range(n):
        path = inclusion_path(levels, m)
        assert path == rfc_path(m, data), (n, m)
        assert root_from_proof(leaf_hash(data[m]), m, n, path) == mth(data)


def test_a_tree_needs_a_leaf() -> None:
    with pytest.raises(ValueError, match="at least one leaf"):
        merkle_levels([])


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13])
def test_a_proof_proves_nothing_else(n: int) -> None:
    """Another leaf or index, a path one hash short or long, or any hash changed: no longer the root. (Another size
    may give the same root, leaf 0 of 3 and of 4 climbing alike: that is why the batch message signs the size.)"""
    data = entries(n)
    levels = merkle_levels([leaf_hash(entry) for entry in data])
    root = levels[-1][0]
    for m in range(n):
        path = inclusion_path(levels, m)
        leaf = leaf_hash(data[m])
        assert root_from_proof(leaf_hash(b"another entry"), m, n, path) != root
        assert root_from_proof(leaf, m, m, path) is None  # index at or past the size
        assert root_from_proof(leaf, -1, n, path) is None
        assert root_from_proof(leaf, m, n, path[:-1]) is None
        assert root_from_proof(leaf, m, n, [*path, root]) is None
        for other in range(n):
            if other != m:
                assert root_from_proof(leaf, other, n, path) != root
        for j in range(len(path)):
            changed = [*path]
            changed[j] = bytes([changed[j][0] ^ 1]) + changed[j][1:]
            assert root_from_proof(leaf, m, n, changed) != root


# -- batch signatures ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 7, 16, 33])
def test_a_batch_signature_verifies_for_every_assignment_in_it(n: int) -> None:
    signer = Signer.generate()
    items = assignments(signer, n)
    signatures = signer.sign_batch([canonical_bytes(a) for a in items])
    ring = KeyRing([signer.public_key])
    assert len({s.hex for s in signatures}) == 1  # one Ed25519 signature for the whole batch
    for i, (a, signature) in enumerate(zip(items, signatures, strict=True)):
        assert signature.batch is not None
        assert (signature.batch.leaf_index, signature.batch.tree_size) == (i, n)
        assert ring.verify(a, signature.hex, signature.batch)
        assert not ring.verify(a, signature.hex)  # without its proof it is no signature of the assignment
        others = [b for b in items if b != a]
        assert not any(ring.verify(b, signature.hex, signature.batch) for b in others)  # nor of a neighbour's


def test_the_signed_message_is_the_domain_the_size_and_the_root_over_nonce_and_bytes() -> None:
    """What the README tells a worker in another language to build."""
    signer = Signer.generate()
    items = assignments(signer, 5)
    data = [canonical_bytes(a) for a in items]
    signatures = signer.sign_batch(data)
    nonces = [bytes.fromhex(s.batch.nonce) for s in signatures if s.batch is not None]
    assert len(nonces) == 5 and len(set(nonces)) == 5 and all(len(nonce) == 16 for nonce in nonces)
    message = (
        b"llm-dispatch-batch-v1\n" + (5).to_bytes(4, "big") + mth([n + d for n, d in zip(nonces, data, strict=True)])
    )
    assert message.startswith(BATCH_DOMAIN)
    assert signer.sign_bytes(message).hex() == signatures[0].hex  # Ed25519 is deterministic


def test_a_batch_member_cannot_pass_off_a_neighbours_assignment() -> None:
    """Whoever holds one answer knows (or can guess) every field of its neighbour's assignment and sees the
    neighbour's leaf hash in its own proof. Without a secret per leaf that was enough: confirm the guess against the
    sibling hash and present it with the shared signature. The neighbour's nonce is only in the neighbour's answer."""
    signer = Signer.generate()
    ring = KeyRing([signer.public_key])
    mine, theirs = assignments(signer, 2)
    own, _ = signer.sign_batch([canonical_bytes(mine), canonical_bytes(theirs)])
    assert own.batch is not None
    sibling = own.batch.path[0]
    own_leaf = leaf_hash(bytes.fromhex(own.batch.nonce) + canonical_bytes(mine)).hex()
    for nonce in (own.batch.nonce, "00" * 16, "ff" * 16):
        assert leaf_hash(bytes.fromhex(nonce) + canonical_bytes(theirs)).hex() != sibling  # a guess cannot be checked
        forged = BatchProof(1, 2, nonce, (own_leaf,))
        assert not ring.verify(theirs, own.hex, forged)


def test_a_batch_of_one_is_signed_alone() -> None:
    signer = Signer.generate()
    a = assignments(signer, 1)[0]
    (signature,) = signer.sign_batch([canonical_bytes(a)])
    assert signature.batch is None and signature.hex == signer.sign(a)


def test_neither_kind_of_signature_passes_for_the_other() -> None:
    """A lone signature with a made-up proof, or a batch signature without one, fails: different domains."""
    signer = Signer.generate()
    ring = KeyRing([signer.public_key])
    a, b = assignments(signer, 2)
    alone = signer.sign(a)
    fake = BatchProof(0, 2, "00" * 16, (leaf_hash(canonical_bytes(b)).hex(),))
    assert not ring.verify(a, alone, fake)
    batch = signer.sign_batch([canonical_bytes(a), canonical_bytes(b)])[0]
    assert not ring.verify(a, batch.hex)


@pytest.mark.parametrize(
    "change", [{"cost": 2.0000000000000004}, {"reqnum": 99999}, {"request_idx": 1}, {"url": "http://10.0.0.6:8000"},
               {"endpoint": "other"}, {"expires_at_ms": 1764000000001}],
)  # fmt: skip
def test_any_changed_field_breaks_a_batch_signature(change: dict[str, Any]) -> None:
    signer = Signer.generate()
    items = assignments(signer, 6)
    signatures = signer.sign_batch([canonical_bytes(a) for a in items])
    ring = KeyRing([signer.public_key])
    for a, signature in zip(items, signatures, strict=True):
        assert not ring.verify(dataclasses.replace(a, **change), signature.hex, signature.batch)


def test_a_changed_proof_breaks_a_batch_signature() -> None:
    signer = Signer.generate()
    items = assignments(signer, 6)
    signatures = signer.sign_batch([canonical_bytes(a) for a in items])
    ring = KeyRing([signer.public_key])
    a, signature = items[3], signatures[3]
    proof = signature.batch
    assert proof is not None and ring.verify(a, signature.hex, proof)
    for index in (0, 1, 2, 4, 5):
        assert not ring.verify(a, signature.hex, proof._replace(leaf_index=index))
    for size in (2, 4, 5, 7, 8, 64):
        assert not ring.verify(a, signature.hex, proof._replace(tree_size=size))
    for j, node in enumerate(proof.path):
        for position in range(len(node)):
            changed = node[:position] + ("1" if node[position] != "1" else "2") + node[position + 1 :]
            path = (*proof.path[:j], changed, *proof.path[j + 1 :])
            assert not ring.verify(a, signature.hex, proof._replace(path=path))
    for position in range(len(proof.nonce)):
        nonce = proof.nonce[:position] + ("1" if proof.nonce[position] != "1" else "2") + proof.nonce[position + 1 :]
        assert not ring.verify(a, signature.hex, proof._replace(nonce=nonce))
    assert not ring.verify(a, signature.hex, proof._replace(path=proof.path[:-1]))
    assert not ring.verify(a, signature.hex, proof._replace(tree_size=2**32))  # refused, not an OverflowError
    # what from_json refuses on the wire, refused for a proof built in code too
    assert not ring.verify(a, signature.hex, proof._replace(nonce=proof.nonce.upper()))
    assert not ring.verify(a, signature.hex, proof._replace(nonce=proof.nonce + "00"))
    assert not ring.verify(a, signature.hex, proof._replace(path=(*proof.path, "ab" * 32)))
    assert not ring.verify(a, signature.hex, proof._replace(path=tuple(node.upper() for node in proof.path)))


# -- the answer's "batch" object ---------------------------------------------------------------------------------
NONCE = "5a" * 16


def test_batch_proof_round_trips_through_json() -> None:
    proof = BatchProof(2, 5, NONCE, ("ab" * 32, "cd" * 32, "ef" * 32))
    assert proof.to_json() == {"index": 2, "size": 5, "nonce": NONCE, "path": ["ab" * 32, "cd" * 32, "ef" * 32]}
    assert BatchProof.from_json(proof.to_json()) == proof


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be an object"),
        ({"index": True, "size": 2, "nonce": NONCE, "path": []}, "integers"),
        ({"index": 0, "size": 2.0, "nonce": NONCE, "path": []}, "integers"),
        ({"size": 2, "nonce": NONCE, "path": []}, "integers"),
        ({"index": 0, "size": 1, "nonce": NONCE, "path": []}, "size must be 2"),
        ({"index": 2, "size": 2, "nonce": NONCE, "path": []}, "index below"),
        ({"index": -1, "size": 2, "nonce": NONCE, "path": []}, "index below"),
        ({"index": 0, "size": MAX_VERIFIED_BATCH_SIZE + 1, "nonce": NONCE, "path": []}, "size must be 2"),
        ({"index": 0, "size": 2, "path": []}, "nonce"),
        ({"index": 0, "size": 2, "nonce": NONCE.upper(), "path": []}, "nonce"),
        ({"index": 0, "size": 2, "nonce": NONCE[:-2], "path": []}, "nonce"),
        ({"index": 0, "size": 2, "nonce": 5, "path": []}, "nonce"),
        ({"index": 0, "size": 2, "nonce": NONCE, "path": "ab" * 32}, "list"),
        ({"index": 0, "size": 2, "nonce": NONCE, "path": ["ab" * 32] * 2}, "at most"),  # 2 leaves: one sibling
        ({"index": 0, "size": 4, "nonce": NONCE, "path": ["ab" * 32] * 3}, "at most"),
        ({"index": 0, "size": 2, "nonce": NONCE, "path": ["AB" * 32]}, "lowercase hex"),
        ({"index": 0, "size": 2, "nonce": NONCE, "path": ["ab" * 31]}, "lowercase hex"),
        ({"index": 0, "size": 2, "nonce": NONCE, "path": [5]}, "lowercase hex"),
    ],
)
def test_malformed_batch_objects_are_refused(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchProof.from_json(data)
