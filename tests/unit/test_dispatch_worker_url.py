"""A worker URL's one spelling: the key that binds it to one worker, what assignments carry and workers compare."""

from __future__ import annotations

import pytest

from service.dispatch.worker_url import canonical_url


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("http://10.0.0.5:8000", "http://10.0.0.5:8000"),
        ("http://10.0.0.5:8000/", "http://10.0.0.5:8000"),
        ("HTTP://W1.Example:8000", "http://w1.example:8000"),
        ("http://w1:80", "http://w1"),
        ("https://w1:443/", "https://w1"),
        ("https://w1:80", "https://w1:80"),  # not https' default
        ("http://w1:0080", "http://w1"),
        ("http://w1:08000", "http://w1:8000"),
        ("http://[0:0:0:0:0:0:0:1]:8000", "http://[::1]:8000"),
        ("http://[2001:DB8:0:0:0:0:0:1]:8000", "http://[2001:db8::1]:8000"),
        ("http://proxy/Workers/W1//", "http://proxy/Workers/W1"),  # paths are case-sensitive
        ("http://w1.example.", "http://w1.example."),  # with search domains, a trailing dot is another name
        ("http://w1.example/x/80", "http://w1.example/x/80"),
    ],
)
def test_spellings_clients_read_as_one_server_are_one_url(spelling: str, canonical: str) -> None:
    assert canonical_url(spelling) == canonical
    assert canonical_url(canonical) == canonical  # stable


@pytest.mark.parametrize(
    "url",
    ["http://127.1", "http://2130706433", "http://0x7f.0.0.1", "http://0177.0.0.1", "http://010.0.0.1",
     "http://1.2.3.4.", "http://10.0.0.256", "http://host.123", "http://host.0x1f", "http://gpu.0:8000"],
)  # fmt: skip
def test_an_ipv4_address_is_only_taken_as_a_dotted_quad(url: str) -> None:
    """Clients resolve these as IPv4 addresses (glibc's inet_aton, the WHATWG URL parser), not always alike."""
    with pytest.raises(ValueError, match="dotted quad"):
        canonical_url(url)


@pytest.mark.parametrize(
    "url",
    ["http://[::ffff:10.0.0.5]:8000", "http://[::FFFF:a00:5]", "http://[::10.0.0.5]", "http://[0::a00:5]"],
)
def test_an_ipv4_address_written_as_ipv6_is_refused(url: str) -> None:
    """[::ffff:10.0.0.5] reaches 10.0.0.5, an IPv4-only server too; Python 3.13 also prints it differently."""
    with pytest.raises(ValueError, match="dotted quad"):
        canonical_url(url)
    assert canonical_url("http://[::]:1") == "http://[::]:1" and canonical_url("http://[::1]") == "http://[::1]"


@pytest.mark.parametrize(
    "url",
    ["http://h/.", "http://h:1/./", "http://h/x/..", "http://proxy/workers/x/../w1", "http://h/a//b", "http://h/w%31",
     "http://h/%2e"],
)  # fmt: skip
def test_a_path_with_another_reading_is_refused(url: str) -> None:
    """Clients remove dot-segments before sending (httpx and curl send http://h:1/x/.. as http://h:1/), and servers
    differ on percent-escapes and empty segments: each would alias another worker's URL."""
    with pytest.raises(ValueError, match="path"):
        canonical_url(url)
    assert canonical_url("http://h/a.b/..c/.d") == "http://h/a.b/..c/.d"  # dots inside a segment are plain names


@pytest.mark.parametrize(
    "url",
    ["ftp://w1", "http://", "w1:8000", "http://w1:0", "http://w1:65536", "http://w1:x", "http://[::g]",
     "http://[::1]x:1", "http://w%31", "http://u@w1", "http://w1/?q", "http://w1/#f", "http://w 1", 'http://w"1',
     "http://w\\1", "http://w\u00e9"],
)  # fmt: skip
def test_what_is_not_a_worker_base_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="must"):
        canonical_url(url)
