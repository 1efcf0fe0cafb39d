"""The HTTP server: contract shapes and errors in-process, then a live uvicorn server driven by the
official `openai` client, 200 concurrent requests, and SIGTERM while requests are in flight."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from support import assert_api_error
from fastapi.testclient import TestClient
from served_models import free_port, live_server

from qtune.api import load
from qtune.serving import ServerSettings, create_app

TEXTS = ["the cat is here", "a big red bus", "my old dog", "train"]
PAIRS = [["the cat", "a dog"], ["a bus", "the big train now"], ["cow", "cow"]]


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    return load(tiny_bert_dir, task="embedding", device="cpu")


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    return load(tiny_qwen_dir, task="embedding", device="cpu")


SETTINGS = ServerSettings(max_inputs=8, max_input_tokens=24, max_body_bytes=4096)


@pytest.fixture(scope="module")
def client(bert, qwen, clf):
    with TestClient(create_app({"bert": bert, "qwen": qwen, "clf": clf}, SETTINGS)) as c:
        yield c


def decode_base64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


# --- in-process: shapes and numbers ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "qwen"])
def test_embeddings_float_and_base64_equal_embed(client, request, name):
    embedder = request.getfixturevalue(name)
    expected = embedder.embed(TEXTS)
    floats = client.post("/v1/embeddings", json={"model": name, "input": TEXTS})
    packed = client.post("/v1/embeddings", json={"model": name, "input": TEXTS, "encoding_format": "base64"})
    assert floats.status_code == packed.status_code == 200
    body = floats.json()
    assert body["object"] == "list" and body["model"] == name
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    assert all(d["object"] == "embedding" for d in body["data"])
    as_float = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    as_base64 = np.stack([decode_base64(d["embedding"]) for d in packed.json()["data"]])
    assert as_float.shape == (4, embedder.dimension)
    np.testing.assert_allclose(as_float, expected, atol=1e-5)
    np.testing.assert_array_equal(as_base64, as_float)
    tokens = sum(len(f["input_ids"]) for f in embedder.features(TEXTS, is_query=False))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_embeddings_single_string_token_ids_query_and_dimensions(client, bert):
    one = client.post("/v1/embeddings", json={"model": "bert", "input": "my old dog"}).json()
    assert len(one["data"]) == 1
    np.testing.assert_allclose(one["data"][0]["embedding"], bert.embed(["my old dog"])[0], atol=1e-5)

    ids = [f["input_ids"] for f in bert.features(TEXTS[:2], is_query=False)]
    by_ids = client.post("/v1/embeddings", json={"model": "bert", "input": ids}).json()
    np.testing.assert_allclose([d["embedding"] for d in by_ids["data"]], bert.embed(TEXTS[:2]), atol=1e-5)
    single_ids = client.post("/v1/embeddings", json={"model": "bert", "input": ids[0]}).json()
    np.testing.assert_allclose(single_ids["data"][0]["embedding"], bert.embed(TEXTS[:1])[0], atol=1e-5)
    assert single_ids["usage"]["prompt_tokens"] == len(ids[0])

    query = client.post("/v1/embeddings", json={"model": "bert", "input": TEXTS, "input_type": "query"}).json()
    np.testing.assert_allclose([d["embedding"] for d in query["data"]], bert.embed(TEXTS, is_query=True), atol=1e-5)

    small = client.post("/v1/embeddings", json={"model": "bert", "input": TEXTS, "dimensions": 8}).json()
    vectors = np.array([d["embedding"] for d in small["data"]])
    assert vectors.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors, bert.embed(TEXTS, dimensions=8), atol=1e-5)


def test_classify_equals_predict_proba(client, clf):
    response = client.post("/v1/classify", json={"input": PAIRS})  # the only classifier: model may be omitted
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    expected = clf.predict_proba([tuple(p) for p in PAIRS])
    assert [d["index"] for d in data] == [0, 1, 2]
    np.testing.assert_allclose([d["probs"] for d in data], expected, atol=1e-5)
    assert [d["label"] for d in data] == [clf.labels[i] for i in expected.argmax(axis=1)]


def test_models_health_and_metrics(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["task"]) for m in models["data"]] == [
        ("bert", "model", "embedding"), ("qwen", "model", "embedding"), ("clf", "model", "pair-cls")]
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/embeddings", json={"model": "bert", "input": "cat"})
    client.post("/v1/embeddings", json={"model": "nope", "input": "cat"})
    text = client.get("/metrics").text
    assert re.search(r'qtune_requests_total\{endpoint="/v1/embeddings",status="200"\} [1-9]', text)
    assert re.search(r'qtune_requests_total\{endpoint="/v1/embeddings",status="404"\} [1-9]', text)
    assert re.search(r'qtune_batches_total\{model="bert"\} [1-9]', text)
    assert re.search(r'qtune_batch_size_bucket\{le="1.0",model="bert"\} [1-9]', text)
    assert 'qtune_queue_depth{model="bert"} 0.0' in text


# --- in-process: every error status ---------------------------------------------------------------

def test_400_malformed_or_empty(client):
    assert_api_error(client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "malformed JSON", code="invalid_json")
    assert_api_error(client.post("/v1/embeddings", content=b"[1, 2]"), 400, "JSON object")
    assert_api_error(client.post("/v1/embeddings", content=b""), 400, "empty")
    assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": []}), 400, "input must not be empty")
    assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": ""}), 400, "input 0 is empty")
    assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": ["a", ""]}), 400, "input 1 is empty")
    assert_api_error(client.post("/v1/classify", json={"model": "clf", "input": []}), 400, "input must not be empty")


def test_401_api_key(bert):
    with TestClient(create_app({"bert": bert}, ServerSettings(api_key="sekret"))) as c:
        assert_api_error(c.post("/v1/embeddings", json={"input": "cat"}), 401, "missing API key")
        assert_api_error(c.post("/v1/embeddings", json={"input": "cat"}, headers={"Authorization": "Bearer wrong"}),
                     401, "invalid API key")
        assert_api_error(c.get("/v1/models", headers={"Authorization": "Basic sekret"}), 401, "invalid API key")
        ok = c.post("/v1/embeddings", json={"input": "cat"}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.json()["model"] == "bert"  # the only embedder: model omitted
        assert c.get("/health").status_code == 200  # probes need no key


def test_404_unknown_model_and_missing_tasks(client):
    assert_api_error(client.post("/v1/embeddings", json={"model": "nope", "input": "cat"}), 404,
                 "'nope' is not loaded", "bert, qwen", code="model_not_found")
    assert_api_error(client.post("/v1/embeddings", json={"model": "clf", "input": "cat"}), 404,
                 "'clf' is a pair classifier, not an embedding model")
    assert_api_error(client.post("/v1/rerank", json={"query": "q", "documents": ["d"]}), 404, "no reranker loaded")
    assert_api_error(client.post("/v1/extract", json={"input": "x"}), 404, "no extractor loaded")
    assert_api_error(client.post("/v1/match", json={"query": "q"}), 404, "no knowledge base loaded")
    assert_api_error(client.get("/v2/nothing"), 404, "not found")


def test_413_body_too_large(client):
    big = {"model": "bert", "input": ["cat " * 1200]}
    assert_api_error(client.post("/v1/embeddings", json=big), 413, "4096 bytes", code="body_too_large")

    def chunked():  # no Content-Length: the actual body is measured
        for _ in range(10):
            yield b" " * 1000

    assert_api_error(client.post("/v1/embeddings", content=chunked()), 413, "4096 bytes")


def test_422_invalid_fields_and_limits(client, bert):
    assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": "cat", "encoding_format": "hex"}),
                 422, "encoding_format", code="invalid_field")
    assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": {"a": 1}}), 422, "input: expected")
    assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": ["a", 1]}), 422, "input")
    assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": "cat", "dimensions": 0}), 422,
                 "dimensions")
    assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": "cat", "dimensions": 33}), 422,
                 "between 1 and the model's 32")
    assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": ["cat"] * 9}), 422,
                 "too many inputs: 9; the limit is 8", code="too_many_inputs")
    long_text = " ".join(["cat"] * 30)
    error = assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": ["dog", long_text]}), 422,
                         code="input_too_long")
    assert error["message"] == "input 1 has 32 tokens; the limit is 24"  # 30 words + [CLS] + [SEP]
    assert_api_error(client.post("/v1/embeddings", json={"model": "bert", "input": [[1, 2, 10 ** 6]]}), 422,
                 "token id 1000000")
    assert_api_error(client.post("/v1/embeddings", json={"input": "cat"}), 422, "model is required", "bert, qwen")
    assert_api_error(client.post("/v1/classify", json={"model": "clf", "input": ["a", "b"]}), 422, "list of pairs")
    assert_api_error(client.post("/v1/classify", json={"model": "clf", "input": [["a", "b", "c"]]}), 422,
                 "input 0 has 3 texts")
    assert_api_error(client.post("/v1/classify", json={"model": "clf", "input": [["a", long_text]]}), 422,
                 "input 0 has 34 tokens; the limit is 24")  # [CLS] a [SEP] + 30 + [SEP]


def test_429_queue_full(bert):
    settings = ServerSettings(max_queue=1, max_batch_tokens=1, max_wait_ms=0)
    with TestClient(create_app({"bert": bert}, settings)) as c:
        state = c.app.state.qtune
        release = threading.Event()
        state.executor.submit(release.wait, 30)  # the model thread is busy until released
        results = []
        threads = [threading.Thread(target=lambda: results.append(c.post("/v1/embeddings", json={"input": "cat"})))
                   for _ in range(2)]
        batcher = state.models["bert"].batcher

        def wait_for(pending: int, queued: int) -> None:
            for _ in range(1000):
                if (batcher.pending, batcher.queued) == (pending, queued):
                    return
                time.sleep(0.01)
            raise AssertionError(f"pending {batcher.pending}, queued {batcher.queued}")

        threads[0].start()
        wait_for(pending=1, queued=0)  # taken by the worker, waiting for the model thread
        threads[1].start()
        wait_for(pending=2, queued=1)  # waiting in the queue, which is now full
        assert_api_error(c.post("/v1/embeddings", json={"input": "cat"}), 429, "retry later", code="queue_full")
        release.set()
        for t in threads:
            t.join(30)
        assert [r.status_code for r in results] == [200, 200]


def test_a_failing_model_call_is_a_json_500_and_the_server_keeps_serving(bert, monkeypatch):
    calls = []

    def broken(features):
        calls.append(len(features))
        if len(calls) == 1:
            raise RuntimeError("a bug in the model call")
        return real(features)

    real = bert.run_batch
    monkeypatch.setattr(bert, "run_batch", broken)
    with TestClient(create_app({"bert": bert}, ServerSettings())) as c:
        error = assert_api_error(c.post("/v1/embeddings", json={"input": "cat"}), 500, "internal server error")
        assert error["type"] == "server_error"
        assert c.post("/v1/embeddings", json={"input": "cat"}).status_code == 200  # the next call works
        text = c.get("/metrics").text
    assert re.search(r'qtune_requests_total\{endpoint="/v1/embeddings",status="500"\} 1\.0', text)
    assert calls == [1, 1]


def test_503_not_ready_and_draining(bert):
    app = create_app({"bert": bert}, ServerSettings())
    not_started = TestClient(app)  # no `with`: the lifespan (model workers) has not run
    assert_api_error(not_started.get("/health"), 503, "not ready")
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        app.state.qtune.draining = True
        assert_api_error(c.post("/v1/embeddings", json={"input": "cat"}), 503, "shutting down", code="unavailable")
        assert_api_error(c.get("/health"), 503, "shutting down")


# --- a live server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(bert, clf):
    app = create_app({"bert": bert, "clf": clf}, ServerSettings())
    with live_server(app) as (host, port):
        yield app, f"http://{host}:{port}"


def test_openai_client(live, bert):
    from openai import OpenAI

    _, url = live
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    packed = client.embeddings.create(model="bert", input=TEXTS)  # the client asks for base64
    floats = client.embeddings.create(model="bert", input=TEXTS, encoding_format="float")
    expected = bert.embed(TEXTS)
    assert packed.model == "bert" and packed.usage.prompt_tokens > 0
    np.testing.assert_allclose(np.array([d.embedding for d in packed.data]), expected, atol=1e-5)
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), expected, atol=1e-5)
    assert [d.index for d in floats.data] == [0, 1, 2, 3]
    assert [m.id for m in client.models.list()] == ["bert", "clf"]


def test_200_concurrent_requests_are_batched(live, bert):
    app, url = live
    batcher = app.state.qtune.models["bert"].batcher
    words = ["cat", "dog", "horse", "car", "bus", "train", "the", "big", "red", "old"]
    requests = [[" ".join(words[(i + k) % 10] for k in range(1 + i % 7))] * (1 + i % 3) for i in range(200)]
    calls_before = batcher.model_calls
    assert bert.padding_free and batcher.padding_free  # a packed BERT: calls sized by real tokens

    async def send_all():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
            return await asyncio.gather(*[http.post("/v1/embeddings", json={"model": "bert", "input": texts})
                                          for texts in requests])

    responses = asyncio.run(send_all())
    calls = batcher.model_calls - calls_before
    assert [r.status_code for r in responses] == [200] * 200
    for texts, response in zip(requests, responses):
        got = np.array([d["embedding"] for d in response.json()["data"]])
        np.testing.assert_allclose(got, bert.embed(texts), atol=1e-5)
    assert 0 < calls < 200


SERVER_SCRIPT = """
import sys
from qtune.api import load
from qtune.serving import ServerSettings, serve
serve({"bert": load(sys.argv[1], task="embedding", device="cpu")},
      ServerSettings(port=int(sys.argv[2]), max_wait_ms=float(sys.argv[3])))
"""


def test_sigterm_finishes_in_flight_requests(tiny_bert_dir, bert):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Requests wait up to 700 ms for company in the batcher: they are surely in flight at SIGTERM.
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, tiny_bert_dir, str(port), "700"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

        results: dict[int, httpx.Response] = {}

        def send(i: int) -> None:
            results[i] = httpx.post(url + "/v1/embeddings", json={"model": "bert", "input": TEXTS[i]}, timeout=30)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for _ in range(200):  # until all three wait in the batcher
            if 'qtune_queue_depth{model="bert"} 3.0' in httpx.get(url + "/metrics", timeout=5).text:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the requests never reached the batcher")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert proc.wait(timeout=30) == 0, proc.stdout.read().decode()
        assert sorted(results) == [0, 1, 2]
        for i, response in results.items():
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(response.json()["data"][0]["embedding"], bert.embed([TEXTS[i]])[0], atol=1e-5)
        with pytest.raises(httpx.ConnectError):
            httpx.post(url + "/v1/embeddings", json={"model": "bert", "input": "cat"}, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
