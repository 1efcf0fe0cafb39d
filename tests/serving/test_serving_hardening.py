"""The server under hostile or careless clients: bad bytes and numbers are a 4xx, work is bounded and
can be abandoned, the event loop never waits for tokenization, stalled uploads end, and the
metrics, redirects and OpenAPI document say only what they should."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from support import assert_api_error
from fastapi.testclient import TestClient
from served_models import (
    every_task,
    faq_matcher,
    free_port,
    live_server,
    read_response,
    request_head,
    wait_until,
)

from qtune.serving import ServerSettings, create_app

SETTINGS = ServerSettings(max_inputs=8, max_input_tokens=60, max_body_bytes=64 * 1024, max_new_tokens=2,
                          max_top_k=3, max_request_tokens=200)
JSON = {"content-type": "application/json"}
BODY_ENDPOINTS = {"/v1/embeddings": {"input": "cat"}, "/v1/classify": {"input": "cat"},
                  "/v1/rerank": {"query": "cat", "documents": ["dog"]}, "/v1/extract": {"input": "cat"},
                  "/v1/match": {"query": "cat"}}
TEXT_FIELD = {"/v1/embeddings": "input", "/v1/classify": "input", "/v1/rerank": "query", "/v1/extract": "input",
              "/v1/match": "query"}


@pytest.fixture(scope="module")
def models(tiny_bert_dir, tiny_qwen_dir):
    return every_task(tiny_bert_dir, tiny_qwen_dir)


@pytest.fixture(scope="module")
def matcher(models, tmp_path_factory):
    with faq_matcher(models["emb"], tmp_path_factory.mktemp("faq")) as m:
        yield m


@pytest.fixture(scope="module")
def client(models, matcher):
    with TestClient(create_app(models, SETTINGS, matcher)) as c:
        yield c


def assert_4xx(response) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --- 1. bytes, numbers and nesting the tokenizer or the parser cannot take --------------------------

@pytest.mark.parametrize("path", sorted(BODY_ENDPOINTS))
def test_lone_surrogates_are_a_400_on_every_endpoint(client, path):
    field = TEXT_FIELD[path]
    body = BODY_ENDPOINTS[path]
    escaped = re.sub(rf'"{field}": "[^"]*"', f'"{field}": "a\\\\ud800b"', _dumps(body)).encode()
    assert b"\\ud800" in escaped
    raw = escaped.replace(b"\\ud800", b"\xed\xa0\x80")  # the surrogate as (invalid) UTF-8 bytes
    in_list = _dumps({**body, field: ["ok", "\udfff"]} if field == "input" else {**body, "model": "\udfff"}).encode()
    for content in (escaped, raw, in_list):
        error = assert_api_error(client.post(path, content=content, headers=JSON), 400)
        assert error["code"] in ("invalid_json", "invalid_text"), error
    # the same fields are answered (not refused) with a valid astral character, written as a pair
    pair = _dumps(body).replace('"cat"', '"cat \\ud83d\\ude00"', 1).encode()
    assert client.post(path, content=pair, headers=JSON).status_code == 200


def _dumps(obj) -> str:
    import json

    return json.dumps(obj)


@pytest.mark.parametrize("path", sorted(BODY_ENDPOINTS))
def test_huge_numbers_and_deep_nesting_are_a_400(client, path):
    huge_int = b'{"input": ' + b"7" * 5000 + b', "top_k": ' + b"9" * 5000 + b"}"
    deep = b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    nested = b'{"user": ' + b'{"a": ' * 200 + b"1" + b"}" * 200 + b"}"  # below Python's recursion limit
    for content, phrase in ((huge_int, "number"), (deep, "nested"), (nested, "nested")):
        error = assert_api_error(client.post(path, content=content, headers=JSON), 400, code="invalid_json")
        assert phrase in error["message"], error["message"]


# --- 2. /v1/match: bounded, queued, strict -----------------------------------------------------------

def test_match_top_k_is_bounded_and_its_fields_are_strict(client, matcher):
    ok = client.post("/v1/match", json={"query": "the cat", "top_k": 3, "threshold": 0.5})
    assert ok.status_code == 200 and len(ok.json()["candidates"]) == 3
    assert_api_error(client.post("/v1/match", json={"query": "the cat", "top_k": 10 ** 9}), 422,
                     "top_k must be at least 1 and at most 3, got 1000000000", code="invalid_top_k", param="top_k")
    for top_k in ("5", True, 0, -1, 2.0):
        assert_api_error(client.post("/v1/match", json={"query": "the cat", "top_k": top_k}), 422, "top_k",
                         param="top_k")
    for threshold in ("0.5", True, [0.5]):
        assert_api_error(client.post("/v1/match", json={"query": "the cat", "threshold": threshold}), 422,
                         "threshold", param="threshold")
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        body = b'{"query": "the cat", "threshold": ' + literal + b"}"
        assert_api_error(client.post("/v1/match", content=body, headers=JSON), 422, "threshold", param="threshold")
    assert_api_error(client.post("/v1/match", json={"query": 5}), 422, "query", param="query")


def test_every_request_model_refuses_booleans_and_strings_for_numbers(client):
    post = client.post
    for top_n in (True, "2"):
        assert_api_error(post("/v1/rerank", json={"query": "q", "documents": ["d"], "top_n": top_n}), 422,
                         param="top_n")
    assert_api_error(post("/v1/rerank", json={"query": "q", "documents": ["d"], "return_documents": 1}), 422,
                     param="return_documents")
    for dimensions in (True, "8"):
        assert_api_error(post("/v1/embeddings", json={"input": "cat", "dimensions": dimensions}), 422,
                         param="dimensions")
    for max_new_tokens in (True, "2"):
        assert_api_error(post("/v1/extract", json={"input": "cat", "max_new_tokens": max_new_tokens}), 422,
                         param="max_new_tokens")
    assert_api_error(post("/v1/embeddings", json={"input": [True, 1]}), 422, param="input")


def test_match_waits_in_the_queue_and_a_full_queue_is_a_429(models, matcher):
    with TestClient(create_app(models, ServerSettings(max_queue=1), matcher)) as c:
        state = c.app.state.qtune
        release = threading.Event()
        state.executor.submit(release.wait, 30)  # the model thread is busy until released
        results = []
        thread = threading.Thread(target=lambda: results.append(c.post("/v1/match", json={"query": "the cat"})))
        thread.start()
        wait_until(lambda: state.match_queue.pending == 1, message="the match to wait for the model thread")
        assert 'qtune_queue_depth{model="/v1/match"} 1.0' in c.get("/metrics").text
        assert_api_error(c.post("/v1/match", json={"query": "the cat"}), 429, "retry later", code="queue_full")
        release.set()
        thread.join(30)
        assert [r.status_code for r in results] == [200]


# --- 3. the event loop never waits for parsing or tokenization ---------------------------------------

def test_health_answers_while_a_request_is_tokenized(models, monkeypatch):
    embedder = models["emb"]
    real, started = embedder.features, threading.Event()

    def slow_features(*args, **kwargs):  # a tokenizer busy for 1.5 s (a 7 MB body)
        started.set()
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedder, "features", slow_features)
    with TestClient(create_app({"emb": embedder}, ServerSettings())) as c:
        results = []
        thread = threading.Thread(target=lambda: results.append(c.post("/v1/embeddings", json={"input": "cat"})))
        thread.start()
        assert started.wait(10)
        began = time.monotonic()
        assert c.get("/health").status_code == 200
        waited = time.monotonic() - began
        thread.join(30)
    assert results[0].status_code == 200
    assert waited < 0.5, f"/health waited {waited:.2f} s for tokenization"


# --- 4. per-request work is capped, abandoned work is dropped -----------------------------------------

def test_tokens_per_request_are_capped(client):
    words = " ".join(["cat"] * 48)  # 50 tokens each: within the per-input limit of 60
    ok = client.post("/v1/embeddings", json={"input": [words] * 4})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 200
    assert_api_error(client.post("/v1/embeddings", json={"input": [words] * 5}), 422,
                     "inputs hold 250 tokens in all; the limit is 200 per request", code="too_many_tokens", param="input")
    assert_api_error(client.post("/v1/classify", json={"model": "texts", "input": [words] * 5}), 422,
                     "the limit is 200 per request", code="too_many_tokens")
    assert_api_error(client.post("/v1/classify", json={"model": "pairs", "input": [[words, "dog"]] * 5}), 422,
                     "the limit is 200 per request", code="too_many_tokens")
    assert_api_error(client.post("/v1/rerank", json={"query": "cat", "documents": [words] * 5}), 422,
                     "the limit is 200 per request", code="too_many_tokens", param="documents")
    prompt_words = " ".join(["cat"] * 20)  # with the extraction prompt: 47 tokens each
    assert_api_error(client.post("/v1/extract", json={"input": [prompt_words] * 5}), 422,
                     "the limit is 200 per request", code="too_many_tokens")


def test_a_client_that_hangs_up_has_its_queued_rows_dropped(models, monkeypatch):
    embedder = models["emb"]
    real, calls = embedder.run_batch, []

    def slow_run_batch(features):  # each model call takes 0.2 s
        calls.append(len(features))
        time.sleep(0.2)
        return real(features)

    monkeypatch.setattr(embedder, "run_batch", slow_run_batch)
    # 3 tokens per row, 3 tokens per call: the 40 rows are 40 model calls (8 s) when nobody hangs up
    app = create_app({"emb": embedder}, ServerSettings(max_batch_tokens=3, max_wait_ms=0, max_inputs=64))
    with live_server(app) as (host, port):
        body = _dumps({"input": ["cat"] * 40}).encode()
        with socket.create_connection((host, port)) as sock:
            sock.sendall(request_head("/v1/embeddings", len(body)) + body)
            wait_until(lambda: len(calls) >= 2, message="the first model calls")
        began = time.monotonic()
        answer = httpx.post(f"http://{host}:{port}/v1/embeddings", json={"input": "dog"}, timeout=30)
        waited = time.monotonic() - began
        assert answer.status_code == 200
        time.sleep(0.5)
        metrics = httpx.get(f"http://{host}:{port}/metrics").text
    assert len(calls) < 10, f"{len(calls)} model calls: the abandoned rows were computed"
    assert waited < 2, f"the next request waited {waited:.2f} s"
    assert re.search(r'qtune_requests_total\{endpoint="/v1/embeddings",status="499"\} 1\.0', metrics)


# --- 6. stalled uploads: 408, and SIGTERM does not wait for them forever ------------------------------

def test_a_stalled_body_is_a_408(models):
    app = create_app({"emb": models["emb"]}, ServerSettings(body_timeout_s=0.5))
    with live_server(app) as (host, port), socket.create_connection((host, port)) as sock:
        sock.sendall(request_head("/v1/embeddings", 100) + b'{"input": ')  # and then nothing
        began = time.monotonic()
        status, body = read_response(sock)
        waited = time.monotonic() - began
    assert status == 408, body
    error = httpx.Response(408, content=body).json()["error"]
    assert error["code"] == "body_timeout" and "0.5 s" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert 0.4 < waited < 5


STALLED_SERVER = """
import sys
from qtune.api import load
from qtune.serving import ServerSettings, serve
serve({"bert": load(sys.argv[1], task="embedding", device="cpu")},
      ServerSettings(port=int(sys.argv[2]), shutdown_timeout_s=1.0, body_timeout_s=600))
"""


def test_sigterm_exits_after_the_shutdown_timeout_with_a_stalled_upload(tiny_bert_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", STALLED_SERVER, tiny_bert_dir, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        wait_until(lambda: _healthy(port, proc), timeout=60, message="the server to start")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request_head("/v1/embeddings", 100) + b'{"input": ')  # stalls
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            began = time.monotonic()
            code = proc.wait(timeout=20)
            took = time.monotonic() - began
        assert code == 0, proc.stdout.read().decode()
        assert took < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _healthy(port: int, proc) -> bool:
    assert proc.poll() is None, proc.stdout.read().decode()
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


# --- 7. a client gone mid-body is a 499, not a logged 500 ---------------------------------------------

def test_a_client_gone_mid_body_is_counted_499_without_a_traceback(models, caplog):
    app = create_app({"emb": models["emb"]}, ServerSettings())
    with caplog.at_level(logging.INFO), live_server(app) as (host, port):
        with socket.create_connection((host, port)) as sock:
            sock.sendall(request_head("/v1/embeddings", 1000) + b'{"input": "ca')
            time.sleep(0.2)
        wait_until(lambda: '"/v1/embeddings",status=' in httpx.get(f"http://{host}:{port}/metrics").text,
                   message="the request to be counted")
        metrics = httpx.get(f"http://{host}:{port}/metrics").text
    assert re.search(r'qtune_requests_total\{endpoint="/v1/embeddings",status="499"\} 1\.0', metrics), metrics
    assert 'status="500"' not in metrics
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


# --- 8. no redirects to wherever the Host header points ---------------------------------------------

def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_host_header(client):
    for path in ("/v1/embeddings/", "/v1/match/", "/health/"):
        response = client.request("POST" if path.startswith("/v1") else "GET", path, json={"input": "cat"},
                                  headers={"Host": "evil.example"}, follow_redirects=False)
        assert "location" not in response.headers
        assert_api_error(response, 404, "not found")


# --- 9. /metrics needs the key when there is one ------------------------------------------------------

def test_metrics_need_the_api_key_unless_made_public(models):
    emb = {"emb": models["emb"]}
    with TestClient(create_app(emb, ServerSettings(api_key="sekret"))) as c:
        assert_api_error(c.get("/metrics"), 401, "missing API key", code="invalid_api_key")
        assert_api_error(c.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401, "invalid API key")
        assert "qtune_requests_total" in c.get("/metrics", headers={"Authorization": "Bearer sekret"}).text
        assert c.get("/health").status_code == 200
    with TestClient(create_app(emb, ServerSettings(api_key="sekret", metrics_public=True))) as c:
        assert c.get("/metrics").status_code == 200
        assert_api_error(c.post("/v1/embeddings", json={"input": "cat"}), 401)


# --- 10. the OpenAPI document ------------------------------------------------------------------------

def test_openapi_describes_every_endpoint_and_its_request_body(client):
    from qtune.serving.match import MatchRequest
    from qtune.tasks.embedding.serve import CohereEmbedRequest, EmbeddingRequest
    from qtune.tasks.extraction.serve import ExtractRequest
    from qtune.tasks.requests import ClassifyRequest
    from qtune.tasks.reranker.serve import CohereRerankRequest, RerankRequest

    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert set(paths) == {"/v1/embeddings", "/v1/classify", "/v1/rerank", "/v1/extract", "/v1/match",
                          "/v2/embed", "/v1/embed", "/v2/rerank", "/v1/models", "/health", "/metrics"}
    schemas = document["components"]["schemas"]
    expected = {"/v1/embeddings": EmbeddingRequest, "/v1/classify": ClassifyRequest, "/v1/rerank": RerankRequest,
                "/v1/extract": ExtractRequest, "/v1/match": MatchRequest, "/v2/embed": CohereEmbedRequest,
                "/v1/embed": CohereEmbedRequest, "/v2/rerank": CohereRerankRequest}
    for path, model in expected.items():
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is True
        ref = body["content"]["application/json"]["schema"]["$ref"]
        name = ref.rsplit("/", 1)[1]
        assert set(schemas[name]["properties"]) == set(model.model_fields), path
    assert "RerankDocument" in schemas  # a nested model resolves in the document
    for path in ("/v1/models", "/health", "/metrics"):
        assert "get" in paths[path]


# --- tokenizers are used by one thread at a time ---------------------------------------------------

def test_a_tokenizer_is_never_used_by_two_threads_at_once(models, matcher, monkeypatch):
    """A fast tokenizer sets its truncation on shared state before each call: request tokenization
    (prep threads) and the FAQ matcher's (model thread) running together got each other's cut."""
    tokenizer = models["emb"].loaded.tokenizer
    real, lock = tokenizer._encode_plus, threading.Lock()
    inside, most = [0], [0]

    def watched(*args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.01)  # widen the window a real race needs
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(tokenizer, "_encode_plus", watched)
    with TestClient(create_app({"emb": models["emb"]}, ServerSettings(), matcher)) as c:
        def embed():
            for _ in range(6):
                assert c.post("/v1/embeddings", json={"input": ["the cat", "a dog"]}).status_code == 200

        def match():
            for _ in range(6):
                assert c.post("/v1/match", json={"query": "the cat"}).status_code == 200

        threads = [threading.Thread(target=f) for f in (embed, embed, match, match)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert most[0] == 1, f"{most[0]} threads were inside the tokenizer at once"
