"""Every endpoint the server's OpenAPI document lists, sent generated bodies (hypothesis): shaped
like its request model or hostile (wrong types, huge and negative numbers, NaN, lone surrogates,
deep nesting, empty, long strings within the body limit). Never a 5xx; every 4xx in the error shape."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served_models import every_task, faq_matcher

from qtune.serving import ServerSettings, create_app

BODY_LIMIT = 16 * 1024
SETTINGS = ServerSettings(max_inputs=4, max_input_tokens=40, max_body_bytes=BODY_LIMIT, max_new_tokens=2,
                          max_top_k=3, max_request_tokens=120, max_wait_ms=0)
EXAMPLES = 60  # per endpoint

WORDS = ["cat", "the big dog", "a red bus now", "train", " ", "\u00e9t\u00e9 \U0001f600", "x" * 300]
HOSTILE = [None, True, False, 0, -1, 1, 2, 10 ** 30, -(10 ** 30), 1.5, -0.0, float("nan"), float("inf"),
           float("-inf"), "", "\ud800", "a\udfffb", "cat " * 2000, [], {}, [[]], [None], {"text": 1}]


@pytest.fixture(scope="module")
def client(tiny_bert_dir, tiny_qwen_dir, tmp_path_factory):
    models = every_task(tiny_bert_dir, tiny_qwen_dir)
    with faq_matcher(models["emb"], tmp_path_factory.mktemp("faq-fuzz"), rescorer=models["rr"]) as matcher, \
            TestClient(create_app(models, SETTINGS, matcher)) as c:
        yield c


def json_values():
    atoms = st.one_of(st.sampled_from(HOSTILE), st.sampled_from(WORDS), st.integers(), st.floats(),
                      st.text(max_size=20))
    return st.recursive(atoms, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=12)


def shaped(schema: dict, components: dict, depth: int = 0):
    """Values of the JSON schema's shape (bounds ignored: out-of-range numbers are the point)."""
    if "$ref" in schema:
        return shaped(components[schema["$ref"].rsplit("/", 1)[1]], components, depth)
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return st.one_of([shaped(s, components, depth) for s in schema[union]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "string":
        return st.sampled_from(WORDS) | st.text(max_size=40)
    if kind == "integer":
        return st.integers(-3, 400) | st.integers()
    if kind == "number":
        return st.floats(-2, 2) | st.floats()
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array" and depth < 3:
        return st.lists(shaped(schema.get("items", {}), components, depth + 1), max_size=6)
    if kind == "object" and depth < 3:
        return objects(schema, components, depth + 1)
    return json_values()


def objects(schema: dict, components: dict, depth: int = 0):
    """Objects with the schema's required fields and some optional ones, each shaped or hostile."""
    properties = schema.get("properties", {})
    required = set(schema.get("required", ()))
    field = {name: shaped(s, components, depth) | st.sampled_from(HOSTILE) for name, s in properties.items()}
    optional = sorted(set(properties) - required)
    return st.builds(lambda base, extra, noise: {**base, **extra, **noise},
                     st.fixed_dictionaries({n: field[n] for n in sorted(required)}),
                     st.fixed_dictionaries({}, optional={n: field[n] for n in optional}),
                     st.dictionaries(st.sampled_from(["user", "extra", "input", "model"]), json_values(), max_size=1))


def encoded(value) -> st.SearchStrategy[bytes]:
    """JSON text of `value`: escaped (\\ud800) or raw UTF-8, lone surrogates passed through as bytes."""
    return st.booleans().map(lambda ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode(
        "utf-8", "surrogatepass"))


def raw_bodies():
    depth = st.integers(1, 3000)
    return st.one_of(
        st.just(b""), st.just(b"   "), st.just(b"null"), st.just(b"[1, 2]"), st.just(b'"text"'),
        depth.map(lambda d: b'{"input": ' + b"[" * d + b"]" * d + b"}"),
        depth.map(lambda d: b'{"query": "q", "x": ' + b'{"a": ' * d + b"1" + b"}" * d + b"}"),
        st.integers(1, 6000).map(lambda n: b'{"input": ' + b"9" * n + b', "top_k": ' + b"9" * n + b"}"),
        st.binary(max_size=64),
        st.sampled_from([b'{"input": "\xed\xa0\x80"}', b'{"query": "\xff"}', b'{"input": "cat"', b"{NaN: 1}",
                         b'{"query": "q", "threshold": NaN}', b'{"query": "q", "top_k": 1e999}']),
        st.integers(BODY_LIMIT - 100, BODY_LIMIT + 100).map(lambda n: b'{"input": "' + b"a" * (n - 13) + b'"}'),
    )


def bodies(schema: dict, components: dict):
    return st.one_of(objects(schema, components).flatmap(encoded), json_values().flatmap(encoded), raw_bodies())


def assert_answered(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
    else:
        response.json()


def fuzz(client, path: str, strategy):
    """A hypothesis test posting `strategy`'s bodies to `path`."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=strategy)
    def check(body: bytes) -> None:
        assert_answered(client.post(path, content=body, headers={"content-type": "application/json"}))

    return check


def test_no_generated_body_gets_a_5xx_on_any_endpoint(client):
    document = client.get("/openapi.json").json()
    components = document["components"]["schemas"]
    posted = {path: ops["post"] for path, ops in document["paths"].items() if "post" in ops}
    assert set(posted) == {"/v1/embeddings", "/v1/classify", "/v1/rerank", "/v1/extract", "/v1/match",
                           "/v2/embed", "/v1/embed", "/v2/rerank"}
    for path, operation in sorted(posted.items()):
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        fuzz(client, path, bodies(schema, components))()
    for path, ops in document["paths"].items():
        if "get" in ops:
            assert client.get(path).status_code == 200
            assert_answered(client.post(path, content=b'{"input": "\\ud800"}'))  # 405, in the error shape
