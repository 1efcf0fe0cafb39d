"""The official `cohere` SDK against a live server: `ClientV2` (its default, /v2/rerank and
/v2/embed) and the v1 `Client` (/v1/rerank, /v1/embed) get what `qtune.load(...)` computes, and
bad requests raise the SDK's typed 4xx errors carrying qtune's error shape."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from served_models import live_server

from qtune.api import load
from qtune.serving import ServerSettings, create_app

cohere = pytest.importorskip("cohere")

KEY = "cohere-test-key"
LIMIT = 24  # --max-input-tokens: tokens per text (per query + document pair for the reranker)
QUERY = "the big cat"
DOCS = ["a red bus", "my old dog is here", "the cat", "small green train there", "cow"]
TEXTS = ["the cat is here", "a big red bus now", "my old dog"]
WORDS = ["cat", "dog", "horse", "cow", "sheep", "goat", "mouse", "tiger", "car", "bus"] * 4  # one token each
LONG = " ".join(WORDS)  # 40 words: over LIMIT for either model


@pytest.fixture(scope="module")
def models(tiny_bert_dir, tiny_qwen_dir):
    return {"emb": load(tiny_bert_dir, task="embedding", device="cpu"),
            "qemb": load(tiny_qwen_dir, task="embedding", device="cpu"),  # has a query instruction
            "rr": load(tiny_bert_dir, task="reranker", device="cpu")}


@pytest.fixture(scope="module")
def url(models):
    app = create_app(models, ServerSettings(max_input_tokens=LIMIT, max_inputs=8, api_key=KEY))
    with live_server(app) as (host, port):
        yield f"http://{host}:{port}"


@pytest.fixture(scope="module")
def v2(url):
    return cohere.ClientV2(api_key=KEY, base_url=url, timeout=30, max_retries=0)


@pytest.fixture(scope="module")
def v1(url):
    return cohere.Client(api_key=KEY, base_url=url, timeout=30, max_retries=0)


def tokens(model, text: str, *, is_query: bool = False) -> int:
    return len(model.features([text], is_query, truncate=False)[0]["input_ids"])


# --- rerank -----------------------------------------------------------------------------------------

def test_v2_rerank_equals_load_rerank_best_first(v2, models):
    response = v2.rerank(model="rr", query=QUERY, documents=DOCS, top_n=3)
    expected = models["rr"].rerank(QUERY, DOCS, top_n=3)
    assert [r.index for r in response.results] == [i for i, _ in expected]
    np.testing.assert_allclose([r.relevance_score for r in response.results], [s for _, s in expected], atol=1e-5)
    scores = [r.relevance_score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    assert response.id.startswith("rerank-") and response.meta.api_version.version == "2"
    pairs = models["rr"].features([(QUERY, d) for d in DOCS])
    assert response.meta.tokens.input_tokens == sum(len(f["input_ids"]) for f in pairs)
    assert len(v2.rerank(model="rr", query=QUERY, documents=DOCS).results) == len(DOCS)  # no top_n: all


def test_v2_rerank_max_tokens_per_doc_cuts_each_document_end(v2, models):
    documents = ["a red bus", LONG]
    with pytest.raises(cohere.UnprocessableEntityError) as refused:  # without it the pair is over LIMIT
        v2.rerank(model="rr", query=QUERY, documents=documents)
    error = refused.value.body["error"]
    assert error["code"] == "input_too_long" and error["param"] == "documents"
    assert error["message"].startswith("document 1 has ")
    response = v2.rerank(model="rr", query=QUERY, documents=documents, max_tokens_per_doc=3)
    expected = models["rr"].score([(QUERY, "a red bus"), (QUERY, "cat dog horse")])  # "a red bus" is 3 already
    got = {r.index: r.relevance_score for r in response.results}
    np.testing.assert_allclose([got[0], got[1]], expected, atol=1e-5)


def test_v1_client_rerank_with_return_documents(v1, models):
    response = v1.rerank(model="rr", query=QUERY, documents=DOCS, top_n=2, return_documents=True)
    expected = models["rr"].rerank(QUERY, DOCS, top_n=2)
    assert [r.index for r in response.results] == [i for i, _ in expected]
    np.testing.assert_allclose([r.relevance_score for r in response.results], [s for _, s in expected], atol=1e-5)
    assert [r.document.text for r in response.results] == [DOCS[i] for i, _ in expected]


# --- embed ------------------------------------------------------------------------------------------

def test_v2_embed_input_types_give_qtune_query_and_document_vectors(v2, models):
    qemb = models["qemb"]
    query = v2.embed(model="qemb", texts=TEXTS, input_type="search_query", embedding_types=["float"])
    document = v2.embed(model="qemb", texts=TEXTS, input_type="search_document", embedding_types=["float"])
    clustering = v2.embed(model="qemb", texts=TEXTS, input_type="clustering")  # no embedding_types: float
    np.testing.assert_allclose(query.embeddings.float_, qemb.embed(TEXTS, is_query=True), atol=1e-5)
    np.testing.assert_allclose(document.embeddings.float_, qemb.embed(TEXTS), atol=1e-5)
    np.testing.assert_allclose(clustering.embeddings.float_, qemb.embed(TEXTS), atol=1e-5)
    assert np.abs(np.array(query.embeddings.float_) - np.array(document.embeddings.float_)).max() > 1e-3
    assert query.response_type == "embeddings_by_type" and query.texts == TEXTS
    assert query.meta.api_version.version == "2"
    assert query.meta.billed_units.input_tokens == sum(tokens(qemb, t, is_query=True) for t in TEXTS)


def test_v2_embed_types_and_output_dimension(v2, models):
    response = v2.embed(model="emb", texts=TEXTS, input_type="search_document", output_dimension=16,
                        embedding_types=["float", "base64", "binary", "ubinary"])
    expected = models["emb"].embed(TEXTS, dimensions=16)  # (3, 16): cut, then normalised again
    got = response.embeddings
    np.testing.assert_allclose(got.float_, expected, atol=1e-5)
    unpacked = [np.frombuffer(base64.b64decode(b), dtype="<f4") for b in got.base64]
    np.testing.assert_allclose(unpacked, expected, atol=1e-5)
    signs = np.packbits(np.array(got.float_) > 0, axis=1)  # (3, 2): 16 sign bits, 8 to a byte
    assert np.array(got.ubinary).shape == (3, 2)
    assert got.ubinary == signs.tolist()
    assert got.binary == (signs.astype(int) - 128).tolist()
    assert got.int8 is None and got.uint8 is None


def test_v2_embed_truncate_none_refuses_start_and_end_cut(v2, models):
    emb, qemb = models["emb"], models["qemb"]
    with pytest.raises(cohere.UnprocessableEntityError) as refused:  # truncate omitted: NONE, as in qtune
        v2.embed(model="emb", texts=["the cat", LONG], input_type="search_document")
    error = refused.value.body["error"]
    assert error["code"] == "input_too_long" and error["param"] == "texts"
    assert error["message"].startswith(f"text 1 has {tokens(emb, LONG)} tokens") and "truncate" in error["message"]
    with pytest.raises(cohere.UnprocessableEntityError):
        v2.embed(model="emb", texts=[LONG], input_type="search_document", truncate="NONE")
    # END keeps the first LIMIT - 2 words between [CLS] and [SEP]; max_tokens lowers the limit
    end = v2.embed(model="emb", texts=[LONG], input_type="search_document", truncate="END")
    np.testing.assert_allclose(end.embeddings.float_, emb.embed([" ".join(WORDS[:LIMIT - 2])]), atol=1e-5)
    short = v2.embed(model="emb", texts=[LONG], input_type="search_document", truncate="END", max_tokens=6)
    np.testing.assert_allclose(short.embeddings.float_, emb.embed([" ".join(WORDS[:4])]), atol=1e-5)
    # START on a query keeps the instruction and the end token, and the text's last tokens
    start = v2.embed(model="qemb", texts=[LONG], input_type="search_query", truncate="START")
    kept = max(k for k in range(len(WORDS)) if tokens(qemb, " " + " ".join(WORDS[-k:]), is_query=True) <= LIMIT)
    assert kept > 0
    tail = " " + " ".join(WORDS[-kept:])  # cut where a token starts: Qwen's tokens carry their space
    np.testing.assert_allclose(start.embeddings.float_, qemb.embed([tail], is_query=True), atol=1e-5)
    assert start.meta.billed_units.input_tokens == tokens(qemb, tail, is_query=True) <= LIMIT


def test_v1_client_embed_floats_and_by_type(v1, models):
    expected = models["emb"].embed(TEXTS)
    floats = v1.embed(model="emb", texts=TEXTS, input_type="search_document")
    assert floats.response_type == "embeddings_floats" and floats.texts == TEXTS
    np.testing.assert_allclose(floats.embeddings, expected, atol=1e-5)
    by_type = v1.embed(model="emb", texts=TEXTS, input_type="search_document", embedding_types=["float", "ubinary"])
    assert by_type.response_type == "embeddings_by_type"
    np.testing.assert_allclose(by_type.embeddings.float_, expected, atol=1e-5)
    assert by_type.meta.api_version.version == "1"


# --- errors: the SDK's typed exceptions with qtune's error body -----------------------------------

@pytest.mark.parametrize("call, error, code, param", [
    (lambda c: c.embed(model="emb", texts=["x"], input_type="search_document", embedding_types=["int8"]),
     cohere.UnprocessableEntityError, "unsupported_embedding_type", "embedding_types"),
    (lambda c: c.embed(model="emb", texts=[], input_type="search_document"),
     cohere.BadRequestError, "empty_input", "texts"),
    (lambda c: c.embed(model="emb", texts=["the cat", ""], input_type="search_query"),
     cohere.BadRequestError, "empty_input", "texts"),
    (lambda c: c.embed(model="emb", images=["data:image/png;base64,AA=="], input_type="image"),
     cohere.UnprocessableEntityError, "unsupported_input", "images"),
    (lambda c: c.embed(model="emb", texts=["x"], input_type="search_document", output_dimension=33),
     cohere.UnprocessableEntityError, "invalid_dimensions", "output_dimension"),
    (lambda c: c.embed(model="emb", texts=["x"], input_type="search_document", truncate="MIDDLE"),
     cohere.UnprocessableEntityError, "invalid_field", "truncate"),
    (lambda c: c.embed(model="emb", texts=["x"] * 9, input_type="search_document"),
     cohere.UnprocessableEntityError, "too_many_inputs", "texts"),
    (lambda c: c.embed(model="rr", texts=["x"], input_type="search_document"),
     cohere.NotFoundError, "model_not_found", "model"),
    (lambda c: c.rerank(model="rr", query=" ", documents=DOCS),
     cohere.BadRequestError, "empty_input", "query"),
    (lambda c: c.rerank(model="rr", query=QUERY, documents=DOCS, top_n=0),
     cohere.UnprocessableEntityError, "invalid_field", "top_n"),
    (lambda c: c.rerank(model="emb", query=QUERY, documents=DOCS),
     cohere.NotFoundError, "model_not_found", "model"),
    (lambda c: c.rerank(model="rr", query=QUERY, documents=DOCS,
                        relevant_spans=cohere.RerankRelevantSpans(mode="enabled")),
     cohere.UnprocessableEntityError, "unsupported_option", "relevant_spans"),
])
def test_bad_requests_raise_the_sdk_typed_errors(v2, call, error, code, param):
    with pytest.raises(error) as raised:
        call(v2)
    body = raised.value.body["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert (body["code"], body["param"]) == (code, param), body["message"]


def test_v2_paths_need_the_api_key(url):
    wrong = cohere.ClientV2(api_key="not-the-key", base_url=url, timeout=30, max_retries=0)
    with pytest.raises(cohere.UnauthorizedError) as raised:
        wrong.embed(model="emb", texts=["x"], input_type="search_document")
    assert raised.value.body["error"]["code"] == "invalid_api_key"
    with pytest.raises(cohere.UnauthorizedError):
        wrong.rerank(model="rr", query=QUERY, documents=DOCS)
