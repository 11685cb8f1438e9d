"""Operations tests: the real servers under load, signals and faults, scraped by a real Prometheus, fuzzed from
their own OpenAPI documents. Every module here is marked ``ops`` (``python -m pytest -m ops``).

Figures: each test hands its measured figures to ``record``. With ``OPS_RESULTS_DIR`` set, the session writes
them to ``$OPS_RESULTS_DIR/$OPS_RESULTS_NAME.json`` and ``.md`` (name default ``ops-cpu-<today>``)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.conftest import REPO
from tests.e2e.test_dispatcher_http import deployment  # noqa: F401  (the fixture, reused as is)

Figures = dict[str, dict[str, Any]]
Record = Callable[..., None]


@pytest.fixture(scope="session")
def ops_figures() -> Iterator[Figures]:
    figures: Figures = {}
    yield figures
    out = os.environ.get("OPS_RESULTS_DIR")
    if out and figures:
        name = os.environ.get("OPS_RESULTS_NAME") or f"ops-cpu-{datetime.date.today().isoformat()}"
        write_results(Path(out), name, figures)


@pytest.fixture
def record(ops_figures: Figures, request: pytest.FixtureRequest) -> Iterator[Record]:
    """``record(name=value, ...)``: figures of this test for the results file; its duration is added."""
    started = time.monotonic()
    figures: dict[str, Any] = {}

    def add(**values: Any) -> None:
        figures.update(values)

    yield add
    if figures:
        figures["test_duration_s"] = round(time.monotonic() - started, 1)
        ops_figures[request.node.nodeid] = figures


def write_results(out: Path, name: str, figures: Figures) -> None:
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "service"], cwd=REPO, capture_output=True, text=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "pytest", *sys.argv[1:]]),
        "commit": commit.stdout.strip() + (" (service/ modified)" if dirty.stdout.strip() else ""),
        "device": f"cpu: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores "
        f"(load average {os.getloadavg()[0]:.1f} at the end)",
        "python": platform.python_version(),
    }
    (out / f"{name}.json").write_text(json.dumps({**meta, "tests": figures}, indent=1) + "\n")
    lines = [f"# Operations tests: {name}", ""]
    lines += [f"- {key}: `{value}`" for key, value in meta.items()]
    for test, values in figures.items():
        lines += ["", f"## {test}", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in values.items()]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
