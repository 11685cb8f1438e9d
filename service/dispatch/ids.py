"""Per-call ids (``__request_id``)."""

from __future__ import annotations

import os

UUID_BYTES = 16


def new_request_id() -> str:
    """A random RFC 4122 version-4 UUID string; a third of ``str(uuid.uuid4())``'s cost on the hot path."""
    raw = bytearray(os.urandom(UUID_BYTES))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
