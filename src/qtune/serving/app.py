"""The FastAPI app: every endpoint the served models' tasks expose (`/v1/embeddings`,
`/v1/classify`, `/v1/rerank`, `/v1/extract`, ...), plus `/v1/match`, `/v1/models`, `/health`, `/metrics`.

Which paths exist and how each request is answered come from the task registry (each task's
`endpoints()`); this module routes a request to a served model, micro-batches wrappers that have a
batch function (`run_batch`), runs every model call on one model thread, and answers every failure
in the one error shape `{"error": {message, type, param, code}}`. Request bodies are read and parsed
here (not by FastAPI) so that a too-large body and a bad field alike get that shape; each route's
request model is attached to the OpenAPI document (`/openapi.json`) by hand for the same reason.

The event loop only moves bytes: parsing JSON, validating it, tokenizing and writing the answer run
on a small pool of "prep" threads (not the model thread, where they would wait behind model calls),
so `/health` answers at once whatever the other requests are. A client that hangs up has its work
cancelled (rows not yet computed leave the batcher) and is counted as status 499.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from qtune.errors import QtuneError
from qtune.serving.batcher import BatcherStopped, MicroBatcher, QueueFullError
from qtune.serving.schemas import ERROR_TYPES, ApiError, ServerSettings, error_body
from qtune.tasks import TASKS, Endpoint, Task
from qtune.tasks.requests import FiniteFloat
from qtune.tasks.requests import Request as RequestBody

logger = logging.getLogger("qtune.serving")

FIXED_ENDPOINTS = ("/v1/match", "/v1/models", "/health", "/metrics", "/openapi.json")
MATCH_QUEUE = "/v1/match"  # the queue-depth label of FAQ matching (no model name starts with it)
PREP_THREADS = 2  # JSON parsing, validation, tokenization and answers: off the event loop, beside the model thread
MAX_JSON_DEPTH = 32  # the deepest request is 3 levels (a list of pairs); deeper bodies are refused
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"
# /v1/match rescores its candidates in model calls of at most this many tokens (a 512-token reranker:
# 4 of 100 candidates at a time), so that a top_k of 100 does not hold the model thread for seconds.
MATCH_CALL_TOKENS = 2048


@dataclass
class ServedModel:
    name: str
    task: Task
    model: object  # the task's inference wrapper (`Task.wrap`)
    max_input_tokens: int
    batcher: MicroBatcher | None = None  # None for wrappers without a batch function (extraction)
    pending: int = 0  # requests waiting for or in a one-per-request model call

    @property
    def kind(self) -> str:
        return self.task.name

    @property
    def loaded(self):
        return self.model.loaded


@dataclass
class Waiting:
    """Requests waiting for or in a one-per-request model call (FAQ matching)."""

    name: str
    pending: int = 0


@dataclass
class ServingState:
    """What the app knows at run time; on `app.state.qtune`."""

    models: dict[str, ServedModel]
    settings: ServerSettings
    matcher: object | None
    ready: bool = False
    draining: bool = False
    executor: ThreadPoolExecutor | None = None  # the model thread
    prep: ThreadPoolExecutor | None = None  # parsing, tokenization, answers
    # A fast tokenizer sets its truncation and padding on state its calls share, then encodes: two
    # threads using one tokenizer at once could get each other's settings. Whoever tokenizes holds
    # that tokenizer's lock; models with tokenizers of their own do not wait for each other.
    tokenizer_locks: dict[int, tuple[object, threading.Lock]] = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock)
    match_queue: Waiting = field(default_factory=lambda: Waiting(MATCH_QUEUE))
    created: int = field(default_factory=lambda: int(time.time()))

    def tokenizer_lock(self, tokenizer) -> threading.Lock:
        with self.guard:
            # keyed by identity; the tokenizer is kept so that its id is not reused by another
            _, lock = self.tokenizer_locks.setdefault(id(tokenizer), (tokenizer, threading.Lock()))
            return lock


def _task_of(model) -> Task:
    """The registered task whose wrapper `model` is (the wrapper a `qtune.load` returned)."""
    name = getattr(getattr(getattr(model, "loaded", None), "meta", None), "task", None)
    if name in TASKS:
        return TASKS[name]
    kinds = ", ".join(t.kind for t in TASKS.values())
    raise QtuneError(f"cannot serve a {type(model).__name__}: expected a model loaded by qtune.load ({kinds})")


def _noun(kind: str) -> str:
    return kind.split(" ", 1)[1]


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
    if state.matcher is not None:
        m["queue"].labels(model=MATCH_QUEUE).set_function(lambda: state.match_queue.pending)
    return m


class ModelCalls:
    """The server's side of a task's request handler (see `qtune.tasks.base.Endpoint`)."""

    def __init__(self, state: ServingState, metrics: dict):
        self.state, self.metrics = state, metrics

    @property
    def settings(self) -> ServerSettings:
        return self.state.settings

    def counted(self, name: str, rows: int) -> None:
        self.metrics["batches"].labels(model=name).inc()
        self.metrics["batch_size"].labels(model=name).observe(rows)

    async def submit(self, entry: ServedModel, features: list[dict]) -> np.ndarray:
        """(len(features), width) rows of the wrapper's batch function, micro-batched with other requests."""
        try:
            return await entry.batcher.submit(features)
        except QueueFullError as error:
            raise ApiError(429, f"too many requests waiting for model {entry.name!r}: {error}; retry later",
                           code="queue_full") from None
        except BatcherStopped:
            raise ApiError(503, "the server is shutting down", code="unavailable") from None

    async def run(self, entry: ServedModel, fn, *args, rows: int = 1):
        """`fn(*args)` as one model call on the model thread (for work that is not micro-batched)."""
        result = await self.one_call(entry, f"model {entry.name!r}", fn, *args)
        self.counted(entry.name, rows)
        return result

    async def one_call(self, waiting, what: str, fn, *args):
        """`fn(*args)` on the model thread, counted in `waiting.pending`; 429 past `max_queue`.
        Cancelled before it starts (the client went away), it never runs."""
        with self.queued(waiting, what):
            return await asyncio.get_running_loop().run_in_executor(self.state.executor, fn, *args)

    @contextlib.contextmanager
    def queued(self, waiting, what: str):
        """Counts a request in `waiting.pending` while the block runs; 429 past `max_queue`."""
        limit = self.settings.max_queue
        if waiting.pending >= limit:
            raise ApiError(429, f"too many requests waiting for {what}: {limit} requests are already waiting; "
                                "retry later", code="queue_full")
        waiting.pending += 1
        try:
            yield
        finally:
            waiting.pending -= 1

    async def prepare(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` on a prep thread: CPU work (tokenizing, parsing) that must not hold up
        the event loop, nor wait behind model calls."""
        return await asyncio.get_running_loop().run_in_executor(self.state.prep, lambda: fn(*args, **kwargs))

    async def tokenize(self, fn, entry: ServedModel, *args, **kwargs):
        """`prepare(fn, entry, *args, **kwargs)` for work that tokenizes with the served model `entry`'s
        tokenizer: one call at a time per tokenizer (`ServingState.tokenizer_lock`)."""
        lock = self.state.tokenizer_lock(entry.model.loaded.tokenizer)
        return await self.prepare(_holding, [lock], fn, entry, *args, **kwargs)


def _routes() -> dict[str, list[tuple[Task, Endpoint]]]:
    """path -> the (task, endpoint) pairs answering it, in registry order."""
    routes: dict[str, list[tuple[Task, Endpoint]]] = {}
    for task in TASKS.values():
        for endpoint in task.endpoints():
            routes.setdefault(endpoint.path, []).append((task, endpoint))
    return routes


class Gate:
    """Every HTTP request passes here first (a plain ASGI middleware, no task per request): 503
    while starting or draining, 401 without the API key, the request metrics, and a JSON 500 if a
    bug escapes (never for bad input: that is an ApiError, answered inside; never for a client
    that hung up: that is a 499)."""

    def __init__(self, app, *, state: ServingState, metrics: dict, endpoints: tuple[str, ...]):
        self.app, self.state, self.metrics, self.endpoints = app, state, metrics, endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = None

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics["in_progress"].inc()
        try:
            refusal = _refusal(self.state, Request(scope))
            await (refusal or self.app)(scope, receive, send_status)
        except Exception:  # last resort: a bug, never bad input
            logger.exception("unhandled error answering %s", path)
            if status is None:  # nothing sent yet: the client still gets the JSON error shape
                await JSONResponse(error_body("internal server error", "server_error"), status_code=500)(
                    scope, receive, send_status)
        finally:
            self.metrics["in_progress"].dec()
            endpoint = path if path in self.endpoints else "other"
            self.metrics["requests"].labels(endpoint=endpoint, status=str(status or 500)).inc()


def create_app(models: dict[str, object], settings: ServerSettings, matcher=None) -> FastAPI:
    """An app serving `models` (public name -> a wrapper from `qtune.load`: Embedder, PairClassifier, ...)."""
    served = {}
    for name, model in models.items():
        task = _task_of(model)
        model.loaded.model.eval()
        served[name] = ServedModel(name, task, model, _token_limit(model.loaded, settings))
    state = ServingState(served, settings, matcher)
    metrics = _metrics(state)
    calls = ModelCalls(state, metrics)
    routes = _routes()
    endpoints = (*routes, *FIXED_ENDPOINTS)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtune-model")
        state.prep = ThreadPoolExecutor(max_workers=PREP_THREADS, thread_name_prefix="qtune-prep")
        for entry in served.values():
            run_batch = getattr(entry.model, "run_batch", None)
            if run_batch is None:
                continue  # e.g. generation: one model call per request, not micro-batched
            entry.batcher = MicroBatcher(run_batch, state.executor, max_batch_tokens=settings.max_batch_tokens,
                                         max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                                         target_call_ms=settings.target_call_ms,
                                         on_call=lambda rows, name=entry.name: calls.counted(name, rows))
            entry.batcher.start()
        state.draining, state.ready = False, True
        try:
            yield
        finally:
            # uvicorn gets here after in-flight requests finished (or, past the shutdown timeout, were
            # cancelled); anything later is refused.
            state.draining, state.ready = True, False
            for entry in served.values():
                if entry.batcher is not None:
                    await entry.batcher.stop()
            state.executor.shutdown(wait=True)
            state.prep.shutdown(wait=True)

    # No trailing-slash redirects: they would send clients to whatever host the Host header names.
    app = FastAPI(title="qtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  redirect_slashes=False)
    app.state.qtune = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ClientDisconnect)
    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, error: Exception):
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; /metrics counts it

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        return _api_error_response(_validation_api_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        message = "not found" if error.status_code == 404 else str(error.detail)
        type_ = ERROR_TYPES.get(error.status_code, "invalid_request_error")
        return JSONResponse(error_body(message, type_), status_code=error.status_code)

    app.add_middleware(Gate, state=state, metrics=metrics, endpoints=endpoints)

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

    for path, handlers in routes.items():
        def answer(handlers=handlers):
            async def route(request: Request):
                raw = await _read_body(request, settings)
                first = handlers[0][1].request
                # field errors first, whichever model is loaded
                payload, body = await calls.prepare(_decode, raw, first)
                entry, endpoint = _pick(served, handlers, body)
                if endpoint.request is not first:
                    body = await calls.prepare(_parse, endpoint.request, payload)
                result = await _while_connected(request, endpoint.handle(calls, entry, body))
                return await calls.prepare(_render, result)
            return route

        app.post(path, openapi_extra=_request_body(*(endpoint.request for _, endpoint in handlers)))(answer())

    @app.post("/v1/match", openapi_extra=_request_body(MatchRequest))
    async def match(request: Request):
        if state.matcher is None:
            raise ApiError(404, "no knowledge base loaded", code="model_not_found")
        _, body = await calls.prepare(_decode, await _read_body(request, settings), MatchRequest)
        if not body.query.strip():
            raise ApiError(400, "query must not be empty", param="query", code="empty_input")
        if body.top_k is not None and not 1 <= body.top_k <= settings.max_top_k:
            raise ApiError(422, f"top_k must be at least 1 and at most {settings.max_top_k}, got {body.top_k}",
                           param="top_k", code="invalid_top_k")
        try:
            result = await _while_connected(request, _match(calls, state.matcher, body))
        except QtuneError as error:
            if isinstance(error, ApiError):
                raise
            raise ApiError(422, str(error)) from None
        return await calls.prepare(_render, result)

    app.openapi = lambda: _openapi_document(app, [MatchRequest, *(e.request for hs in routes.values() for _, e in hs)])
    return app


async def _match(calls: ModelCalls, matcher, body: MatchRequest) -> dict:
    """`matcher.match` in stages: tokenizing on prep threads (holding the tokenizers' locks), model
    calls and the search on the model thread, rescoring a few candidates per model call so that
    other models' calls run between them. Counted in the match queue throughout."""
    state = calls.state
    locks = [state.tokenizer_lock(t) for t in matcher.tokenizers]
    loop = asyncio.get_running_loop()
    with calls.queued(state.match_queue, "FAQ matching"):
        features = await calls.prepare(_holding, locks, matcher.query_features, body.query)
        hits = await loop.run_in_executor(state.executor, matcher.recall, features, body.top_k)
        scores = None
        if matcher.rescorer is not None and hits:
            pairs = await calls.prepare(_holding, locks, matcher.pair_features, body.query, hits)
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


def _holding(locks: list[threading.Lock], fn, *args, **kwargs):
    """`fn(*args, **kwargs)` holding `locks` (taken in one order: two callers never wait for each other's)."""
    with contextlib.ExitStack() as held:
        for lock in sorted(set(locks), key=id):
            held.enter_context(lock)
        return fn(*args, **kwargs)


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


class MatchRequest(RequestBody):
    """`/v1/match`: the best FAQ entry for `query` among the `top_k` nearest (at most `--max-top-k`)."""

    query: StrictStr
    top_k: StrictInt | None = None
    threshold: FiniteFloat | None = None


def _request_body(*models: type[BaseModel]) -> dict:
    """The OpenAPI `requestBody` of a route that parses its body itself."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in dict.fromkeys(models)]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi_document(app: FastAPI, models: list[type[BaseModel]]) -> dict:
    """FastAPI's document of the routes, with the request models (and the models they nest) added."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in dict.fromkeys(models):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.openapi_schema = document
    return app.openapi_schema


def _api_error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _refusal(state: ServingState, request: Request) -> JSONResponse | None:
    """503 while starting or draining, 401 without the API key; None lets the request through."""
    if state.draining or not state.ready:
        reason = "the server is shutting down" if state.draining else "the server is not ready yet"
        return _api_error_response(ApiError(503, reason, code="unavailable"))
    key = state.settings.api_key
    path = request.url.path
    if key is not None and (path.startswith(("/v1/", "/v2/")) or (path == "/metrics" and not state.settings.metrics_public)):
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not _same(token.strip(), key):
            message = "missing API key: send 'Authorization: Bearer <key>'" if not header else "invalid API key"
            return _api_error_response(ApiError(401, message, code="invalid_api_key"))
    return None


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


async def _read_body(request: Request, settings: ServerSettings) -> bytes:
    """The raw body, at most `max_body_bytes` (413), all of it within `body_timeout_s` (408); a client
    that hangs up meanwhile raises ClientDisconnect (a 499)."""
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
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():  # the declared length may lie, or be absent (chunked)
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {settings.body_timeout_s:g} s",
                       code="body_timeout") from None
    return b"".join(chunks)


def _decode(raw: bytes, schema: type[BaseModel]):
    """(the JSON object, the request model parsed from it); on a prep thread."""
    payload = _load_json(raw)
    return payload, _parse(schema, payload)


def _load_json(raw: bytes) -> dict:
    """A JSON object from strict UTF-8 with no lone surrogates, at most MAX_JSON_DEPTH deep:
    anything else is a 400 here rather than an error in the tokenizer or the answer's encoder."""
    if not raw.strip():
        raise ApiError(400, "request body is empty; expected a JSON object", code="empty_body")
    try:
        text = raw.decode("utf-8")  # strict: surrogates written as UTF-8 bytes are not UTF-8
    except UnicodeDecodeError as error:
        raise ApiError(400, f"malformed JSON: the body is not UTF-8 ({error})", code="invalid_json") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError(400, f"malformed JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"malformed JSON: nested more than {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json") from None
    except ValueError as error:  # an integer of more digits than Python converts
        raise ApiError(400, f"malformed JSON: a number is too long ({error})", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    _check_json_values(payload)
    return payload


def _check_json_values(payload) -> None:
    """400 for nesting deeper than MAX_JSON_DEPTH and for strings with lone surrogates (a `\\ud800`
    escape without its pair): no tokenizer or UTF-8 encoder takes those. Iterative: depth is the point."""
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"malformed JSON: nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "invalid text: a string holds a lone UTF-16 surrogate (an unpaired \\ud800-"
                                    "\\udfff escape)", code="invalid_text") from None


def _render(answer) -> Response:
    """The JSON answer as bytes (on a prep thread: a big answer is megabytes of floats)."""
    if isinstance(answer, Response):
        return answer
    content = json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_plain)
    return Response(content.encode("utf-8"), media_type="application/json")


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


async def _while_connected(request: Request, work):
    """`await work`, unless the client hangs up first: then the work is cancelled (its rows leave the
    batcher's queue, its model call never starts) and ClientGone is raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in (task, gone):
            if not waiting.done():
                waiting.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    if not gone.cancelled():
        gone.exception()  # a failing receive means the connection is gone all the same
    await asyncio.wait({task})  # let the cancelled work unwind before answering
    raise ClientGone()


async def _disconnected(receive) -> None:
    """Returns once the client has hung up (the body was read already: nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


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


def _pick(served: dict[str, ServedModel], handlers: list[tuple[Task, Endpoint]],
          body) -> tuple[ServedModel, Endpoint]:
    """The model a request names, or else the only served model whose task takes this body."""
    by_task = {task.name: endpoint for task, endpoint in handlers}
    kinds = " or ".join(task.kind for task, _ in handlers)
    name = getattr(body, "model", None)
    if name is None:
        candidates = [e for e in served.values() if e.kind in by_task]
        if len(candidates) > 1:  # several tasks share the path: the body's shape decides
            taking = [e for e in candidates if by_task[e.kind].accepts(body)]
            candidates = taking or candidates
        if len(candidates) == 1:
            return candidates[0], by_task[candidates[0].kind]
        if not candidates:
            wanted = [t for t, ep in handlers if ep.accepts(body)] or [t for t, _ in handlers]
            raise ApiError(404, f"no {_noun(wanted[0].kind)} loaded", param="model", code="model_not_found")
        raise ApiError(422, f"model is required: several are loaded ({', '.join(e.name for e in candidates)})",
                       param="model", code="model_required")
    entry = served.get(name)
    if entry is None:
        known = ", ".join(e.name for e in served.values() if e.kind in by_task) or "none"
        raise ApiError(404, f"model {name!r} is not loaded (loaded: {known})", param="model",
                       code="model_not_found")
    if entry.kind not in by_task:
        raise ApiError(404, f"model {name!r} is {entry.task.kind}, not {kinds}", param="model",
                       code="model_not_found")
    return entry, by_task[entry.kind]


def server_config(app, settings: ServerSettings):
    """The uvicorn configuration `serve` runs `app` with."""
    import uvicorn

    from qtune.serving.listen import header_timeout_protocol

    # After SIGTERM in-flight requests get `shutdown_timeout_s`, then are cancelled: a stalled client
    # cannot keep the process alive. Headers that trickle in are cut off after `header_timeout_s`.
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                          timeout_graceful_shutdown=settings.shutdown_timeout_s,
                          http=header_timeout_protocol(settings.header_timeout_s))


def serve(models: dict[str, object], settings: ServerSettings, matcher=None) -> None:
    """Run the app with uvicorn until SIGTERM/SIGINT: stop accepting, finish in-flight requests, return."""
    import uvicorn

    app = create_app(models, settings, matcher)
    state: ServingState = app.state.qtune

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # requests on open keep-alive connections now get 503
            super().handle_exit(sig, frame)

    server = DrainingServer(server_config(app, settings))
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
