"""`/v1/rerank` and `/v1/extract` (in-process, TestClient), and FAQ matching rescored by a reranker."""

from __future__ import annotations

import dataclasses
import itertools
import re
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from support import FAQ_QUESTIONS, assert_api_error
from qtune.api import load
from qtune.kb import FaqMatcher
from qtune.tasks.reranker.model import Reranker
from qtune.serving import ServerSettings, create_app

QUERY = "the big cat"
DOCS = ["a red bus", "my old dog is here", "the cat", "small green train there", "cow"]
TEXTS = ["the cat is here", "a big red bus now"]
NEW_TOKENS = 6  # tiny random models never stop on their own: keep generation short

SETTINGS = ServerSettings(max_inputs=6, max_input_tokens=100, max_body_bytes=4096, max_new_tokens=12)


def calibrated(reranker: Reranker, threshold: float) -> Reranker:
    """The same weights with a threshold stored in its metadata, as `qtune calibrate` leaves it."""
    loaded = reranker.loaded
    settings = dataclasses.replace(loaded.meta.settings, threshold=threshold)
    return Reranker(dataclasses.replace(loaded, meta=dataclasses.replace(loaded.meta, settings=settings)))


@pytest.fixture(scope="module")
def rr_bert(tiny_bert_dir):
    return load(tiny_bert_dir, task="reranker", device="cpu")


@pytest.fixture(scope="module")
def rr_qwen(tiny_qwen_dir):
    return load(tiny_qwen_dir, task="reranker", device="cpu")


@pytest.fixture(scope="module")
def extractor(tiny_qwen_dir):
    return load(tiny_qwen_dir, task="extract", device="cpu")


@pytest.fixture(scope="module")
def rr_calibrated(rr_bert):
    scores = np.sort(rr_bert.score([(QUERY, d) for d in DOCS]))  # the random head: close scores
    gap = int(np.argmax(np.diff(scores)))  # in the widest gap, far from float rounding
    return calibrated(rr_bert, float((scores[gap] + scores[gap + 1]) / 2))


@pytest.fixture(scope="module")
def client(rr_bert, rr_qwen, rr_calibrated, extractor, embedder, clf):
    models = {"rr-bert": rr_bert, "rr-qwen": rr_qwen, "rr-cal": rr_calibrated, "ext": extractor,
              "emb": embedder, "clf": clf}
    with TestClient(create_app(models, SETTINGS)) as c:
        yield c


# --- /v1/rerank ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rr-bert", "rr-qwen"])
def test_rerank_scores_equal_score_and_are_sorted(client, request, name):
    reranker = request.getfixturevalue(name.replace("-", "_"))
    expected = reranker.score([(QUERY, d) for d in DOCS])
    response = client.post("/v1/rerank", json={"model": name, "query": QUERY, "documents": DOCS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "model", "usage", "results"}  # no threshold: not calibrated
    assert re.fullmatch(r"rerank-[0-9a-f]{32}", body["id"])
    assert body["model"] == name
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    assert all(set(r) == {"index", "relevance_score"} for r in results)
    got = np.array([r["relevance_score"] for r in results])
    np.testing.assert_allclose(got, expected[[r["index"] for r in results]], atol=1e-5)
    assert all(a >= b for a, b in itertools.pairwise(got))  # best first
    for a, b in itertools.pairwise(results):
        if a["relevance_score"] == b["relevance_score"]:
            assert a["index"] < b["index"]  # ties keep the input order
    tokens = sum(len(f["input_ids"]) for f in reranker.features([(QUERY, d) for d in DOCS]))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_rerank_top_n_return_documents_and_cohere_document_objects(client, rr_bert):
    expected = rr_bert.rerank(QUERY, DOCS)
    top = client.post("/v1/rerank", json={"model": "rr-bert", "query": QUERY, "documents": DOCS, "top_n": 2,
                                          "return_documents": True}).json()["results"]
    assert [r["index"] for r in top] == [i for i, _ in expected[:2]]
    assert [r["document"] for r in top] == [{"text": DOCS[i]} for i, _ in expected[:2]]
    many = client.post("/v1/rerank", json={"model": "rr-bert", "query": QUERY, "documents": DOCS, "top_n": 99})
    assert len(many.json()["results"]) == len(DOCS)
    objects = client.post("/v1/rerank", json={"model": "rr-bert", "query": QUERY, "return_documents": True,
                                              "documents": [{"text": d} for d in DOCS]}).json()["results"]
    assert [(r["index"], r["document"]["text"]) for r in objects] == [(i, DOCS[i]) for i, _ in expected]


def test_rerank_ties_keep_input_order(client):
    docs = ["the cat", "a red bus", "the cat", "a red bus", "the cat"]  # equal pairs, equal scores
    results = client.post("/v1/rerank", json={"model": "rr-bert", "query": QUERY, "documents": docs}).json()["results"]
    by_text = {}
    for r in results:
        by_text.setdefault(docs[r["index"]], []).append(r)
    for same in by_text.values():
        assert len({r["relevance_score"] for r in same}) == 1
        assert [r["index"] for r in same] == sorted(r["index"] for r in same)


def test_rerank_threshold_and_relevant_when_calibrated(client, rr_calibrated):
    threshold = rr_calibrated.threshold
    body = client.post("/v1/rerank", json={"model": "rr-cal", "query": QUERY, "documents": DOCS}).json()
    assert body["threshold"] == pytest.approx(threshold)
    relevant = [r["relevant"] for r in body["results"]]
    assert relevant == [r["relevance_score"] >= threshold for r in body["results"]]
    above = int((rr_calibrated.score([(QUERY, d) for d in DOCS]) >= threshold).sum())
    assert relevant == [True] * above + [False] * (len(DOCS) - above) and 0 < above < len(DOCS)


def test_rerank_is_micro_batched(rr_bert):
    settings = ServerSettings(max_wait_ms=300)
    with TestClient(create_app({"rr": rr_bert}, settings)) as c:
        batcher = c.app.state.qtune.models["rr"].batcher
        queries = ["the cat", "a bus", "my dog", "big train", "cow", "red car"]
        responses = {}

        def send(q: str) -> None:
            responses[q] = c.post("/v1/rerank", json={"query": q, "documents": DOCS})

        threads = [threading.Thread(target=send, args=(q,)) for q in queries]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert batcher.model_calls < len(queries)
        for q in queries:
            results = responses[q].json()["results"]
            expected = rr_bert.score([(q, d) for d in DOCS])
            np.testing.assert_allclose([r["relevance_score"] for r in results],
                                       expected[[r["index"] for r in results]], atol=1e-5)


def test_rerank_errors(client, rr_qwen):
    post = lambda body: client.post("/v1/rerank", json=body)  # noqa: E731
    assert_api_error(post({"model": "rr-bert", "query": "", "documents": DOCS}), 400, "query must not be empty",
                 code="empty_input", param="query")
    assert_api_error(post({"model": "rr-bert", "query": "  ", "documents": DOCS}), 400, "query must not be empty")
    assert_api_error(post({"model": "rr-bert", "query": QUERY, "documents": []}), 400, "documents must not be empty",
                 code="empty_input", param="documents")
    assert_api_error(post({"model": "rr-bert", "query": QUERY, "documents": ["a", ""]}), 400, "document 1 is empty")
    assert_api_error(client.post("/v1/rerank", content=b"{oops"), 400, "malformed JSON")

    assert_api_error(post({"model": "nope", "query": QUERY, "documents": DOCS}), 404, "'nope' is not loaded",
                 "rr-bert, rr-qwen, rr-cal", code="model_not_found")
    assert_api_error(post({"model": "clf", "query": QUERY, "documents": DOCS}), 404,
                 "model 'clf' is a pair classifier, not a reranker")
    assert_api_error(post({"model": "ext", "query": QUERY, "documents": DOCS}), 404, "is an extractor, not a reranker")
    assert_api_error(post({"query": QUERY, "documents": DOCS}), 422, "model is required", code="model_required")

    assert_api_error(post({"model": "rr-bert", "query": QUERY, "documents": ["cat"] * 7}), 422,
                 "too many documents: 7; the limit is 6", code="too_many_inputs", param="documents")
    long_doc = " ".join(["cat"] * 70)  # [CLS] the big cat [SEP] + 70 + [SEP] = 76 > 64 positions
    error = assert_api_error(post({"model": "rr-bert", "query": QUERY, "documents": ["dog", long_doc]}), 422,
                         code="input_too_long", param="documents")
    assert error["message"] == "document 1 has 76 tokens together with the query; the limit is 64"
    qwen_doc = " ".join(["cat"] * 40)
    n = len(rr_qwen.features([(QUERY, qwen_doc)])[0]["input_ids"])
    assert n > 100
    assert_api_error(post({"model": "rr-qwen", "query": QUERY, "documents": [qwen_doc]}), 422,
                 f"document 0 has {n} tokens together with the query with the reranker prompt; the limit is 100")
    for top_n in (0, -1, "2", 1.5):
        assert_api_error(post({"model": "rr-bert", "query": QUERY, "documents": DOCS, "top_n": top_n}), 422, "top_n",
                     code="invalid_field", param="top_n")
    assert_api_error(post({"model": "rr-bert", "query": QUERY, "documents": ["a", 1]}), 422,
                 'documents: expected a list of strings (or of {"text": string} objects)', param="documents")
    assert_api_error(post({"model": "rr-bert", "query": QUERY, "documents": "a"}), 422, "documents")
    assert_api_error(post({"model": "rr-bert", "query": 5, "documents": DOCS}), 422, "query")
    assert_api_error(post({"model": "rr-bert", "documents": DOCS}), 422, "query")
    assert_api_error(post({"model": "rr-bert", "query": QUERY, "documents": DOCS, "return_documents": "yes"}), 422,
                 "return_documents")
    assert_api_error(post({"model": "rr-bert", "query": QUERY, "documents": ["cat " * 1200]}), 413, "4096 bytes")


def test_no_reranker_or_extractor_loaded(embedder):
    with TestClient(create_app({"emb": embedder}, SETTINGS)) as c:
        assert_api_error(c.post("/v1/rerank", json={"query": "q", "documents": ["d"]}), 404, "no reranker loaded",
                     code="model_not_found")
        assert_api_error(c.post("/v1/extract", json={"input": "x"}), 404, "no extractor loaded")
        assert_api_error(c.post("/v1/extract", json={"model": "emb", "input": "x"}), 404,
                     "model 'emb' is an embedding model, not an extractor")


# --- /v1/extract -----------------------------------------------------------------------------------

def test_extract_equals_extractor(client, extractor):
    expected = extractor.extract(TEXTS, batch_size=SETTINGS.extract_batch_size, max_new_tokens=NEW_TOKENS)
    response = client.post("/v1/extract", json={"model": "ext", "input": TEXTS, "max_new_tokens": NEW_TOKENS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"object", "model", "data", "usage"}
    assert (body["object"], body["model"]) == ("list", "ext")
    assert [d["index"] for d in body["data"]] == [0, 1]
    for row, want in zip(body["data"], expected):
        assert row["output"] == want.output
        assert row.get("error") == want.error
        if want.error is not None:
            assert row["raw"] == want.text
        else:
            assert set(row) == {"index", "output"}
    tokens = sum(len(extractor.builder.prompt_ids(t)) for t in TEXTS)
    generated = sum(r.tokens for r in expected)
    assert 0 < generated <= NEW_TOKENS * len(TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "completion_tokens": generated,
                             "total_tokens": tokens + generated}


def test_extract_single_string_and_default_max_new_tokens(client, extractor):
    # Without max_new_tokens: min(256, the server's cap of 12).
    expected = extractor.extract(TEXTS[:1], max_new_tokens=SETTINGS.max_new_tokens)[0]
    data = client.post("/v1/extract", json={"input": TEXTS[0]}).json()["data"]  # the only extractor
    assert len(data) == 1 and data[0]["index"] == 0
    assert (data[0]["output"], data[0].get("error"), data[0].get("raw")) == (expected.output, expected.error,
                                                                            expected.text)


def test_extract_errors(client, extractor):
    post = lambda body: client.post("/v1/extract", json=body)  # noqa: E731
    assert_api_error(post({"model": "ext", "input": []}), 400, "input must not be empty", code="empty_input")
    assert_api_error(post({"model": "ext", "input": ""}), 400, "input 0 is empty")
    assert_api_error(post({"model": "ext", "input": ["a", ""]}), 400, "input 1 is empty")
    assert_api_error(post({"model": "rr-bert", "input": "a"}), 404, "model 'rr-bert' is a reranker, not an extractor")
    assert_api_error(post({"model": "ext", "input": "a", "max_new_tokens": 13}), 422,
                 "max_new_tokens must be between 1 and 12, got 13", code="invalid_max_new_tokens",
                 param="max_new_tokens")
    assert_api_error(post({"model": "ext", "input": "a", "max_new_tokens": 0}), 422, "max_new_tokens",
                 code="invalid_field")
    assert_api_error(post({"model": "ext", "input": ["a"] * 7}), 422, "too many inputs: 7; the limit is 6",
                 code="too_many_inputs")
    long_text = " ".join(["cat"] * 90)
    n = len(extractor.builder.prompt_ids(long_text))
    assert_api_error(post({"model": "ext", "input": ["dog", long_text]}), 422,
                 f"input 1 has {n} tokens with the extraction prompt; the limit is 100", code="input_too_long")
    assert_api_error(post({"model": "ext", "input": [1, 2]}), 422, "input: expected a string or a list of strings")
    assert_api_error(post({"model": "ext", "input": "cat " * 1200}), 413, "4096 bytes")


def test_extract_queue_full_and_draining(extractor):
    settings = ServerSettings(max_queue=1, max_new_tokens=NEW_TOKENS)
    app = create_app({"ext": extractor}, settings)
    with TestClient(app) as c:
        state = app.state.qtune
        release = threading.Event()
        state.executor.submit(release.wait, 30)  # the model thread is busy until released
        results = []
        thread = threading.Thread(target=lambda: results.append(c.post("/v1/extract", json={"input": "cat"})))
        thread.start()
        for _ in range(500):
            if state.models["ext"].pending == 1:
                break
            time.sleep(0.01)
        assert 'qtune_queue_depth{model="ext"} 1.0' in c.get("/metrics").text
        assert_api_error(c.post("/v1/extract", json={"input": "cat"}), 429, "retry later", code="queue_full")
        release.set()
        thread.join(30)
        assert [r.status_code for r in results] == [200]
        state.draining = True
        assert_api_error(c.post("/v1/extract", json={"input": "cat"}), 503, "shutting down")
        assert_api_error(c.post("/v1/rerank", json={"query": "q", "documents": ["d"]}), 503, "shutting down")


# --- models, metrics -------------------------------------------------------------------------------

def test_models_health_and_metrics(client):
    models = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["task"]) for m in models] == [
        ("rr-bert", "reranker"), ("rr-qwen", "reranker"), ("rr-cal", "reranker"), ("ext", "extract"),
        ("emb", "embedding"), ("clf", "pair-cls")]
    assert client.get("/health").json()["models"]["ext"] == "extract"
    client.post("/v1/rerank", json={"model": "rr-bert", "query": QUERY, "documents": DOCS})
    client.post("/v1/rerank", json={"model": "rr-bert", "query": "", "documents": DOCS})
    client.post("/v1/extract", json={"model": "ext", "input": "cat", "max_new_tokens": 2})
    text = client.get("/metrics").text
    assert re.search(r'qtune_requests_total\{endpoint="/v1/rerank",status="200"\} [1-9]', text)
    assert re.search(r'qtune_requests_total\{endpoint="/v1/rerank",status="400"\} [1-9]', text)
    assert re.search(r'qtune_requests_total\{endpoint="/v1/extract",status="200"\} [1-9]', text)
    assert re.search(r'qtune_batches_total\{model="rr-bert"\} [1-9]', text)
    assert re.search(r'qtune_batches_total\{model="ext"\} [1-9]', text)
    assert 'qtune_queue_depth{model="rr-bert"} 0.0' in text
    assert 'qtune_queue_depth{model="ext"} 0.0' in text


# --- FAQ matching rescored by a reranker -------------------------------------------------------------

@pytest.mark.parametrize("name", ["rr_bert", "rr_qwen"])
def test_matcher_rescores_with_a_reranker(faq_kb, embedder, request, name):
    reranker = request.getfixturevalue(name)
    matcher = FaqMatcher(embedder, faq_kb, rescorer=reranker)
    assert matcher.rescored_by == "reranker"
    assert matcher.threshold == 0.5  # not calibrated
    result = matcher.match(QUERY, top_k=4)
    candidates = result["candidates"]
    assert len(candidates) == 4
    scores = reranker.score([(QUERY, c["question"]) for c in candidates])
    assert [c["score"] for c in candidates] == pytest.approx(scores.tolist(), abs=1e-6)
    assert [c["score"] for c in candidates] == sorted((c["score"] for c in candidates), reverse=True)
    assert result["score"] == candidates[0]["score"] and result["id"] == candidates[0]["id"]
    assert result["matched"] == (result["score"] >= 0.5)


def test_matcher_threshold_defaults_to_the_calibrated_one(faq_kb, embedder, rr_bert, clf):
    scores = rr_bert.score([(QUERY, q) for q in FAQ_QUESTIONS])
    matcher = FaqMatcher(embedder, faq_kb, rescorer=calibrated(rr_bert, float(scores.max()) + 1e-4))
    assert matcher.threshold == pytest.approx(float(scores.max()) + 1e-4)
    assert matcher.match(QUERY)["matched"] is False
    assert matcher.match(QUERY, threshold=0.0)["matched"] is True
    low = FaqMatcher(embedder, faq_kb, rescorer=calibrated(rr_bert, float(scores.min()) - 1e-4))
    assert low.match(QUERY)["matched"] is True
    assert FaqMatcher(embedder, faq_kb, rescorer=calibrated(rr_bert, 0.9), threshold=0.1).threshold == 0.1
    assert FaqMatcher(embedder, faq_kb, rescorer=clf).rescored_by == "classifier"
    assert FaqMatcher(embedder, faq_kb).rescored_by is None


def test_match_endpoint_with_a_reranker_backed_matcher(faq_kb, embedder, rr_qwen):
    matcher = FaqMatcher(embedder, faq_kb, rescorer=calibrated(rr_qwen, 0.3))
    with TestClient(create_app({"emb": embedder}, ServerSettings(), matcher=matcher)) as c:
        response = c.post("/v1/match", json={"query": QUERY, "top_k": 3})
        assert response.status_code == 200, response.text
        body = response.json()
        direct = matcher.match(QUERY, top_k=3)
        assert set(body) == set(direct)
        assert [x["id"] for x in body["candidates"]] == [x["id"] for x in direct["candidates"]]
        assert [x["score"] for x in body["candidates"]] == pytest.approx([x["score"] for x in direct["candidates"]],
                                                                         abs=1e-6)
        assert body["matched"] == (body["score"] >= 0.3)
        assert c.get("/health").json()["match"] == {"rescored_by": "reranker", "threshold": 0.3}
        assert_api_error(c.post("/v1/match", json={"query": ""}), 400, "query must not be empty")
