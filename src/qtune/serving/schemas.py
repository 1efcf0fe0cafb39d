"""Server settings and the JSON error shape of the serving contract. Each task's request bodies
live with its handlers (`qtune/tasks/<task>/serve.py`)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from qtune.config import opt
from qtune.errors import ERROR_TYPES, RequestError, error_body

ApiError = RequestError  # an error the client caused (or a state it must wait out), answered as JSON

__all__ = ["ERROR_TYPES", "ApiError", "CommonServerSettings", "ServerSettings", "error_body"]

_number = "{:g}".format  # --help writes 250.0 as 250


@dataclass(frozen=True, kw_only=True)
class CommonServerSettings:
    """`qtune serve`'s settings for every model: the defaults of the Python API (`qtune.serving.serve`)
    and, with their help texts, the flags of `qtune serve` (`qtune.config.add_config_flags`)."""

    host: str = opt("127.0.0.1", "")  # no help text: --help shows the flag alone
    port: int = opt(8000, "")
    # tokens per model call, at most: padded ones (rows x longest row), or the real ones where the
    # model packs rows of mixed lengths (`InferenceModel.padding_free`)
    max_batch_tokens: int = opt(16384, "tokens per model call")
    # Model calls are sized from the model's measured speed to take about this long, so that a request
    # of another model (or a small one of this model) waits about this long for the model thread,
    # whatever the size of the request being computed; None (the flag's 0): `max_batch_tokens` alone.
    target_call_ms: float | None = opt(250.0, "size model calls from the model's measured speed to take about "
                                       "this long; 0: --max-batch-tokens alone", shown=_number)
    # how long the first waiting request may wait for company
    max_wait_ms: float = opt(5.0, "wait for more requests (not after a call that served one request alone)",
                             shown="{:g} ms".format)
    max_queue: int = opt(1024, "waiting requests before 429")  # per model
    max_inputs: int = opt(2048, "inputs per request")
    max_input_tokens: int | None = opt(None, "tokens per input, at most (None: the model's max_length)", flag=False)
    max_body_bytes: int = opt(8 * 1024 * 1024, "request body limit", shown=lambda size: f"{size / 2**20:g} MiB")
    max_request_tokens: int = opt(262144, "tokens of all inputs of one request; more -> 422")
    max_top_k: int = opt(100, "/v1/match: the largest top_k")  # more -> 422
    body_timeout_s: float = opt(30.0, "seconds for a request body to arrive; later -> 408", flag="body-timeout",
                                shown=_number)
    header_timeout_s: float = opt(10.0, "seconds for a request's headers to arrive; later -> 408 and the "
                                  "connection closes", flag="header-timeout", shown=_number)
    shutdown_timeout_s: float = opt(30.0, "after SIGTERM, seconds in-flight requests get before they are "
                                    "cancelled", flag="shutdown-timeout", shown=_number)
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' (for /v1/* and /metrics)")
    metrics_public: bool = opt(False, "serve /metrics without the API key", negatable=False)


def _server_settings() -> type:
    """`ServerSettings`: the common settings and every registered task's own (`Task.server_settings`,
    e.g. the extractor's max_new_tokens), one flat frozen dataclass, so that `ServerSettings(
    max_new_tokens=64)` and `qtune serve --max-new-tokens 64` need no task named."""
    from qtune.tasks import TASKS

    fields, owner = [], {f.name: "the common settings" for f in dataclasses.fields(CommonServerSettings)}
    for task in TASKS.values():
        if task.server_settings is None:
            continue
        hints = typing.get_type_hints(task.server_settings)
        for f in dataclasses.fields(task.server_settings):
            if f.name in owner:
                raise TypeError(f"server setting {f.name!r} of task {task.name!r} is taken by {owner[f.name]}")
            owner[f.name] = f"task {task.name!r}"
            fields.append((f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata)))
    cls = dataclasses.make_dataclass("ServerSettings", fields, bases=(CommonServerSettings,), frozen=True,
                                     kw_only=True)
    cls.__module__ = __name__
    cls.__doc__ = CommonServerSettings.__doc__ + " With every task's own settings (`Task.server_settings`)."
    return cls


ServerSettings = _server_settings()
