"""Bad input against the live servers: schemathesis generates requests from each service's own /openapi.json
(no 5xx, answers conform to the document), then hand-made hostile bodies must each get a clear 4xx JSON error."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.case import Case
from schemathesis.schemas import BaseSchema

from tests.e2e.conftest import Server, start_server
from tests.e2e.test_dispatcher_http import ENDPOINT, Deployment, add_endpoint, cli
from tests.ops.conftest import Record

pytestmark = pytest.mark.ops

ADMIN_TOKEN = "ops-admin-token"
EXAMPLES_PER_OPERATION = 25  # per phase; modest for CI time, derandomized so a run is repeatable
MAX_BODY_BYTES = 64 * 1024
WORKER_PATHS = {"/worker_status/", "/delete_requests/"}
# Everything but positive_data_acceptance, which expects a 2xx for any schema-valid body: the services also apply
# rules a schema cannot state (model names of the loaded weights, --max-cost, never-issued request_idx values).
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
    checks.missing_required_header,
    checks.unsupported_method,
    checks.allow_header_conformance,
    checks.ignored_auth,
]
# schemathesis's statuses for refusing schema-breaking data, plus 413: such a body may be refused for its size first
# (a 10,001-item request_idxs is over --max-body-bytes before its length is judged).
REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
REJECTIONS = {"negative_data_rejection": {"expected-statuses": REFUSALS}}
cases_tried: Counter[str] = Counter()


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("router")
    server = start_server(tmp, "--admin-token", ADMIN_TOKEN, "--max-body-bytes", str(MAX_BODY_BYTES))
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Deployment]]:
    tmp = tmp_path_factory.mktemp("dispatcher")
    config, key_file = tmp / "endpoints.toml", tmp / "dispatch.key"
    cli("keygen", str(key_file))
    api_key, worker_token = add_endpoint(config, ENDPOINT)
    deployment = Deployment(tmp, config, key_file, api_key, worker_token)
    server = deployment.dispatcher("--max-body-bytes", str(MAX_BODY_BYTES), "--admin-token", ADMIN_TOKEN)
    report = {"endpoint": ENDPOINT, "id": "w0", "url": "http://10.0.0.1:8000", "state": "ready", "max_perf": 1e9}
    answer = httpx.post(f"{server.url}/worker_status/", json=report, headers=_bearer(worker_token))
    assert answer.status_code == 200, answer.text
    yield server, deployment
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def router_schema(router: Server) -> BaseSchema:
    return _schema(router, {"adminToken": ADMIN_TOKEN})


@pytest.fixture(scope="module")
def dispatcher_schema(stack: tuple[Server, Deployment]) -> BaseSchema:
    server, deployment = stack
    tokens = {"apiKey": deployment.api_key, "workerToken": deployment.worker_token, "adminToken": ADMIN_TOKEN}
    return _schema(server, tokens)


def _schema(server: Server, tokens: dict[str, str]) -> BaseSchema:
    """The live document, with a bearer token per security scheme: schemathesis sends them where the document asks
    for them, and leaves them out where its auth checks need a request without one."""
    schemes = {scheme: {"bearer": token} for scheme, token in tokens.items()}
    config = SchemathesisConfig.from_dict({"auth": {"openapi": schemes}, "checks": REJECTIONS})
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


fuzz_settings = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
router_lazy = schemathesis.pytest.from_fixture("router_schema")
dispatcher_lazy = schemathesis.pytest.from_fixture("dispatcher_schema")


@router_lazy.parametrize()
@fuzz_settings
def test_router_answers_generated_requests_as_its_openapi_says(case: Case) -> None:
    cases_tried["router"] += 1
    case.call_and_validate(checks=CHECKS, timeout=60)


@dispatcher_lazy.parametrize()
@fuzz_settings
def test_dispatcher_answers_generated_requests_as_its_openapi_says(case: Case) -> None:
    cases_tried["dispatcher"] += 1
    case.call_and_validate(checks=CHECKS, timeout=30)


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- hand-made hostile bodies ------------------------------------------------------------------------------------
JSON = "application/json"
DEEP = 10_000  # far past orjson's depth limit (1024), under --max-body-bytes
HOSTILE: list[tuple[str, bytes, str, int]] = [  # (what, body, content type, status)
    ("body over --max-body-bytes", b'{"prompt": "' + b"x" * (MAX_BODY_BYTES + 1) + b'"}', JSON, 413),
    ("arrays nested 10k deep", b"[" * DEEP + b"]" * DEEP, JSON, 400),
    ("objects nested 10k deep", b'{"a":' * DEEP + b"1" + b"}" * DEEP, JSON, 400),
    ("text/plain", b'{"prompt": "hi"}', "text/plain", 415),
    ("form encoded", b"prompt=hi", "application/x-www-form-urlencoded", 415),
    ("multipart", b"--x\r\n\r\nhi\r\n--x--\r\n", "multipart/form-data; boundary=x", 415),
    ("xml", b"<prompt>hi</prompt>", "application/xml", 415),
    ("empty body", b"", JSON, 400),
    ("not an object", b'["prompt"]', JSON, 400),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', JSON, 400),
    ("a NUL byte outside strings", b'{"prompt": "hi"}\x00', JSON, 400),
    ("truncated", b'{"prompt": "hi"', JSON, 400),
]
NUMBERS = {
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "-Infinity": b"-Infinity",
    "1e400": b"1e400",
    "-1e400": b"-1e400",
    "10**400": b"1" + b"0" * 400,
    "-(10**400)": b"-1" + b"0" * 400,
    "1e-400": b"1e-400",  # parses as 0.0: still a clear 4xx where 0 is not allowed, or a 200 where it is
}


NESTED_FIELD = b'{"a":' * 500 + b"1" + b"}" * 500  # within orjson's depth limit: the field's type is judged


def _field_bodies(template: bytes) -> list[tuple[str, bytes, str, int]]:
    values = {f"number {name}": literal for name, literal in NUMBERS.items()}
    values["a field nested 500 deep"] = NESTED_FIELD
    return [(what, template.replace(b"@", value), JSON, 400) for what, value in values.items()]


TARGETS = {  # (service, path) -> the number template: '@' is replaced by each literal
    ("router", "/v1/route"): b'{"prompt": "hi", "cost_weight": @}',
    ("router", "/admin/reload"): b'{"path": @}',
    ("dispatcher", "/route/"): b'{"endpoint": "' + ENDPOINT.encode() + b'", "cost": @}',
    ("dispatcher", "/worker_status/"): b'{"endpoint": "' + ENDPOINT.encode()
    + b'", "id": "w9", "url": "http://10.0.0.9:8000", "state": "ready", "max_perf": @}',
    ("dispatcher", "/delete_requests/"): b'{"endpoint": "' + ENDPOINT.encode() + b'", "request_idxs": [@]}',
}  # fmt: skip


# Where the field takes 0 (a cost weight, a cost); elsewhere 0 is refused (a path, a max_perf, a request_idx).
ZERO_IS_VALID = {("router", "/v1/route"), ("dispatcher", "/route/")}


@pytest.mark.parametrize(("service", "path"), list(TARGETS))
def test_hostile_bodies_get_clear_4xx_json_errors(
    service: str, path: str, request: pytest.FixtureRequest, record: Record
) -> None:
    if service == "router":
        server: Server = request.getfixturevalue("router")
        token = ADMIN_TOKEN
    else:
        server, deployment = request.getfixturevalue("stack")
        token = deployment.worker_token if path in WORKER_PATHS else deployment.api_key
    bodies = [*HOSTILE, *_field_bodies(TARGETS[service, path])]
    if path == "/admin/reload":  # there an empty body means "reload the configured file"
        bodies = [b for b in bodies if b[0] != "empty body"]
    with httpx.Client(base_url=server.url, timeout=60, headers=_bearer(token)) as http:
        for what, body, content_type, status in bodies:
            answer = http.post(path, content=body, headers={"content-type": content_type})
            if what == "number 1e-400" and (service, path) in ZERO_IS_VALID:
                assert answer.status_code == 200, (what, answer.text)  # 1e-400 reads 0.0: a valid cost weight, cost
                continue
            expected = (status, "invalid_request")
            assert (answer.status_code, answer.headers.get("content-type")) == (status, JSON), (what, answer.text)
            error = answer.json()["error"]
            assert (answer.status_code, error["code"]) == expected, (what, error)
            assert isinstance(error["message"], str) and len(error["message"]) > 10, (what, error)
        chunked = http.post(path, content=_chunks(MAX_BODY_BYTES + 1), headers={"content-type": JSON})
        assert "content-length" not in chunked.request.headers  # the streamed size check, not the header's
        assert (chunked.status_code, chunked.json()["error"]["code"]) == (413, "invalid_request")
        assert http.get("/health").status_code == 200  # still serving
    record(hostile_bodies=len(bodies) + 1, generated_router=cases_tried["router"],
           generated_dispatcher=cases_tried["dispatcher"])  # fmt: skip


def _chunks(size: int) -> Iterator[bytes]:
    yield b'{"prompt": "'
    for _ in range(0, size, 4096):
        yield b"y" * 4096
    yield b'"}'
