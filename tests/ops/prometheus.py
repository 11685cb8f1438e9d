"""A throwaway Prometheus (the Debian package's ``prometheus``): temporary config and storage, a free port."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.e2e.conftest import wait_http_ok
from tests.redis_server import free_port

START_TIMEOUT_S = 60.0


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, str], *, scrape_interval_s: float = 1.0) -> None:
        """``targets``: job name -> base URL of a service (scraped at ``/metrics``)."""
        executable = shutil.which("prometheus")
        assert executable, "prometheus is not on PATH: apt-get install prometheus (CI does)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        interval = f"{int(scrape_interval_s * 1000)}ms"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{urlsplit(url).netloc}']\n"
            for job, url in targets.items()
        )
        config.write_text(
            f"global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n"
            f"  evaluation_interval: {interval}\nscrape_configs:\n{jobs}"
        )
        argv = [
            executable, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        self._wait_ready()

    def _wait_ready(self) -> None:
        wait_http_ok(f"{self.url}/-/ready", self.process, timeout_s=START_TIMEOUT_S, what="prometheus", log=self.log,
                     poll_s=0.1)  # fmt: skip

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>``'s ``data``, asserting success."""
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expression)["result"]
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
