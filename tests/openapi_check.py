"""Live answers against a service's own OpenAPI document: the body validates against the documented schema for its
status, every key it carries is documented and required (but those a service sends only sometimes), and every
header the document calls required is there and valid."""

from __future__ import annotations

from typing import Any, Protocol

from jsonschema import Draft202012Validator

# keys an answer carries only where there is one: an error's reason, the dispatcher's /health error (store down)
SOMETIMES_SENT = frozenset({"reason", "error", "batch"})  # batch: only on an assignment signed with others


class Answer(Protocol):
    """httpx's and Starlette's TestClient's responses alike."""

    status_code: int

    @property
    def headers(self) -> Any: ...

    def json(self) -> Any: ...


def assert_answers_as_documented(spec: dict[str, Any], path: str, method: str, answer: Answer) -> None:
    responses = spec["paths"][path][method]["responses"]
    status = str(answer.status_code)
    assert status in responses, f"{method.upper()} {path} answered an undocumented {status}"
    response = _resolve(spec, responses[status])
    schema = response["content"]["application/json"]["schema"]
    body = answer.json()
    _validator(spec, schema).validate(body)
    _assert_keys_documented(spec, schema, body, f"{path} {status}")
    for name, header in response.get("headers", {}).items():
        value = answer.headers.get(name)
        if header.get("required"):
            assert value is not None, f"{path} {status} lacks its documented {name} header"
        if value is not None:  # a header's schema describes its value as read (Retry-After: an integer)
            typed = int(value) if header["schema"].get("type") == "integer" else value
            _validator(spec, header["schema"]).validate(typed)


def _validator(spec: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    # the document's components beside the schema, so that "#/components/..." references resolve
    return Draft202012Validator({**schema, "components": spec["components"]})


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _assert_keys_documented(spec: dict[str, Any], schema: dict[str, Any], value: Any, where: str) -> None:
    schema = _resolve(spec, schema)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            matching = [s for s in schema[key] if _validator(spec, s).is_valid(value)]
            assert matching, f"{where}: no {key} branch matches"
            _assert_keys_documented(spec, matching[0], value, where)
    if isinstance(value, list) and "items" in schema:
        for item in value:
            _assert_keys_documented(spec, schema["items"], item, f"{where}[]")
    if not isinstance(value, dict) or "oneOf" in schema or "anyOf" in schema:
        return
    if isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            _assert_keys_documented(spec, schema["additionalProperties"], item, f"{where}.{key}")
        return
    properties = schema.get("properties", {})
    assert set(value) <= set(properties), f"{where}: undocumented keys {sorted(set(value) - set(properties))}"
    not_required = set(value) - set(schema.get("required", [])) - SOMETIMES_SENT
    assert not not_required, f"{where}: always sent but not required: {sorted(not_required)}"
    for key, item in value.items():
        _assert_keys_documented(spec, properties[key], item, f"{where}.{key}")
