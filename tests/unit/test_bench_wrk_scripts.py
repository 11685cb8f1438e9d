"""The benchmarks' wrk Lua scripts, run by the real wrk against a stub server (skipped where wrk is not installed)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import WRK_DIR, run_wrk

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


@pytest.fixture
def stub() -> Iterator[tuple[str, list[bytes]]]:
    """Answers POST /ok with 200 and POST /moved with 302; keeps the bodies it was sent."""
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200 if self.path == "/ok" else 302)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


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
