"""`POST /v1/rerank` (Cohere / vLLM shape): `{query, documents, top_n?, return_documents?}` ->
results sorted by score; with a calibrated threshold, a top-level `threshold` and `relevant` flags."""

from __future__ import annotations

import uuid

import numpy as np
from pydantic import Field, StrictBool, StrictInt, StrictStr

from qtune.errors import RequestError
from qtune.tasks.requests import Request, check_count, check_total, usage


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


def rerank_features(entry, query: str, documents: list[str], settings) -> list[dict]:
    """Validated, unpadded (query, document) features, as `Reranker.features` makes them."""
    if not query.strip():
        raise RequestError(400, "query must not be empty", param="query", code="empty_input")
    if not documents:
        raise RequestError(400, "documents must not be empty", param="documents", code="empty_input")
    check_count(documents, settings, param="documents")
    for i, document in enumerate(documents):
        if not document:
            raise RequestError(400, f"document {i} is empty", param="documents", code="empty_input")
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


async def rerank(call, entry, body: RerankRequest) -> dict:
    documents = [d if isinstance(d, str) else d.text for d in body.documents]
    features = await call.tokenize(rerank_features, entry, body.query, documents, call.settings)  # on a prep thread
    scores = (await call.submit(entry, features))[:, 0]  # (n,) in [0, 1]
    threshold = entry.model.threshold
    results = []
    for i in np.argsort(-scores, kind="stable")[:body.top_n]:  # best first; ties keep input order
        score = float(scores[i])
        result = {"index": int(i), "relevance_score": score}
        if threshold is not None:
            result["relevant"] = score >= threshold
        if body.return_documents:
            result["document"] = {"text": documents[i]}
        results.append(result)
    answer = {"id": f"rerank-{uuid.uuid4().hex}", "model": entry.name, "usage": usage(features), "results": results}
    if threshold is not None:
        answer["threshold"] = float(threshold)
    return answer
