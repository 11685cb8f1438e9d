"""What a set of requirements installs, as importable modules, and a preamble that makes a child interpreter refuse
every other import: so a test can run code as it would run where only those requirements were installed, whatever
else the test environment happens to hold (test extras, tools)."""

from __future__ import annotations

import http.client
import importlib.metadata
import re
import subprocess
import sys
import time
from collections.abc import Iterable

from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_closure(requirements: Iterable[str]) -> set[str]:
    """The distributions ``requirements`` install here: each one and, recursively, what it requires (markers and
    extras evaluated)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        extras = frozenset(req.extras)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = (canonical(req.name), extras)
        if key in seen:
            continue
        seen.add(key)
        for text in importlib.metadata.requires(req.name) or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in {"", *extras}):
                dep.marker = None
                todo.append(dep)
    return {name for name, _ in seen}


def allowed_modules(requirements: Iterable[str]) -> list[str]:
    """Top-level modules importable with only ``requirements`` installed: theirs, the standard library's, the
    package's own."""
    dists = installed_closure(requirements)
    modules = {
        module
        for module, owners in importlib.metadata.packages_distributions().items()
        if any(canonical(owner) in dists for owner in owners)
    }
    return sorted(modules | set(sys.stdlib_module_names) | {"service"})


def only_these_imports(allowed: Iterable[str]) -> str:
    """Python source to run first in a child interpreter: any other top-level import fails as if not installed
    (ModuleNotFoundError, which optional imports catch)."""
    return f"""
import importlib.abc, sys
class _OnlyThese(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in {sorted(allowed)!r}:
            raise ModuleNotFoundError("not installed with the declared requirements: " + name, name=name)
sys.meta_path.insert(0, _OnlyThese())
"""


def status_once_ready(port: int, path: str, proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The first status other than 503 (loading) that ``GET path`` on ``port`` answers; None when ``proc`` exits or
    the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status != 503:
                return status
        except OSError:
            pass
        time.sleep(0.2)
    return None
