"""`POST /v1/rerank` (Cohere / vLLM shape): `{query, documents, top_n?, return_documents?}` ->
results sorted by score; with a calibrated threshold, a top-level `threshold` and `relevant` flags.
`POST /v2/rerank` (Cohere's v2 shape, `cohere.ClientV2.rerank`): the same results with Cohere's
`meta`; `max_tokens_per_doc` cuts each document's end to that many tokens."""

from __future__ import annotations

import uuid
from typing import Literal

import numpy as np
from pydantic import Field, StrictBool, StrictInt, StrictStr

from qtune.errors import RequestError
from qtune.tasks.requests import Request, check_chars, check_count, check_total, cohere_meta, cut_chars, fit_text, usage


class RerankDocument(Request):
    text: StrictStr


class RerankRequest(Request):
    # Documents as strings (Jina/vLLM) or {"text": ...} objects (Cohere's older clients).
    union_messages = {"documents": 'documents: expected a list of strings (or of {"text": string} objects)'}
    query: StrictStr
    documents: list[StrictStr | RerankDocument]
    model: StrictStr | None = None
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False


class RelevantSpans(Request):
    mode: Literal["enabled", "disabled"]


class CohereRerankRequest(Request):
    """What `cohere.ClientV2.rerank` sends: documents are strings; `priority` is ignored."""

    query: StrictStr
    documents: list[StrictStr]
    model: StrictStr | None = None
    top_n: StrictInt | None = Field(default=None, ge=1)
    max_tokens_per_doc: StrictInt | None = Field(default=None, ge=1)
    relevant_spans: RelevantSpans | None = None


def rerank_features(entry, query: str, documents: list[str], settings,
                    max_document_tokens: int | None = None) -> list[dict]:
    """Validated, unpadded (query, document) features, as `Reranker.features` makes them;
    documents over `max_document_tokens` tokens (of their own) lose their end first."""
    if not query.strip():
        raise RequestError(400, "query must not be empty", param="query", code="empty_input")
    if not documents:
        raise RequestError(400, "documents must not be empty", param="documents", code="empty_input")
    check_count(documents, settings, param="documents")
    for i, document in enumerate(documents):
        if not document:
            raise RequestError(400, f"document {i} is empty", param="documents", code="empty_input")
    check_chars([query], entry.max_input_tokens, param="query", item="query")
    if max_document_tokens is not None:
        documents = [cut_chars(d, max_document_tokens) for d in documents]
    check_chars(documents, entry.max_input_tokens, param="documents", item="document")
    if max_document_tokens is not None:
        tokenizer = entry.model.loaded.tokenizer

        def length(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        documents = [fit_text(tokenizer, d, length, max_document_tokens, "end") for d in documents]
    # Within the token limit (never above the model's max_length) nothing would be cut, so these
    # features equal `Reranker.features`; longer pairs are counted and refused.
    features = entry.model.features([(query, d) for d in documents], truncate=False)
    prompt = " with the reranker prompt" if entry.model.formatter.prompt is not None else ""
    for i, f in enumerate(features):
        if len(f["input_ids"]) > entry.max_input_tokens:
            raise RequestError(422, f"document {i} has {len(f['input_ids'])} tokens together with the query{prompt}; "
                                    f"the limit is {entry.max_input_tokens}", param="documents", code="input_too_long")
    check_total(features, settings, param="documents")
    return features


async def _ranked(call, entry, query: str, documents: list[str], top_n: int | None,
                  max_document_tokens: int | None = None) -> tuple[list[dict], list[dict]]:
    """(results best first, the features scored): `{index, relevance_score}` (and `relevant` with a
    calibrated threshold) of the `top_n` best documents; ties keep input order."""
    features = await call.tokenize(rerank_features, entry, query, documents, call.settings,
                                   max_document_tokens)  # on a prep thread
    scores = (await call.submit(entry, features))[:, 0]  # (n,) in [0, 1]
    threshold = entry.model.threshold
    results = []
    for i in np.argsort(-scores, kind="stable")[:top_n]:
        score = float(scores[i])
        result = {"index": int(i), "relevance_score": score}
        if threshold is not None:
            result["relevant"] = score >= threshold
        results.append(result)
    return results, features


def _with_threshold(entry, answer: dict) -> dict:
    if entry.model.threshold is not None:
        answer["threshold"] = float(entry.model.threshold)
    return answer


async def rerank(call, entry, body: RerankRequest) -> dict:
    documents = [d if isinstance(d, str) else d.text for d in body.documents]
    results, features = await _ranked(call, entry, body.query, documents, body.top_n)
    if body.return_documents:
        for result in results:
            result["document"] = {"text": documents[result["index"]]}
    return _with_threshold(entry, {"id": f"rerank-{uuid.uuid4().hex}", "model": entry.name,
                                   "usage": usage(features), "results": results})


async def cohere_rerank(call, entry, body: CohereRerankRequest) -> dict:
    if body.relevant_spans is not None and body.relevant_spans.mode == "enabled":
        raise RequestError(422, "relevant_spans are not supported: a reranker scores whole documents",
                           param="relevant_spans", code="unsupported_option")
    results, features = await _ranked(call, entry, body.query, body.documents, body.top_n, body.max_tokens_per_doc)
    return _with_threshold(entry, {"id": f"rerank-{uuid.uuid4().hex}", "model": entry.name, "results": results,
                                   "meta": cohere_meta("2", features)})
