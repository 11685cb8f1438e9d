"""A worker's base URL: what it may be, and its one spelling.

The dispatcher sends clients to the URL a worker reports, binds it to that one worker (another endpoint's worker
may not report it: ``url_taken``), and signs it into every assignment, which the worker checks against its own.
Spellings that every HTTP client reads as the same server must therefore be one URL, or a second tenant could bind
``HTTP://Host:80`` to another tenant's ``http://host`` worker. ``canonical_url`` lowercases the scheme and host,
drops the scheme's default port and leading zeros of a port, and writes an IPv6 address in RFC 5952's compressed
form. An IPv4 address must be a dotted quad of decimals: the other forms clients accept (``127.1``,
``2130706433``, ``0x7f.0.0.1``, ``[::ffff:10.0.0.5]``, any host whose last label is a number) are refused, since
some read ``010.0.0.1`` as 8.0.0.1 and others as 10.0.0.1. The path is kept as it is, less trailing slashes (paths
are case-sensitive), so it may not have another reading: no ``.``, ``..`` or empty segments, no percent-escapes.
Names that DNS makes one server (``localhost`` and ``127.0.0.1``) stay distinct: only the resolver knows those.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from service.dispatch.signing import is_safe_text

DEFAULT_PORTS = {"http": 80, "https": 443}
# host[:port]: a name (no '%': a percent-encoded name is one that clients decode differently), an IPv4 address,
# or an IPv6 address in brackets: what HTTP clients can connect to (urlsplit also takes
# "http://[::1]x:1", which httpx then refuses, failing every client sent there)
_AUTHORITY = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._~!$&'()*+,;=-]+))(?::(?P<port>\d{1,5}))?"
)
_NUMBER = re.compile(r"\d+|0[xX][0-9A-Fa-f]*")  # a label that makes a host an IPv4 address (WHATWG "ends in a number")
# ::a.b.c.d, deprecated (RFC 4291) but read as IPv4 by some stacks; :: and ::1 are not IPv4 addresses
_IPV4_COMPATIBLE = re.compile(r"(0000:){6}(?!0000:0000|0000:0001)[0-9a-f]{4}:[0-9a-f]{4}")


def canonical_url(text: str) -> str:
    """The one spelling of a worker's base URL; ``ValueError`` for one that is not an http(s) base URL with a host
    that clients can connect to (its message says what the URL "must" be)."""
    url = text.rstrip("/")
    # signed text (is_safe_text: printable ASCII without quotes or backslashes), without spaces either
    if not is_safe_text(url) or any(c in url for c in " @?#"):
        # every client is sent this URL (credentials would leak to them) and appends its path to it (after a query
        # or fragment, the path lands in those instead)
        raise ValueError(
            "must be a base URL of printable ASCII without spaces, quotes, backslashes, credentials, query or "
            "fragment ('@', '?', '#')"
        )
    try:
        parts = urlsplit(url)
    except ValueError:  # a bracketed host that is no IP address
        raise ValueError("must have a valid host (a name, an IPv4 address or an IPv6 address in brackets)") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError("must be an http or https URL")
    match = _AUTHORITY.fullmatch(parts.netloc)
    if match is None:
        raise ValueError("must have a host (a name, an IPv4 address or an IPv6 address in brackets) and a port")
    host = _canonical_host(match.group("ipv6"), match.group("name"))
    port_text = match.group("port")
    port = DEFAULT_PORTS[scheme] if port_text is None else int(port_text)
    if not 0 < port <= 65535:
        raise ValueError("must have a port in 1..65535")
    authority = host if port == DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return f"{scheme}://{authority}{_checked_path(parts.path)}"


def _checked_path(path: str) -> str:
    """A base path is kept as given, so it must have one reading: clients remove ``.`` and ``..`` segments before
    sending (``/x/..`` is ``/``), and servers and proxies differ on percent-escapes and empty segments."""
    if "%" in path:
        raise ValueError("must have a path without percent-escapes ('%')")
    segments = path.split("/")[1:]
    if any(segment in ("", ".", "..") for segment in segments):
        raise ValueError("must have a path without empty, '.' or '..' segments")
    return path


def _canonical_host(ipv6: str | None, name: str | None) -> str:
    if ipv6 is not None:
        try:
            address = ipaddress.IPv6Address(ipv6)
        except ValueError:
            raise ValueError(f"must have a valid IPv6 address in brackets, not {ipv6!r}") from None
        if address.ipv4_mapped is not None or _IPV4_COMPATIBLE.fullmatch(address.exploded):
            # [::ffff:10.0.0.5] reaches 10.0.0.5 (an IPv4-only server too): the IPv4 spelling is the one
            raise ValueError(f"must write an IPv4 address as a dotted quad, not as the IPv6 address {ipv6!r}")
        return f"[{address.compressed}]"  # RFC 5952's form: lowercase, the longest run of zero groups as '::'
    assert name is not None
    labels = name.split(".")
    last = labels[-1] or (labels[-2] if len(labels) > 1 else "")
    if _NUMBER.fullmatch(last):
        # the WHATWG URL rule: a host ending in a number is an IPv4 address, which clients read in inet_aton's
        # forms too (127.1, 2130706433, 0x7f.0.0.1; 010.0.0.1 is 8.0.0.1 to some and 10.0.0.1 to others): only the
        # dotted quad is one spelling
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            message = f"must write an IPv4 address as a dotted quad of decimals (10.0.0.5), not {name!r}"
            raise ValueError(message) from None
    return name.lower()
