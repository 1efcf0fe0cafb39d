"""What the server knows at run time (`ServingState`: the served models, their queues, the model
thread and the prep threads), its Prometheus metrics, and `ModelCalls`: the server's side of a task's
request handler, through which every model call, tokenization and answer runs.

Every model call runs on one model thread; parsing, tokenizing and writing answers run on a small
pool of "prep" threads (not the model thread, where they would wait behind model calls). A request
waiting for a model call counts in its model's queue; past `max_queue` it is answered 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from qtune.errors import QtuneError
from qtune.serving.batcher import BatcherStopped, MicroBatcher, QueueFullError
from qtune.serving.schemas import ApiError, ServerSettings
from qtune.tasks import TASKS, Task

MATCH_QUEUE = "/v1/match"  # the queue-depth label of FAQ matching (no model name starts with it)


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



def task_of(model) -> Task:
    """The registered task whose wrapper `model` is (the wrapper a `qtune.load` returned)."""
    name = getattr(getattr(getattr(model, "loaded", None), "meta", None), "task", None)
    if name in TASKS:
        return TASKS[name]
    kinds = ", ".join(t.kind for t in TASKS.values())
    raise QtuneError(f"cannot serve a {type(model).__name__}: expected a model loaded by qtune.load ({kinds})")



def _queue_depth(entry: ServedModel) -> int:
    return entry.batcher.pending if entry.batcher is not None else entry.pending


def token_limit(loaded, settings: ServerSettings) -> int:
    """The settings' limit, never above what the model can take (its max_length and positions)."""
    limits = [loaded.meta.max_length]
    positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    if settings.max_input_tokens is not None:
        limits.append(settings.max_input_tokens)
    return min(limits)


def prometheus_metrics(state: ServingState):
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
        return await self.prepare(holding, [lock], fn, entry, *args, **kwargs)


def holding(locks: list[threading.Lock], fn, *args, **kwargs):
    """`fn(*args, **kwargs)` holding `locks` (taken in one order: two callers never wait for each other's)."""
    with contextlib.ExitStack() as held:
        for lock in sorted(set(locks), key=id):
            held.enter_context(lock)
        return fn(*args, **kwargs)

