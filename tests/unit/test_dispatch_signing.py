"""The signed message's exact bytes, signatures and key ids, key publication and key files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from service.dispatch.signing import (
    DOMAIN,
    Assignment,
    KeyFileError,
    KeyRing,
    Signer,
    canonical_bytes,
    format_cost,
    is_safe_text,
    key_id_for,
    publish,
    read_key_file,
    read_public_keys,
    write_key_file,
)

EXAMPLE = Assignment(
    endpoint="my-endpoint",
    url="http://10.0.0.5:8000",
    cost=242.0,
    reqnum=12345,
    request_idx=2421,
    expires_at_ms=1764000000000,
    key_id="9f86d081884c7d65",
)
EXAMPLE_BYTES = (
    b"llm-dispatch-assignment-v1\n"
    b'{"cost":"242","endpoint":"my-endpoint","expires_at_ms":1764000000000,'
    b'"key_id":"9f86d081884c7d65","reqnum":12345,"request_idx":2421,"url":"http://10.0.0.5:8000"}'
)


def signed_by(signer: Signer, **overrides: Any) -> Assignment:
    return dataclasses.replace(EXAMPLE, key_id=signer.key_id, **overrides)


# -- canonical bytes ------------------------------------------------------------------------------------------
def test_canonical_bytes_of_the_documented_example() -> None:
    assert canonical_bytes(EXAMPLE) == EXAMPLE_BYTES


def test_canonical_json_is_sorted_compact_json_with_cost_as_a_string() -> None:
    """Any language's JSON encoder with sorted keys and no whitespace reproduces the signed bytes."""
    a = dataclasses.replace(EXAMPLE, cost=0.1, reqnum=1, request_idx=2**53)
    fields = {**dataclasses.asdict(a), "cost": format_cost(a.cost)}
    expected = DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    assert canonical_bytes(a) == expected
    assert b'"cost":"0.10000000000000001"' in expected


@pytest.mark.parametrize(
    ("cost", "text"),
    [
        (242.0, "242"),
        (0.1, "0.10000000000000001"),
        (1e300, "1.0000000000000001e+300"),
        (0.0, "0"),
        (1.5, "1.5"),
        (1e-7, "9.9999999999999995e-08"),
    ],
)
def test_format_cost_is_printf_17g(cost: float, text: str) -> None:
    assert format_cost(cost) == text


@pytest.mark.parametrize("field", ["endpoint", "url", "key_id"])
@pytest.mark.parametrize(
    "bad",
    ['http://a"b', "http://a\\b", "http://a\nb", "http://a\n", "http://\u00e4", "http://a\tb", "http://a\x7f", ""],
)
def test_unsafe_text_is_refused(field: str, bad: str) -> None:
    assert not is_safe_text(bad)
    with pytest.raises(ValueError, match=field):
        canonical_bytes(dataclasses.replace(EXAMPLE, **{field: bad}))  # type: ignore[arg-type]


def test_printable_ascii_is_safe() -> None:
    text = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')
    assert is_safe_text(text)
    assert text.encode() in canonical_bytes(dataclasses.replace(EXAMPLE, url=text))


# -- signatures and keys --------------------------------------------------------------------------------------
def test_a_signature_verifies_with_the_published_public_key() -> None:
    signer = Signer.generate()
    a = signed_by(signer)
    signature = signer.sign(a)
    assert re.fullmatch(r"[0-9a-f]{128}", signature)
    ring = KeyRing.from_hex([signer.public_key.hex()])
    assert ring.key_ids == {signer.key_id}
    assert ring.verify(a, signature)


def test_a_signature_fails_for_another_key_or_key_id() -> None:
    signer, other = Signer.generate(), Signer.generate()
    a = signed_by(signer)
    signature = signer.sign(a)
    assert not KeyRing.from_hex([other.public_key.hex()]).verify(a, signature)  # key id unknown to the ring
    both = KeyRing([signer.public_key, other.public_key])
    assert both.verify(a, signature)
    # the same bytes claimed under the other key's id: checked against the other key, and fails
    assert not both.verify(dataclasses.replace(a, key_id=other.key_id), signature)


@pytest.mark.parametrize(
    "change", [{"cost": 242.00000000000003}, {"reqnum": 12346}, {"request_idx": 1}, {"url": "http://10.0.0.6:8000"},
               {"endpoint": "other"}, {"expires_at_ms": 1764000000001}],
)  # fmt: skip
def test_any_changed_field_breaks_the_signature(change: dict[str, Any]) -> None:
    signer = Signer.generate()
    a = signed_by(signer)
    signature = signer.sign(a)
    ring = KeyRing([signer.public_key])
    assert not ring.verify(dataclasses.replace(a, **change), signature)


def test_malformed_signatures_are_false_not_errors() -> None:
    signer = Signer.generate()
    a = signed_by(signer)
    signature = signer.sign(a)
    ring = KeyRing([signer.public_key])
    assert not ring.verify(a, signature[:-2])
    assert not ring.verify(a, "zz" + signature[2:])
    assert not ring.verify(a, "")
    assert not ring.verify(dataclasses.replace(a, url='http://a"b'), signature)


def test_key_id_is_the_first_16_hex_of_sha256() -> None:
    signer = Signer.generate()
    assert re.fullmatch(r"[0-9a-f]{16}", signer.key_id)
    assert signer.key_id == key_id_for(signer.public_key) == hashlib.sha256(signer.public_key).hexdigest()[:16]
    assert key_id_for(b"\x00" * 32) != key_id_for(b"\x01" + b"\x00" * 31)


def test_signer_from_seed_is_deterministic() -> None:
    seed = "11" * 32
    a, b = Signer.from_seed_hex(seed), Signer.from_seed_hex(seed + "\n")
    assert a.public_key == b.public_key and not a.ephemeral
    assert a.sign(EXAMPLE) == b.sign(EXAMPLE)  # Ed25519 is deterministic
    assert Signer.generate().ephemeral
    with pytest.raises(KeyFileError):
        Signer.from_seed_hex("11" * 31)


def test_publish_lists_the_current_key_first_and_dedups() -> None:
    current, old1, old2 = Signer.generate(), Signer.generate(), Signer.generate()
    keys = publish(current, [old1.public_key, current.public_key, old1.public_key, old2.public_key])
    assert [(k.key_id, k.current) for k in keys] == [
        (current.key_id, True),
        (old1.key_id, False),
        (old2.key_id, False),
    ]
    assert keys[0].to_json() == {
        "key_id": current.key_id,
        "algorithm": "ed25519",
        "public_key": current.public_key.hex(),
        "current": True,
    }
    assert [k.key_id for k in publish(current)] == [current.key_id]


# -- key files ------------------------------------------------------------------------------------------------
def test_write_key_file_is_0600_with_a_public_key_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    signer = write_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Path(f"{path}.pub").read_text().strip() == signer.public_key.hex()
    loaded = read_key_file(path)
    assert (loaded.public_key, loaded.key_id) == (signer.public_key, signer.key_id)
    assert loaded.sign(EXAMPLE) == signer.sign(EXAMPLE)


def test_write_key_file_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    first = write_key_file(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_key_file(path)
    assert path.read_bytes() == before
    assert read_key_file(path).key_id == first.key_id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_read_key_file_refuses_a_file_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "signing.key"
    write_key_file(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_key_file(path)


def test_read_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        read_key_file(tmp_path / "missing.key")
    bad = tmp_path / "bad.key"
    bad.write_text("not hex\n")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="not hex"):
        read_key_file(bad)
    bad.write_text("ab" * 16)
    with pytest.raises(KeyFileError, match="32 bytes"):
        read_key_file(bad)


def test_read_public_keys_splits_on_commas_and_whitespace() -> None:
    a, b, c = (Signer.generate().public_key for _ in range(3))
    text = f" {a.hex()},{b.hex()}\n , {c.hex().upper()}  ,"
    assert read_public_keys(text) == [a, b, c]
    assert read_public_keys("") == []
    assert read_public_keys(" , ") == []


@pytest.mark.parametrize("text", ["zz" * 32, "ab" * 31, "ab" * 33, "abc"])
def test_read_public_keys_rejects_bad_hex_or_length(text: str) -> None:
    good = Signer.generate().public_key.hex()
    with pytest.raises(KeyFileError):
        read_public_keys(f"{good},{text}")


# -- assignments as received ----------------------------------------------------------------------------------
def example_mapping() -> dict[str, Any]:
    return dataclasses.asdict(EXAMPLE)


def test_from_mapping_round_trips_and_ignores_extra_fields() -> None:
    data = {**example_mapping(), "signature": "ab" * 64, "__request_id": "x", "cost": 242}
    a = Assignment.from_mapping(data)
    assert a == EXAMPLE
    assert isinstance(a.cost, float)


@pytest.mark.parametrize("field", ["cost", "endpoint", "expires_at_ms", "key_id", "reqnum", "request_idx", "url"])
def test_from_mapping_rejects_a_missing_field(field: str) -> None:
    data = example_mapping()
    del data[field]
    with pytest.raises(ValueError, match=field):
        Assignment.from_mapping(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reqnum", True),
        ("request_idx", False),
        ("expires_at_ms", 1.5),
        ("reqnum", "1"),
        ("cost", "242"),
        ("cost", True),
        ("cost", None),
        ("url", 5),
        ("endpoint", None),
        ("key_id", b"9f86d081884c7d65"),
    ],
)
def test_from_mapping_rejects_wrong_types(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        Assignment.from_mapping({**example_mapping(), field: value})


@pytest.mark.parametrize("cost", [10**400, float("inf"), float("nan")])
def test_from_mapping_rejects_a_cost_no_float_holds(cost: object) -> None:
    # the stdlib parser gives ints of any size: a ValueError (a bad_format rejection), not an OverflowError
    with pytest.raises(ValueError, match="cost"):
        Assignment.from_mapping({**example_mapping(), "cost": cost})
