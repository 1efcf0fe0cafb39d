"""Server settings and the JSON error shape of the serving contract. Each task's request bodies
live with its handlers (`qtune/tasks/<task>/serve.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from qtune.errors import ERROR_TYPES, RequestError, error_body

ApiError = RequestError  # an error the client caused (or a state it must wait out), answered as JSON

__all__ = ["ERROR_TYPES", "ApiError", "ServerSettings", "error_body"]


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_tokens: int = 16384  # padded tokens (rows x longest row) per model call, at most
    # Model calls are sized from the model's measured speed to take about this long, so that a request
    # of another model (or a small one of this model) waits about this long for the model thread,
    # whatever the size of the request being computed; None: `max_batch_tokens` alone.
    target_call_ms: float | None = 250.0
    max_wait_ms: float = 5.0  # how long the first waiting request may wait for company
    max_queue: int = 1024  # waiting requests per model; more -> 429
    max_inputs: int = 2048  # inputs per request
    max_input_tokens: int | None = None  # None: the model's max_length
    max_body_bytes: int = 8 * 1024 * 1024
    max_new_tokens: int = 512  # /v1/extract: the most a request may ask for; more -> 422
    extract_batch_size: int = 16  # /v1/extract: prompts per generate() call
    api_key: str | None = None
    metrics_public: bool = False  # /metrics without the API key
    max_top_k: int = 100  # /v1/match: the most candidates a request may ask for; more -> 422
    max_request_tokens: int = 262144  # tokens of all inputs of one request; more -> 422
    body_timeout_s: float = 30.0  # the whole body must arrive within this; else 408
    header_timeout_s: float = 10.0  # a request's headers must arrive within this; else 408 and the connection closes
    shutdown_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long, then are cancelled
