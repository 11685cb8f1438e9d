"""The harness command line: checks before any system starts, and result file names."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import REPO_ROOT, ServerError, ServerProcess, find_free_port, output_stem, with_ext
from benchmarks.harness.sweep import SweepConfig, point_processes
from benchmarks.run import parse_args


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_a_dotted_machine_label_keeps_its_name_and_a_second_run_gets_run2(tmp_path: Path) -> None:
    base = f"cpu-2.5c-{dt.datetime.now(dt.UTC).date().isoformat()}"
    first = output_stem(tmp_path, "cpu-2.5c")
    assert with_ext(first, ".json").name == f"{base}.json" and with_ext(first, ".png").name == f"{base}.png"
    with_ext(first, ".json").write_text("{}")
    second = output_stem(tmp_path, "cpu-2.5c")
    assert with_ext(second, ".md").name == f"{base}-run2.md"


def test_machine_labels_that_are_not_file_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--machine", "h100.x1_a+b"]).machine == "h100.x1_a+b"
    for label in ("a/b", "../up", ".hidden", ""):
        assert "--machine" in _usage_error(["--machine", label], capsys)


def test_only_must_name_known_systems_of_the_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--only", "router, bare"]).only == "router, bare"
    assert "unknown system(s) rotuer" in _usage_error(["--only", "router,rotuer"], capsys)
    assert "keeps nothing of set embedders" in _usage_error(["--scenarios", "embedders", "--only", "bare"], capsys)


@pytest.mark.parametrize(
    "argv",
    [["--duration", "0"], ["--concurrency", "0"], ["--concurrency", "1,-4"], ["--concurrency", ""],
     ["--warmup", "-1"], ["--rate-fractions", "0.5,0"], ["--rates", "-3"], ["--client-processes", "0"],
     ["--ceiling-rounds", "-1"]],
)  # fmt: skip
def test_knobs_the_load_generator_would_reject_fail_at_once(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert argv[0] in _usage_error(argv, capsys)


def test_a_closed_loop_point_gets_no_more_client_processes_than_its_concurrency() -> None:
    cfg = SweepConfig((1, 16, 64), (0.5,), (), 15.0, 3.0, 10.0, processes=2, client="http1", seed=0)
    assert [point_processes(cfg, c) for c in cfg.concurrencies] == [1, 2, 2]
    assert point_processes(cfg, None) == 2  # open loop: the rate is split, any count works


# A benchmark's shape: a server under test in a session of its own, stopped on the way out of a with block.
SIGTERMED_BENCH = """
import sys, time
from pathlib import Path
from benchmarks.common import ServerProcess, exit_on_sigterm, running_server
exit_on_sigterm()
port = int(sys.argv[1])
server = ServerProcess([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                       f"http://127.0.0.1:{port}", Path(sys.argv[2]), health_path="/")
with running_server(server, health_timeout_s=30):
    print(server.proc.pid, flush=True)
    time.sleep(60)
"""


def test_a_sigterm_stops_the_server_under_test_too(tmp_path: Path) -> None:
    """Servers run in sessions of their own: SIGTERM (a time limit, a supervisor) reached the benchmark only, which
    died without its finally blocks, and the server outlived it (on a GPU machine, holding the GPU)."""
    argv = [sys.executable, "-c", SIGTERMED_BENCH, str(find_free_port()), str(tmp_path / "server.log")]
    with subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as bench:
        assert bench.stdout is not None
        server_pid = int(bench.stdout.readline())
        try:
            bench.send_signal(signal.SIGTERM)
            bench.send_signal(signal.SIGTERM)  # a second one, as supervisors repeat it, must not cut the stop short
            assert bench.wait(timeout=60) == 128 + signal.SIGTERM
            with pytest.raises(ProcessLookupError):
                os.kill(server_pid, 0)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server_pid, signal.SIGKILL)  # its own session: nothing else would stop it


FAILED_ROUTER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class Failed(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status": "failed", "error": "weights: no such file"}'
        self.send_response(503)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), Failed).serve_forever()
"""


def test_waiting_for_health_stops_at_a_failed_start(tmp_path: Path) -> None:
    """A router whose load failed says so on /health and stays up: waiting out the health timeout (300 s per server
    in the GPU run) burnt a scarce device call for nothing."""
    port = find_free_port()
    server = ServerProcess([sys.executable, "-c", FAILED_ROUTER, str(port)], f"http://127.0.0.1:{port}",
                           tmp_path / "server.log")  # fmt: skip
    server.start()
    try:
        with pytest.raises(ServerError, match=r"reports a failed start: .*no such file"):
            server.wait_healthy(timeout_s=120)
    finally:
        server.stop()
