"""The load generator's command line: bad input is a usage error before any process starts, not a traceback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks.loadgen import fanout
from benchmarks.loadgen.__main__ import parse_args
from benchmarks.loadgen.http1 import Http1Client

URL = "http://127.0.0.1:9/v1/route"


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2  # argparse's usage error, not an exception's exit
    return capsys.readouterr().err


def test_missing_bodies_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nonexistent.jsonl"
    err = _usage_error(["--url", URL, "--bodies", str(missing), "--concurrency", "1"], capsys)
    assert "nonexistent.jsonl" in err


def test_bodies_that_are_not_json_are_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert "not JSON" in _usage_error(["--url", URL, "--bodies", str(bad), "--rate", "5"], capsys)
    assert "not JSON" in _usage_error(["--url", URL, "--body", "notjson", "--rate", "5"], capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no bodies" in _usage_error(["--url", URL, "--bodies", str(empty), "--rate", "5"], capsys)


def test_https_needs_the_aiohttp_client(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(["--url", "https://127.0.0.1:9/x", "--body", "{}", "--concurrency", "1"], capsys)
    assert "http1 client needs http://host" in err
    assert parse_args(["--url", "https://h/x", "--body", "{}", "--concurrency", "1", "--client", "aiohttp"])
    assert "needs" in _usage_error(["--url", "127.0.0.1:9/x", "--body", "{}", "--concurrency", "1"], capsys)


def test_http1_client_keeps_the_query_string() -> None:
    client = Http1Client("http://h:1/embeddings?api-version=2", [b"{}"], 1)
    assert client._raw[0].startswith(b"POST /embeddings?api-version=2 HTTP/1.1\r\n")
    assert Http1Client("http://h:1", [b"{}"], 1)._raw[0].startswith(b"POST / HTTP/1.1\r\n")


def test_start_at_is_a_time_and_a_late_start_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--start-at" in _usage_error(["--url", URL, "--body", "{}", "--rate", "5", "--start-at", "0"], capsys)
    args = parse_args(["--url", URL, "--body", "{}", "--rate", "5", "--start-at", "1700000000.5"])
    assert fanout.start_time(args, lead_s=3.0) == 1700000000.5  # the caller's start, not now + lead
    args.start_at = None
    before = time.time()
    assert before + 3.0 <= fanout.start_time(args, lead_s=3.0) <= time.time() + 3.0
