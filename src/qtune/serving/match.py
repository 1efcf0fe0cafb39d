"""`POST /v1/match`: the best FAQ entry of the knowledge base for a query (the matcher of
`qtune.kb.faq`: recall with the embedding model, rescoring with a reranker or pair classifier, a
threshold), answered in stages so that other models' calls run between them.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import Response
from pydantic import StrictInt, StrictStr

from qtune.errors import QtuneError
from qtune.serving.gate import decode, read_body, render, while_connected
from qtune.serving.schemas import ApiError
from qtune.serving.state import ModelCalls, holding
from qtune.tasks.requests import FiniteFloat
from qtune.tasks.requests import Request as RequestBody

# /v1/match rescores its candidates in model calls of at most this many tokens (a 512-token reranker:
# 4 of 100 candidates at a time), so that a top_k of 100 does not hold the model thread for seconds.
MATCH_CALL_TOKENS = 2048


class MatchRequest(RequestBody):
    """`/v1/match`: the best FAQ entry for `query` among the `top_k` nearest (at most `--max-top-k`)."""

    query: StrictStr
    top_k: StrictInt | None = None
    threshold: FiniteFloat | None = None


async def answer_match(calls: ModelCalls, request: Request) -> Response:
    """The answer to a `/v1/match` request: 404 without a knowledge base, 400/422 for a bad query or top_k."""
    state, settings = calls.state, calls.settings
    if state.matcher is None:
        raise ApiError(404, "no knowledge base loaded", code="model_not_found")
    _, body = await calls.prepare(decode, await read_body(request, settings), MatchRequest)
    if not body.query.strip():
        raise ApiError(400, "query must not be empty", param="query", code="empty_input")
    if body.top_k is not None and not 1 <= body.top_k <= settings.max_top_k:
        raise ApiError(422, f"top_k must be at least 1 and at most {settings.max_top_k}, got {body.top_k}",
                       param="top_k", code="invalid_top_k")
    try:
        result = await while_connected(request, _match(calls, state.matcher, body))
    except QtuneError as error:
        if isinstance(error, ApiError):
            raise
        raise ApiError(422, str(error)) from None
    return await calls.prepare(render, result)


async def _match(calls: ModelCalls, matcher, body: MatchRequest) -> dict:
    """`matcher.match` in stages: tokenizing on prep threads (holding the tokenizers' locks), model
    calls and the search on the model thread, rescoring a few candidates per model call so that
    other models' calls run between them. Counted in the match queue throughout."""
    state = calls.state
    locks = [state.tokenizer_lock(t) for t in matcher.tokenizers]
    loop = asyncio.get_running_loop()
    with calls.queued(state.match_queue, "FAQ matching"):
        features = await calls.prepare(holding, locks, matcher.query_features, body.query)
        hits = await loop.run_in_executor(state.executor, matcher.recall, features, body.top_k)
        scores = None
        if matcher.rescorer is not None and hits:
            pairs = await calls.prepare(holding, locks, matcher.pair_features, body.query, hits)
            scores = []
            for part in _parts(pairs, MATCH_CALL_TOKENS):
                scores.extend(await loop.run_in_executor(state.executor, matcher.rescore, part))
        return matcher.decide(hits, scores, body.threshold)


def _parts(features: list[dict], tokens: int) -> list[list[dict]]:
    """`features` in order, in runs of at most `tokens` tokens (a longer feature alone)."""
    parts, size = [], 0
    for feature in features:
        length = len(feature["input_ids"])
        if not parts or size + length > tokens:
            parts.append([])
            size = 0
        parts[-1].append(feature)
        size += length
    return parts
