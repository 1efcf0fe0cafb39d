"""The edge of every request: the `Gate` each one passes first (503 while starting or draining, 401
without the API key, the request metrics, a JSON 500 if a bug escapes), the body read within its limits
(size, time) and parsed into the route's request model, the answer written as JSON, and the client that
hangs up before its answer (its work cancelled, counted as status 499).

Request bodies are read and parsed here (not by FastAPI) so that a too-large body and a bad field alike
get the one error shape `{"error": {message, type, param, code}}`. The event loop only moves bytes:
`decode`, `parse` and `render` run on the prep threads (`ModelCalls.prepare`).
"""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from qtune.serving.schemas import ApiError, ServerSettings, error_body
from qtune.serving.state import ServingState

logger = logging.getLogger("qtune.serving")

MAX_JSON_DEPTH = 32  # the deepest request is 3 levels (a list of pairs); deeper bodies are refused
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"


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


def _refusal(state: ServingState, request: Request) -> JSONResponse | None:
    """503 while starting or draining, 401 without the API key; None lets the request through."""
    if state.draining or not state.ready:
        reason = "the server is shutting down" if state.draining else "the server is not ready yet"
        return api_error_response(ApiError(503, reason, code="unavailable"))
    key = state.settings.api_key
    path = request.url.path
    if key is not None and (path.startswith(("/v1/", "/v2/")) or (path == "/metrics" and not state.settings.metrics_public)):
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not _same(token.strip(), key):
            message = "missing API key: send 'Authorization: Bearer <key>'" if not header else "invalid API key"
            return api_error_response(ApiError(401, message, code="invalid_api_key"))
    return None


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def api_error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def read_body(request: Request, settings: ServerSettings) -> bytes:
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


def decode(raw: bytes, schema: type[BaseModel]):
    """(the JSON object, the request model parsed from it); on a prep thread."""
    payload = _load_json(raw)
    return payload, parse(schema, payload)


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


def parse(schema: type[BaseModel], payload: dict):
    try:
        return schema.model_validate(payload)
    except ValidationError as error:
        raise validation_api_error(error.errors(), getattr(schema, "union_messages", {})) from None


def validation_api_error(errors, union_messages: dict[str, str] | None = None) -> ApiError:
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


def render(answer) -> Response:
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


async def while_connected(request: Request, work):
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


class ClientGone(Exception):
    """The client hung up before its answer was ready."""
