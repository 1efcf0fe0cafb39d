"""The FastAPI app: `/v1/embeddings`, `/v1/classify`, `/v1/rerank`, `/v1/extract`, `/v1/match`,
`/v1/models`, `/health`, `/metrics`.

Embeddings, pair classification and reranking go through one `MicroBatcher` per model; extraction
(generation: slow, stateful) runs one request per model call on the same single model thread.

Request bodies are read and parsed here (not by FastAPI) so that every failure, from a too-large
body to a bad field, is answered in the one error shape `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import json
import logging
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qtune.errors import QtuneError
from qtune.serving.batcher import (
    MicroBatcher,
    QueueFullError,
    classifier_runner,
    embedding_runner,
    reranker_runner,
)
from qtune.serving.schemas import (
    ERROR_TYPES,
    ApiError,
    ClassifyRequest,
    EmbeddingRequest,
    ExtractRequest,
    RerankRequest,
    ServerSettings,
    error_body,
)

logger = logging.getLogger("qtune.serving")

KINDS = {"embedding": "an embedding model", "pair-cls": "a pair classifier", "reranker": "a reranker",
         "extract": "an extractor"}
DEFAULT_MAX_NEW_TOKENS = 256  # /v1/extract without max_new_tokens (capped by ServerSettings.max_new_tokens)
NO_LIMIT = 10 ** 9  # tokenize without cutting, so too-long inputs are reported (bounded by the body size)
ENDPOINTS = ("/v1/embeddings", "/v1/classify", "/v1/rerank", "/v1/extract", "/v1/match", "/v1/models",
             "/health", "/metrics")


@dataclass
class ServedModel:
    name: str
    kind: str  # "embedding" | "pair-cls" | "reranker" | "extract"
    model: object  # Embedder | PairClassifier | Reranker | Extractor
    max_input_tokens: int
    batcher: MicroBatcher | None = None  # None for extractors
    pending: int = 0  # extraction requests waiting for or in a model call
    pair_formatter: object | None = None  # rerankers: their PairFormatter, without truncation

    @property
    def loaded(self):
        return self.model.loaded


@dataclass
class ServingState:
    """What the app knows at run time; on `app.state.qtune`."""

    models: dict[str, ServedModel]
    settings: ServerSettings
    matcher: object | None
    ready: bool = False
    draining: bool = False
    executor: ThreadPoolExecutor | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def _kind(model) -> str:
    from qtune.api import PairClassifier
    from qtune.modeling.embedding import Embedder
    from qtune.modeling.reranker import Reranker
    from qtune.tasks.extraction import Extractor

    if isinstance(model, Embedder):
        return "embedding"
    if isinstance(model, PairClassifier):
        return "pair-cls"
    if isinstance(model, Reranker):
        return "reranker"
    if isinstance(model, Extractor):
        return "extract"
    raise QtuneError(f"cannot serve a {type(model).__name__}: expected an Embedder, a PairClassifier, "
                     "a Reranker or an Extractor")


def _runner(entry: ServedModel):
    if entry.kind == "embedding":
        return embedding_runner(entry.loaded)
    if entry.kind == "pair-cls":
        return classifier_runner(entry.loaded)
    return reranker_runner(entry.loaded, entry.model.formatter.prompt)


def _queue_depth(entry: ServedModel) -> int:
    return entry.batcher.pending if entry.batcher is not None else entry.pending


def _token_limit(loaded, settings: ServerSettings) -> int:
    """The settings' limit, never above what the model can take (its max_length and positions)."""
    limits = [loaded.meta.max_length]
    positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    if settings.max_input_tokens is not None:
        limits.append(settings.max_input_tokens)
    return min(limits)


def _metrics(state: ServingState):
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()  # one per app: no process-wide state
    m = {
        "registry": registry,
        "requests": Counter("qtune_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                            registry=registry),
        "batches": Counter("qtune_batches", "Model calls made by the micro-batcher", ["model"], registry=registry),
        "batch_size": Histogram("qtune_batch_size", "Rows per model call", ["model"], registry=registry,
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)),
        "queue": Gauge("qtune_queue_depth", "Requests waiting for or in a model call", ["model"], registry=registry),
        "in_progress": Gauge("qtune_requests_in_progress", "HTTP requests being answered", registry=registry),
    }
    for name, entry in state.models.items():
        m["queue"].labels(model=name).set_function(lambda entry=entry: _queue_depth(entry))
    return m


def create_app(models: dict[str, object], settings: ServerSettings, matcher=None) -> FastAPI:
    """An app serving `models` (public name -> loaded Embedder, PairClassifier, Reranker or Extractor)."""
    served = {}
    for name, model in models.items():
        kind = _kind(model)
        model.loaded.model.eval()
        served[name] = ServedModel(name, kind, model, _token_limit(model.loaded, settings))
        if kind == "reranker":
            # Within the token limit (never above the model's max_length) nothing would be cut, so
            # these features equal `Reranker.features`; longer pairs are counted and refused.
            formatter = copy.copy(model.formatter)
            formatter.max_length = NO_LIMIT
            served[name].pair_formatter = formatter
    state = ServingState(served, settings, matcher)
    metrics = _metrics(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtune-model")
        for entry in served.values():
            if entry.kind == "extract":
                continue  # generation runs per request on the model thread, not micro-batched

            def on_call(rows: int, name=entry.name) -> None:
                metrics["batches"].labels(model=name).inc()
                metrics["batch_size"].labels(model=name).observe(rows)

            entry.batcher = MicroBatcher(_runner(entry), state.executor,
                                         max_batch_tokens=settings.max_batch_tokens,
                                         max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                                         on_call=on_call)
            entry.batcher.start()
        state.draining, state.ready = False, True
        try:
            yield
        finally:
            # uvicorn gets here after in-flight requests finished; anything later is refused.
            state.draining, state.ready = True, False
            for entry in served.values():
                if entry.batcher is not None:
                    await entry.batcher.stop()
            state.executor.shutdown(wait=True)

    app = FastAPI(title="qtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qtune = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        return _api_error_response(_validation_api_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        message = "not found" if error.status_code == 404 else str(error.detail)
        type_ = ERROR_TYPES.get(error.status_code, "invalid_request_error")
        return JSONResponse(error_body(message, type_), status_code=error.status_code)

    @app.middleware("http")
    async def gate(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in ENDPOINTS else "other"
        metrics["in_progress"].inc()
        try:
            response = _refusal(state, request)
            if response is None:
                response = await call_next(request)
        except Exception:  # last resort: a bug, never bad input (that is an ApiError)
            logger.exception("unhandled error answering %s", path)
            response = JSONResponse(error_body("internal server error", "server_error"), status_code=500)
        finally:
            metrics["in_progress"].dec()
        metrics["requests"].labels(endpoint=endpoint, status=str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        answer = {"status": "ok", "models": {name: entry.kind for name, entry in served.items()}}
        if state.matcher is not None:
            answer["match"] = {"rescored_by": getattr(state.matcher, "rescored_by", None),
                               "threshold": getattr(state.matcher, "threshold", None)}
        return answer

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics["registry"]), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "qtune", "task": entry.kind}
            for name, entry in served.items()]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = _parse(EmbeddingRequest, await _read_json(request, settings))
        entry = _pick(served, body.model, "embedding")
        features = _embedding_features(entry, body.input, is_query=body.input_type == "query", settings=settings)
        width = entry.model.dimension
        if body.dimensions is not None and body.dimensions > width:
            raise ApiError(422, f"dimensions must be between 1 and the model's {width}, got {body.dimensions}",
                           param="dimensions", code="invalid_dimensions")
        vectors = await _submit(entry, features)  # (n, width), L2-normalised
        if body.dimensions is not None:  # Matryoshka: truncate, then renormalise
            vectors = vectors[:, :body.dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return {"object": "list", "model": entry.name,
                "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": _usage(features)}

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = _parse(ClassifyRequest, await _read_json(request, settings))
        entry = _pick(served, body.model, "pair-cls")
        features = _pair_features(entry, body.input, settings)
        probs = await _submit(entry, features)  # (n, labels)
        labels = entry.model.labels
        return {"object": "list", "model": entry.name,
                "data": [{"index": i, "label": labels[int(p.argmax())], "probs": [float(x) for x in p]}
                         for i, p in enumerate(probs)],
                "usage": _usage(features)}

    @app.post("/v1/rerank")
    async def rerank(request: Request):
        body = _parse(RerankRequest, await _read_json(request, settings))
        entry = _pick(served, body.model, "reranker")
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        features = _rerank_features(entry, body.query, documents, settings)
        scores = (await _submit(entry, features))[:, 0]  # (n,) in [0, 1]
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
        answer = {"id": f"rerank-{uuid.uuid4().hex}", "model": entry.name,
                  "usage": _usage(features), "results": results}
        if threshold is not None:
            answer["threshold"] = float(threshold)
        return answer

    @app.post("/v1/extract")
    async def extract(request: Request):
        body = _parse(ExtractRequest, await _read_json(request, settings))
        entry = _pick(served, body.model, "extract")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise ApiError(400, "input must not be empty", param="input", code="empty_input")
        _check_count(texts, settings)
        for i, text in enumerate(texts):
            if not text:
                raise ApiError(400, f"input {i} is empty", param="input", code="empty_input")
        cap = settings.max_new_tokens
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, cap) if body.max_new_tokens is None else body.max_new_tokens
        if max_new_tokens > cap:
            raise ApiError(422, f"max_new_tokens must be between 1 and {cap}, got {max_new_tokens}",
                           param="max_new_tokens", code="invalid_max_new_tokens")
        prompts = [{"input_ids": entry.model.builder.prompt_ids(t)} for t in texts]
        _check_lengths(prompts, entry.max_input_tokens, note=" with the extraction prompt")
        if entry.pending >= settings.max_queue:
            raise ApiError(429, f"too many requests waiting for model {entry.name!r}: {settings.max_queue} "
                                "requests are already waiting for this model; retry later", code="queue_full")
        loop = asyncio.get_running_loop()
        entry.pending += 1
        try:  # one call per request: generation is slow and stateful, so it is not micro-batched
            found = await loop.run_in_executor(state.executor, functools.partial(
                entry.model.extract_prompts, [p["input_ids"] for p in prompts], batch_size=settings.extract_batch_size,
                max_new_tokens=max_new_tokens))
        finally:
            entry.pending -= 1
        metrics["batches"].labels(model=entry.name).inc()
        metrics["batch_size"].labels(model=entry.name).observe(len(texts))
        data = []
        for i, result in enumerate(found):
            row = {"index": i, "output": result.output}
            if result.error is not None:  # an answer that did not parse: this row's problem, not the request's
                row["error"] = result.error
                row["raw"] = result.text
            data.append(row)
        return {"object": "list", "model": entry.name, "data": data,
                "usage": _usage(prompts, generated=sum(r.tokens for r in found))}

    @app.post("/v1/match")
    async def match(request: Request):
        if state.matcher is None:
            raise ApiError(404, "no knowledge base loaded", code="model_not_found")
        body = _parse(MatchRequest, await _read_json(request, settings))
        if not body.query.strip():
            raise ApiError(400, "query must not be empty", param="query", code="empty_input")
        loop = asyncio.get_running_loop()
        try:  # the matcher embeds the query: it runs on the model thread like every torch call
            return await loop.run_in_executor(state.executor, state.matcher.match, body.query, body.top_k,
                                              body.threshold)
        except QtuneError as error:
            raise ApiError(422, str(error)) from None

    return app


class MatchRequest(BaseModel):
    query: str
    top_k: int | None = None
    threshold: float | None = None


def _api_error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _refusal(state: ServingState, request: Request) -> JSONResponse | None:
    """503 while starting or draining, 401 without the API key; None lets the request through."""
    if state.draining or not state.ready:
        reason = "the server is shutting down" if state.draining else "the server is not ready yet"
        return _api_error_response(ApiError(503, reason, code="unavailable"))
    key = state.settings.api_key
    if key is not None and request.url.path.startswith("/v1/"):
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not _same(token.strip(), key):
            message = "missing API key: send 'Authorization: Bearer <key>'" if not header else "invalid API key"
            return _api_error_response(ApiError(401, message, code="invalid_api_key"))
    return None


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


async def _read_json(request: Request, settings: ServerSettings) -> dict:
    limit = settings.max_body_bytes
    too_large = ApiError(413, f"request body is larger than the limit of {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():  # the declared length may lie, or be absent (chunked)
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "request body is empty; expected a JSON object", code="empty_body")
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"malformed JSON: {error}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return payload


def _parse(schema: type[BaseModel], payload: dict):
    try:
        return schema.model_validate(payload)
    except ValidationError as error:
        raise _validation_api_error(error.errors(), getattr(schema, "union_messages", {})) from None


def _validation_api_error(errors, union_messages: dict[str, str] | None = None) -> ApiError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = loc[0] if loc else None
    where = ".".join(loc)
    if len(errors) > 1 and param is not None and all(str(e.get("loc", ("",))[0]) == param for e in errors):
        # a Union field: pydantic reports one failure per alternative; say what is accepted instead
        message = (union_messages or {}).get(param) or \
            f"{param}: invalid value ({errors[0]['msg']}; {len(errors)} alternatives tried)"
    else:
        message = f"{where}: {first['msg']}" if where else first["msg"]
    return ApiError(422, message, param=param, code="invalid_field")


def _pick(served: dict[str, ServedModel], name: str | None, kind: str) -> ServedModel:
    """The named model, or the only one of this kind when `model` was omitted."""
    candidates = [e for e in served.values() if e.kind == kind]
    if name is None:
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ApiError(404, f"no {KINDS[kind][KINDS[kind].index(' ') + 1:]} loaded", param="model",
                           code="model_not_found")
        raise ApiError(422, f"model is required: several are loaded ({', '.join(e.name for e in candidates)})",
                       param="model", code="model_required")
    entry = served.get(name)
    if entry is None:
        known = ", ".join(e.name for e in candidates) or "none"
        raise ApiError(404, f"model {name!r} is not loaded (loaded: {known})", param="model",
                       code="model_not_found")
    if entry.kind != kind:
        raise ApiError(404, f"model {name!r} is {KINDS[entry.kind]}, not {KINDS[kind]}", param="model",
                       code="model_not_found")
    return entry


def _embedding_features(entry: ServedModel, value, *, is_query: bool, settings: ServerSettings) -> list[dict]:
    """Validated, unpadded features for `input`: texts are tokenized as `Embedder.features` does
    (without truncating, so too-long inputs are reported), token ids are taken as given."""
    from qtune.modeling.embedding import format_text, tokenize_texts

    if isinstance(value, str):
        value = [value]
    elif value and isinstance(value[0], int):
        value = [value]  # one input given as token ids
    if not value:
        raise ApiError(400, "input must not be empty", param="input", code="empty_input")
    _check_count(value, settings)
    for i, item in enumerate(value):
        if len(item) == 0:
            raise ApiError(400, f"input {i} is empty", param="input", code="empty_input")
    loaded = entry.loaded
    tokenizer, is_decoder = loaded.tokenizer, loaded.family.is_decoder
    if isinstance(value[0], str):
        texts = [format_text(t, is_query=is_query, instruction=loaded.meta.query_instruction, is_decoder=is_decoder)
                 for t in value]
        # Bounded by the body size limit; huge max_length means: count, do not cut.
        features = tokenize_texts(tokenizer, texts, max_length=10 ** 9, is_decoder=is_decoder)
        features = [_model_inputs(tokenizer, f) for f in features]
    else:
        vocab = loaded.model.get_input_embeddings().num_embeddings
        for i, ids in enumerate(value):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(422, f"input {i} has token id {bad}; ids must be between 0 and {vocab - 1}",
                               param="input", code="invalid_token_id")
        features = [_model_inputs(tokenizer, {"input_ids": list(ids)}) for ids in value]
    _check_lengths(features, entry.max_input_tokens)
    return features


def _usage(features: list[dict], generated: int | None = None) -> dict:
    """OpenAI-style token counts: the inputs' tokens (prompts included), plus what was generated."""
    prompt = sum(len(f["input_ids"]) for f in features)
    if generated is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _check_count(value: list, settings: ServerSettings, param: str = "input") -> None:
    if len(value) > settings.max_inputs:
        noun = "inputs" if param == "input" else param
        raise ApiError(422, f"too many {noun}: {len(value)}; the limit is {settings.max_inputs} per request",
                       param=param, code="too_many_inputs")


def _model_inputs(tokenizer, feature: dict) -> dict:
    """The same keys for text and token-id inputs, so they pad together in one batch."""
    ids = feature["input_ids"]
    out = {"input_ids": ids, "attention_mask": [1] * len(ids)}
    if "token_type_ids" in tokenizer.model_input_names:
        out["token_type_ids"] = feature.get("token_type_ids", [0] * len(ids))
    return out


def _pair_features(entry: ServedModel, value, settings: ServerSettings) -> list[dict]:
    from qtune.tasks.pair_classification import PairEncoder

    if isinstance(value, str) or (value and isinstance(value[0], str)):
        raise ApiError(422, f"model {entry.name!r} is a pair classifier: input must be a list of pairs "
                            "[[text_a, text_b], ...], not single texts", param="input", code="pairs_required")
    if not value:
        raise ApiError(400, "input must not be empty", param="input", code="empty_input")
    _check_count(value, settings)
    for i, pair in enumerate(value):
        if len(pair) != 2:
            raise ApiError(422, f"input {i} has {len(pair)} texts; each input must be a pair [text_a, text_b]",
                           param="input", code="pairs_required")
    loaded = entry.loaded
    # Untruncated, to report too-long pairs; within the limit this equals the truncating encoder.
    encoder = PairEncoder(loaded.tokenizer, loaded.family.is_decoder, max_length=None)
    features = [dict(encoder.encode(a, b)) for a, b in value]
    _check_lengths(features, entry.max_input_tokens)
    return features


def _check_lengths(features: list[dict], limit: int, note: str = "") -> None:
    for i, f in enumerate(features):
        if len(f["input_ids"]) > limit:
            raise ApiError(422, f"input {i} has {len(f['input_ids'])} tokens{note}; the limit is {limit}",
                           param="input", code="input_too_long")


def _rerank_features(entry: ServedModel, query: str, documents: list[str], settings: ServerSettings) -> list[dict]:
    """Validated, unpadded (query, document) features, as `Reranker.features` makes them."""
    if not query.strip():
        raise ApiError(400, "query must not be empty", param="query", code="empty_input")
    if not documents:
        raise ApiError(400, "documents must not be empty", param="documents", code="empty_input")
    _check_count(documents, settings, param="documents")
    for i, document in enumerate(documents):
        if not document:
            raise ApiError(400, f"document {i} is empty", param="documents", code="empty_input")
    features = [entry.pair_formatter.encode(query, d) for d in documents]
    prompt = " with the reranker prompt" if entry.pair_formatter.prompt is not None else ""
    for i, f in enumerate(features):
        if len(f["input_ids"]) > entry.max_input_tokens:
            raise ApiError(422, f"document {i} has {len(f['input_ids'])} tokens together with the query{prompt}; "
                                f"the limit is {entry.max_input_tokens}", param="documents", code="input_too_long")
    return features


async def _submit(entry: ServedModel, features: list[dict]) -> np.ndarray:
    try:
        return await entry.batcher.submit(features)
    except QueueFullError as error:
        raise ApiError(429, f"too many requests waiting for model {entry.name!r}: {error}; retry later",
                       code="queue_full") from None


def _encode(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def serve(models: dict[str, object], settings: ServerSettings, matcher=None) -> None:
    """Run the app with uvicorn until SIGTERM/SIGINT: stop accepting, finish in-flight requests, return."""
    import uvicorn

    app = create_app(models, settings, matcher)
    state: ServingState = app.state.qtune

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # requests on open keep-alive connections now get 503
            super().handle_exit(sig, frame)

    server = DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           timeout_graceful_shutdown=None))
    # uvicorn re-raises the signal it caught once it has shut down, which would kill the process
    # with that signal; a graceful shutdown should end like a normal return (exit code 0).
    main = threading.current_thread() is threading.main_thread()
    previous = {}
    if main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
