"""Schema-driven fuzzing of the server through its own OpenAPI document (issue 16): bodies drawn from
each route's JSON Schema (hypothesis, through `from_schema` below), and the same with one field
replaced by arbitrary JSON, sent to a real uvicorn server on 127.0.0.1 over the embedded model. No
answer is a 5xx, every 4xx is a well-formed error body, and /health stays ok.

`from_schema` covers the JSON Schema the document uses (type, properties / required /
additionalProperties, enum, const, anyOf, items, min/maxItems, minimum / maximum /
exclusiveMinimum, maxLength, maxProperties, the tool-name pattern). hypothesis-jsonschema would be
the general tool, but its last release (0.23.1) fails on current hypothesis (`many.more`).

Bounded and reproducible: a fixed number of cases per route, derandomized; strings, arrays and
max_tokens are capped in the drawn schemas so that a case costs milliseconds of generation.
"""

from __future__ import annotations

import copy
import json
import math

import httpx  # noqa: E402  (test extra: missing is an install error, not a skip)
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_util import LiveServer

pytestmark = pytest.mark.serve

MODEL = "kimi-k2-instruct"
CASES = 15  # per route and kind (schema-valid, one field mutated)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages")
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def server():  # the settings of tests/test_serve_fields.py: the compile cache serves both
    from kimi_jax.runtime.default_model import load_default
    from kimi_jax.serve.app import create_app
    from kimi_jax.serve.cli import build_server, parse_args

    srv = build_server(parse_args(["--max-batch", "4", "--max-context", "512", "--no-warm-up"]), load_default())
    live = LiveServer(create_app(srv))
    yield live
    live.close()
    srv.scheduler.stop()


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values valid under `schema` (the subset of JSON Schema described in the module docstring)."""
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind is None:
        return JSON
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(low, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema, allow_nan=False,
                         allow_infinity=False) | st.integers(-(2**40) if low is None else int(math.ceil(low)) + (
                             "exclusiveMinimum" in schema and float(low).is_integer()),
                             None if schema.get("maximum") is None else int(schema["maximum"]))
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(max_size=schema.get("maxLength", 24))
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=schema.get("maxItems", 3))
    properties, required = schema.get("properties"), set(schema.get("required", ()))
    if properties is None:  # free-form: a map of string keys
        values = schema.get("additionalProperties", {})
        return st.dictionaries(st.text(max_size=8), JSON if values is True else from_schema(values),
                               max_size=schema.get("maxProperties", 3))
    optional = sorted(set(properties) - required)

    @st.composite
    def draw(draw):
        names = sorted(required) + draw(st.lists(st.sampled_from(optional), unique=True,
                                                 max_size=min(len(optional), 4))) if optional else sorted(required)
        return {name: draw(from_schema(properties[name])) for name in names}

    return draw()


def _capped(schema):
    """A copy of `schema` whose strings, arrays and objects are short, and generation tiny."""
    schema = copy.deepcopy(schema)
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if node.get("type") == "string" and "pattern" not in node:
            node["maxLength"] = 24
        if node.get("type") == "array":
            node["maxItems"] = min(node.get("maxItems", 3), 3)
        if node.get("type") == "object":
            node["maxProperties"] = min(node.get("maxProperties", 4), 4)
        todo.extend(node.values())
    props = schema["properties"]
    for name in ("max_tokens", "max_completion_tokens"):
        if name in props:
            props[name] = {"type": "integer", "minimum": 1, "maximum": 3}
    schema["required"] = sorted({*schema["required"], "max_tokens"})  # /v1/completions would make 16
    if "n" in props:
        props["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
    return schema


@pytest.fixture(scope="module")
def schemas(server):
    doc = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    return {route: _capped(doc["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"])
            for route in ROUTES}


def _check(server, route: str, body) -> None:
    r = httpx.post(server.url + route, content=json.dumps(body), headers={"content-type": "application/json"},
                   timeout=120)
    assert r.status_code < 500, (route, body, r.text[:500])
    if r.status_code >= 400:
        err = r.json()
        message = err["error"]["message"]
        assert isinstance(message, str) and message, (route, body, r.text[:500])
    assert "internal server error" not in r.text, (route, body, r.text[:500])


def test_the_document_lists_each_routes_fields(schemas):
    from kimi_jax.serve.openapi import BODIES

    for route, (schema, fields) in BODIES.items():
        assert set(schema["properties"]) == set(fields) and schema["additionalProperties"] is False, route


@pytest.mark.parametrize("route", ROUTES)
def test_fuzz_schema_valid_bodies(server, schemas, route):
    @FUZZ
    @given(body=from_schema(schemas[route]))
    def run(body):
        _check(server, route, body)

    run()
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}


@pytest.mark.parametrize("route", ROUTES)
def test_fuzz_one_field_mutated(server, schemas, route):
    @FUZZ
    @given(data=st.data())
    def run(data):
        body = data.draw(from_schema(schemas[route]))
        field = data.draw(st.sampled_from(sorted(schemas[route]["properties"])))
        body[field] = data.draw(JSON)
        _check(server, route, body)

    run()
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}

