"""The benchmarks' wrk Lua scripts, run by the real wrk against a stub server (skipped where wrk is not installed)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.common import WRK_DIR, run_wrk
from tests.fakes import stub_http_server

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


@pytest.fixture
def stub() -> Iterator[tuple[str, list[bytes]]]:
    """Answers POST /ok with 200 and anything else (/moved) with 302; keeps the bodies it was sent."""
    with stub_http_server(lambda path: 200 if path == "/ok" else 302) as server:
        yield server


def test_post_json_sends_its_body_and_counts_answers_outside_2xx(stub: tuple[str, list[bytes]]) -> None:
    """wrk counts only statuses above 399 as failed: a redirect passed as served (the shared response() counts)."""
    base, bodies = stub
    body = '{"endpoint":"e","cost":1.0}'
    ok = run_wrk(f"{base}/ok", WRK_DIR / "post_json.lua", threads=1, connections=2, duration_s=1, script_args=[body])
    assert ok.requests > 0 and ok.non_2xx == 0 and ok.extra["body_bytes"] == len(body)
    assert set(bodies) == {body.encode()}
    moved = run_wrk(f"{base}/moved", WRK_DIR / "post_json.lua", threads=1, connections=2, duration_s=1,
                    script_args=[body])  # fmt: skip
    assert moved.requests > 0 and moved.non_2xx == moved.requests and moved.ok_requests == 0


def test_route_unique_sends_each_prompt_once_in_order(stub: tuple[str, list[bytes]], tmp_path: Path) -> None:
    base, bodies = stub
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f'prompt "{i}"\n' for i in range(100_000)))
    result = run_wrk(f"{base}/ok", WRK_DIR / "route_unique.lua", threads=1, connections=1, duration_s=1,
                     script_args=[str(prompts)])  # fmt: skip
    assert result.requests > 0 and result.non_2xx == 0
    assert result.extra["prompt_wraps"] == 0 and result.extra["prompts_total"] == 100_000
    numbers = [int(json.loads(body)["prompt"].split('"')[1]) for body in bodies]  # JSON-escaped on the way
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # in file order, none twice
