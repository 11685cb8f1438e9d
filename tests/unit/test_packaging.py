"""The package runs with what pyproject.toml declares: every module imports, and the README's first command
(``serve``: both services on their embedded defaults) serves, in an interpreter that refuses every module the
declared requirements (and the default ``cpu`` extra) would not install. The test environment holds more (the
test extras), which once hid a runtime import of httpx that only a test extra provided."""

from __future__ import annotations

import http.client
import importlib
import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import service
from tests.install_closure import allowed_modules, only_these_imports, status_once_ready
from tests.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # a guard against a hang (the router loads the model), not a speed claim


def declared() -> list[str]:
    """What ``pip install -e '.[cpu]'`` (the README's set-up) installs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["cpu"]]


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_module_imports_with_only_the_declared_requirements() -> None:
    allowed = allowed_modules(declared())
    assert {"torch", "faiss", "nacl", "httpx"} <= set(allowed) and "pytest" not in allowed
    # __main__ runs the CLI when imported; cli.py, which it calls, is in the list
    modules = [m.name for m in pkgutil.walk_packages(service.__path__, "service.") if m.name != "service.__main__"]
    assert len(modules) > 50
    result = _run(only_these_imports(allowed) + f"import importlib\nfor m in {modules!r}: importlib.import_module(m)")
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_guard_refuses_what_the_requirements_leave_out() -> None:
    """The check above can fail: a module of a test extra is refused under it."""
    result = _run(only_these_imports(allowed_modules(declared())) + "import pytest")
    assert result.returncode == 1 and "not installed with the declared requirements: pytest" in result.stderr


def test_serve_answers_on_both_ports_with_only_the_declared_requirements(tmp_path: Path) -> None:
    # serve starts each service as its own interpreter: the guard goes in a sitecustomize that every one of them
    # imports at start-up (PYTHONPATH is inherited).
    (tmp_path / "sitecustomize.py").write_text(only_these_imports(allowed_modules(declared())))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    router_port, dispatcher_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--router-port", str(router_port),
           "--dispatcher-port", str(dispatcher_port)]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert status_once_ready(dispatcher_port, "/health", proc, START_TIMEOUT_S) == 200, log.read_text()[-3000:]
        assert status_once_ready(router_port, "/health", proc, START_TIMEOUT_S) == 200, log.read_text()[-3000:]
        conn = http.client.HTTPConnection("127.0.0.1", router_port, timeout=30)
        conn.request("POST", "/v1/route", body=b'{"prompt": "sort a list in python"}',
                     headers={"Content-Type": "application/json"})  # fmt: skip
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "not installed with the declared requirements" not in log.read_text()


def test_each_console_script_runs_its_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pyproject.toml``'s ``[project.scripts]`` as pip's wrapper runs them: import the function, call it with the
    script's own argv. A renamed function or a script wired to the wrong command fails here, not on a host."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    expected = {"llm-router": "service serve-router [-h]", "llm-dispatcher": "service serve-dispatcher [-h]",
                "llm-service": "{serve,serve-router,serve-dispatcher,"}  # fmt: skip
    assert set(scripts) == set(expected)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        entry = getattr(importlib.import_module(module), function)
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as exited:
            entry()
        assert exited.value.code == 0
        usage = capsys.readouterr().out
        assert usage.startswith("usage: ") and expected[name] in usage, (name, usage[:200])
