"""The FastAPI app: every endpoint the served models' tasks expose (`/v1/embeddings`,
`/v1/classify`, `/v1/rerank`, `/v1/extract`, ...), plus `/v1/match`, `/v1/models`, `/health`, `/metrics`,
and `serve`, which runs it with uvicorn until SIGTERM.

This module wires the parts together: the state and the model calls (`qtune.serving.state`), the
gate every request passes and the body limits (`qtune.serving.gate`), the routes and the model each
request goes to (`qtune.serving.routing`), FAQ matching (`qtune.serving.match`). Wrappers that
declare `micro_batched` (`qtune.modeling.inference`) are micro-batched through `run_batch`
(`qtune.serving.batcher`); every failure is answered in the one error shape
`{"error": {message, type, param, code}}`.

The event loop only moves bytes: parsing JSON, validating it, tokenizing and writing the answer run
on a small pool of "prep" threads (not the model thread, where they would wait behind model calls),
so `/health` answers at once whatever the other requests are. A client that hangs up has its work
cancelled (rows not yet computed leave the batcher) and is counted as status 499.
"""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from qtune.serving.batcher import MicroBatcher
from qtune.serving.gate import (CLIENT_CLOSED, ClientGone, Gate, api_error_response, decode, parse, read_body,
                                render, validation_api_error, while_connected)
from qtune.serving.match import MatchRequest, answer_match
from qtune.serving.routing import FIXED_ENDPOINTS, openapi_document, pick_model, request_body, task_routes
from qtune.serving.schemas import ERROR_TYPES, ApiError, ServerSettings, error_body
from qtune.serving.state import ModelCalls, ServedModel, ServingState, prometheus_metrics, task_of, token_limit

PREP_THREADS = 2  # JSON parsing, validation, tokenization and answers: off the event loop, beside the model thread


def create_app(models: dict[str, object], settings: ServerSettings, matcher=None) -> FastAPI:
    """An app serving `models` (public name -> a wrapper from `qtune.load`: Embedder, PairClassifier, ...)."""
    served = {}
    for name, model in models.items():
        task = task_of(model)
        model.loaded.model.eval()
        served[name] = ServedModel(name, task, model, token_limit(model.loaded, settings))
    state = ServingState(served, settings, matcher)
    metrics = prometheus_metrics(state)
    calls = ModelCalls(state, metrics)
    routes = task_routes()
    endpoints = (*routes, *FIXED_ENDPOINTS)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtune-model")
        state.prep = ThreadPoolExecutor(max_workers=PREP_THREADS, thread_name_prefix="qtune-prep")
        for entry in served.values():
            if not entry.model.micro_batched:
                continue  # e.g. generation: one model call per request, not micro-batched
            entry.batcher = MicroBatcher(entry.model.run_batch, state.executor, max_batch_tokens=settings.max_batch_tokens,
                                         max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                                         target_call_ms=settings.target_call_ms, padding_free=entry.model.padding_free,
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
        return api_error_response(validation_api_error(error.errors()))

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
                raw = await read_body(request, settings)
                first = handlers[0][1].request
                # field errors first, whichever model is loaded
                payload, body = await calls.prepare(decode, raw, first)
                entry, endpoint = pick_model(served, handlers, body)
                if endpoint.request is not first:
                    body = await calls.prepare(parse, endpoint.request, payload)
                result = await while_connected(request, endpoint.handle(calls, entry, body))
                return await calls.prepare(render, result)
            return route

        app.post(path, openapi_extra=request_body(*(endpoint.request for _, endpoint in handlers)))(answer())

    @app.post("/v1/match", openapi_extra=request_body(MatchRequest))
    async def match(request: Request):
        return await answer_match(calls, request)

    app.openapi = lambda: openapi_document(app, [MatchRequest, *(e.request for hs in routes.values() for _, e in hs)])
    return app


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
