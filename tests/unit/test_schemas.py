from __future__ import annotations

import math
import re

import numpy as np
import orjson
import pytest

from service.errors import InvalidRequest, PayloadTooLarge
from service.router.openapi import _PROMPT
from service.router.schemas import WHITESPACE, parse_route_request

LIMIT = 100


def parse(payload: object) -> object:
    return parse_route_request(orjson.dumps(payload), max_prompt_chars=LIMIT, dim=4)


def test_prompt_and_options() -> None:
    req = parse({"prompt": "hello", "cost_weight": 0.7, "available_models": ["a", "b", "a"], "extra": 1})
    assert req.prompt == "hello"
    assert req.cost_weight == 0.7
    assert req.available_models == ["a", "b"]  # de-duplicated, order kept
    assert req.embedding is None


@pytest.mark.parametrize(
    ("prompt", "accepted"),
    [
        ("a", True),
        ("\x1ca", True),
        ("\u200b", True),  # zero-width: no whitespace anywhere; embedded as sentence-transformers embeds it
        ("\x1c", False),  # whitespace to str.strip (so the engine embedded ""), not to ECMA-262's \\s
        ("\x85", False),
        ("\ufeff\x1c", False),  # the other way round for each: blank to neither alone, to both together
        ("\u3000\x1f", False),
    ],
)
def test_the_openapi_prompt_pattern_and_the_parser_agree(prompt: str, accepted: bool) -> None:
    # the pattern in ECMA-262's dialect, its \\s spelled out (Python's re \\s is str.isspace's set)
    pattern = _PROMPT["pattern"].replace("\\s", "".join(f"\\u{ord(c):04x}" for c in WHITESPACE))
    assert (re.search(pattern, prompt) is not None) is accepted
    if accepted:
        assert parse({"prompt": prompt}).prompt == prompt
    else:
        with pytest.raises(InvalidRequest, match="must not be empty or only whitespace"):
            parse({"prompt": prompt})


def test_beside_an_embedding_any_prompt_text_is_fine_and_unused() -> None:
    """With both, the embedding is used (README): an empty prompt beside it was refused."""
    request = parse({"prompt": "", "embedding": [0, 0, 0, 2]})
    np.testing.assert_array_equal(request.embedding, [0, 0, 0, 1])


def test_a_negative_zero_cost_weight_is_zero() -> None:
    assert str(parse({"prompt": "x", "cost_weight": -0.0}).cost_weight) == "0.0"  # echoed in the answer


def test_integer_cost_weight_is_accepted() -> None:
    assert parse({"prompt": "x", "cost_weight": 1}).cost_weight == 1.0


def test_largest_cost_weight_is_accepted() -> None:
    assert parse({"prompt": "x", "cost_weight": 1e9}).cost_weight == 1e9


def test_embedding_is_normalised() -> None:
    req = parse({"embedding": [3, 0, 0, 4]})
    assert req.prompt is None
    np.testing.assert_allclose(req.embedding, [0.6, 0, 0, 0.8], rtol=1e-6)
    # exact zeros and ones are numbers, not JSON booleans
    np.testing.assert_array_equal(parse({"embedding": [0.0, 1.0, 0, 0]}).embedding, [0, 1, 0, 0])
    np.testing.assert_array_equal(parse({"embedding": [0, 0, 0, 1]}).embedding, [0, 0, 0, 1])
    # a body with a 't' or an 'f' somewhere (here the prompt's key) has its zeros and ones type-checked: still numbers
    np.testing.assert_array_equal(parse({"prompt": "x", "embedding": [0.0, 1.0, 0, 0]}).embedding, [0, 1, 0, 0])
    huge = parse({"embedding": [3e307, 0, 0, 4e307]})  # squaring would overflow
    np.testing.assert_allclose(huge.embedding, [0.6, 0, 0, 0.8], rtol=1e-6)
    for scale in (3e-161, 1e-161, 2.3e-162, 1e-300, 5e-324):  # the squares sum to a subnormal number, or to 0
        tiny = parse({"embedding": [3 * scale, 0, 0, 4 * scale]})
        np.testing.assert_allclose(tiny.embedding, [0.6, 0, 0, 0.8], rtol=1e-6)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({}, "give a 'prompt'"),
        ({"prompt": None}, "give a 'prompt'"),
        ([1, 2], "JSON object"),
        ("just a string", "JSON object"),
        ({"prompt": 5}, "'prompt' must be a string, got number"),
        ({"prompt": ["a"]}, "got array"),
        ({"prompt": ""}, "must not be empty"),
        ({"prompt": "   \n\t "}, "must not be empty"),
        ({"prompt": "\u3000\ufeff\u2028"}, "must not be empty"),  # whitespace to the OpenAPI pattern's \\S too
        ({"prompt": "", "embedding": "x"}, "'embedding' must be an array"),
        ({"embedding": "0.1,0.2"}, "'embedding' must be an array"),
        ({"embedding": [0.1, 0.2]}, "exactly 4 numbers, got 2"),
        ({"embedding": [0.1, 0.2, "x", 0.3]}, "only numbers"),
        ({"embedding": [0.1, 0.2, True, 0.3]}, "only numbers"),
        ({"embedding": [0.5, False, 0.2, 0.3]}, "only numbers"),
        ({"embedding": [0.1, None, 0.2, 0.3]}, "only numbers"),  # np.asarray alone would make it NaN
        ({"embedding": [0.1, "1.5", 0.2, 0.3]}, "only numbers"),  # np.asarray alone would read 1.5
        ({"embedding": [0.1, [0.2], 0.2, 0.3]}, "only numbers"),
        ({"embedding": [0.1, {"x": 1}, 0.2, 0.3]}, "only numbers"),
        ({"embedding": [0, 0, 0, 0]}, "all zeros"),
        ({"prompt": "x", "available_models": "gpt"}, "'available_models' must be an array"),
        ({"prompt": "x", "available_models": []}, "must not be empty"),
        ({"prompt": "x", "available_models": ["a", ""]}, "empty names"),
        ({"prompt": "x", "available_models": ["a", 3]}, "only strings"),
        ({"prompt": "x", "cost_weight": "high"}, "'cost_weight' must be a number, got string"),
        ({"prompt": "x", "cost_weight": True}, "got boolean"),
        ({"prompt": "x", "cost_weight": -0.1}, "from 0 to 1e+09"),
        ({"prompt": "x", "cost_weight": 1e307}, "from 0 to 1e+09"),  # lambda * cost would overflow to inf (null)
    ],
)
def test_invalid_requests(payload: object, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_route_request(orjson.dumps(payload), max_prompt_chars=LIMIT, dim=4)
    assert fragment in info.value.message
    assert info.value.status == 400
    assert info.value.code == "invalid_request"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_are_rejected(literal: bytes) -> None:
    # orjson refuses these non-standard literals: the body is not JSON
    with pytest.raises(InvalidRequest):
        parse_route_request(b'{"prompt": "x", "cost_weight": ' + literal + b"}", max_prompt_chars=LIMIT)
    with pytest.raises(InvalidRequest):
        parse_route_request(b'{"embedding": [' + literal + b", 0, 0, 1]}", max_prompt_chars=LIMIT, dim=4)


def test_nan_after_parsing_is_rejected() -> None:
    # guards the check itself, independent of the JSON parser's strictness
    from service.router.schemas import _cost_weight, _embedding

    with pytest.raises(InvalidRequest):
        _cost_weight(math.nan)
    with pytest.raises(InvalidRequest):
        _embedding([math.inf, 0.0, 0.0, 1.0], 4)
    with pytest.raises(InvalidRequest, match="finite"):
        _embedding([math.nan, 0.5, 0.5, 0.5], 4)


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"prompt": "x",}', b"\xff\xfe"])
def test_malformed_json(body: bytes) -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_route_request(body, max_prompt_chars=LIMIT)


def test_prompt_over_the_limit_is_413() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        parse({"prompt": "x" * (LIMIT + 1)})
    assert info.value.status == 413
    assert info.value.code == "invalid_request"
    assert parse({"prompt": "x" * LIMIT}).prompt == "x" * LIMIT
