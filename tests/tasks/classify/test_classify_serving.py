"""`POST /v1/classify` with a pair classifier and text classifiers served side by side: texts go
to a text classifier, pairs to the pair classifier, with the probabilities of `predict_proba`,
micro-batched across requests; every mistake gets the error shape."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

import qtune
from classify_helpers import LABELS
from support import assert_api_error
from qtune.serving import ServerSettings, create_app

TEXTS = ["a cow is here", "my old red bus", "plane", "the big green tram is there now"]
PAIRS = [["the cat", "a dog"], ["a bus", "the big train now"]]
SETTINGS = ServerSettings(max_inputs=4, max_input_tokens=12, max_body_bytes=4096)


@pytest.fixture(scope="module")
def texts_bert(tiny_bert_dir):
    return qtune.load(tiny_bert_dir, task="classify", labels=LABELS, device="cpu")  # three labels, random head


@pytest.fixture(scope="module")
def texts_qwen(tiny_qwen_dir):
    return qtune.load(tiny_qwen_dir, task="classify", labels=["no", "yes"], device="cpu")  # packed batches


@pytest.fixture(scope="module")
def client(clf, texts_bert):
    with TestClient(create_app({"pairs": clf, "texts": texts_bert}, SETTINGS)) as c:
        yield c


def _probs(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["probs"] for d in response.json()["data"]])


def test_texts_without_a_model_name_go_to_the_text_classifier(client, texts_bert):
    response = client.post("/v1/classify", json={"input": TEXTS})
    body = response.json()
    expected = texts_bert.predict_proba(TEXTS)
    assert body["object"] == "list" and body["model"] == "texts"
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    np.testing.assert_allclose(_probs(response), expected, atol=1e-5)
    assert [d["label"] for d in body["data"]] == [LABELS[i] for i in expected.argmax(axis=1)]
    tokens = sum(len(texts_bert.encoder().encode(t)["input_ids"]) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    one = client.post("/v1/classify", json={"input": "plane"})  # a string is one text
    assert one.json()["model"] == "texts" and len(one.json()["data"]) == 1
    np.testing.assert_allclose(_probs(one), texts_bert.predict_proba("plane"), atol=1e-5)
    named = client.post("/v1/classify", json={"model": "texts", "input": TEXTS[:2], "user": "ignored"})
    np.testing.assert_allclose(_probs(named), expected[:2], atol=1e-5)


def test_pairs_without_a_model_name_go_to_the_pair_classifier(client, clf):
    response = client.post("/v1/classify", json={"input": PAIRS})
    assert response.json()["model"] == "pairs"
    np.testing.assert_allclose(_probs(response), clf.predict_proba([tuple(p) for p in PAIRS]), atol=1e-5)
    assert _probs(response).shape == (2, 2)


def test_models_and_health_name_the_task(client):
    assert [(m["id"], m["task"]) for m in client.get("/v1/models").json()["data"]] == [
        ("pairs", "pair-cls"), ("texts", "classify")]
    assert client.get("/health").json()["models"] == {"pairs": "pair-cls", "texts": "classify"}


def test_request_errors_have_the_error_shape(client):
    post = lambda body: client.post("/v1/classify", json=body)
    assert_api_error(post({"model": "texts", "input": PAIRS}), 422,
                     "model 'texts' is a text classifier: input must be a string or a list of strings",
                     code="texts_required", param="input")
    assert_api_error(post({"model": "pairs", "input": TEXTS}), 422, "is a pair classifier", "list of pairs")
    assert_api_error(post({"input": []}), 400, "input must not be empty", code="empty_input")
    assert_api_error(post({"model": "texts", "input": ""}), 400, "input 0 is empty", code="empty_input")
    assert_api_error(post({"input": ["cow", ""]}), 400, "input 1 is empty", code="empty_input")
    assert_api_error(post({"input": ["cow"] * 5}), 422, "too many inputs: 5; the limit is 4",
                     code="too_many_inputs", param="input")
    long_text = " ".join(["cow"] * 20)
    error = assert_api_error(post({"input": ["cow", long_text]}), 422, code="input_too_long", param="input")
    assert error["message"] == "input 1 has 22 tokens; the limit is 12"  # counted untruncated: [CLS] 20 [SEP]
    assert_api_error(post({"input": 5}), 422, "input: expected a string, a list of strings or a list of pairs",
                     code="invalid_field")
    assert_api_error(post({"input": ["cow", ["a", "b"]]}), 422, "input: expected")
    assert_api_error(post({"input": "cow", "model": "nope"}), 404, "'nope' is not loaded", "pairs, texts",
                     code="model_not_found")


def test_a_lone_text_classifier_and_no_classifier(texts_bert, embedder):
    with TestClient(create_app({"texts": texts_bert}, SETTINGS)) as c:
        # the only classifier takes every request, and says why pairs are wrong for it
        assert_api_error(c.post("/v1/classify", json={"input": PAIRS}), 422, "is a text classifier",
                         code="texts_required")
        assert c.post("/v1/classify", json={"input": "cow"}).status_code == 200
    with TestClient(create_app({"bert": embedder}, SETTINGS)) as c:
        assert_api_error(c.post("/v1/classify", json={"input": TEXTS}), 404, "no text classifier loaded",
                         code="model_not_found")
        assert_api_error(c.post("/v1/classify", json={"input": PAIRS}), 404, "no pair classifier loaded")
        assert_api_error(c.post("/v1/classify", json={"model": "bert", "input": "cow"}), 404,
                         "'bert' is an embedding model, not a pair classifier or a text classifier")


def test_concurrent_requests_share_model_calls_and_keep_their_answers(clf, texts_bert, texts_qwen):
    """A blocked model thread lets requests pile up; they are answered in few calls, each with its own rows."""
    requests = [{"model": "qwen", "input": TEXTS[i % 4:]} for i in range(6)] + \
               [{"model": "texts", "input": TEXTS[:i + 1]} for i in range(3)] + [{"input": PAIRS}]
    models = {"pairs": clf, "texts": texts_bert, "qwen": texts_qwen}
    settings = ServerSettings(max_wait_ms=0)
    with TestClient(create_app(models, settings)) as c:
        state = c.app.state.qtune
        release = threading.Event()
        state.executor.submit(release.wait, 30)  # the model thread is busy until released
        batcher = state.models["qwen"].batcher
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(c.post, "/v1/classify", json=body) for body in requests]
            for _ in range(1000):
                if batcher.pending == 6:
                    break
                time.sleep(0.01)
            assert batcher.pending == 6
            release.set()
            responses = [f.result(60) for f in futures]
        assert batcher.model_calls <= 2  # six requests, at most the first alone and then all the rest
    for body, response in zip(requests, responses):
        name = body.get("model", "pairs")
        assert response.json()["model"] == name
        inputs = [tuple(p) for p in body["input"]] if name == "pairs" else body["input"]
        np.testing.assert_allclose(_probs(response), models[name].predict_proba(inputs), atol=1e-5)
