"""Micro-batching: many concurrent requests, few model calls.

One `MicroBatcher` per model, each with one asyncio queue and one worker task. The worker takes the
first waiting request, then keeps taking requests until their tokens reach `max_batch_tokens` or
`max_wait_ms` has passed, sorts all their rows by length, cuts them into model calls of at most
`max_batch_tokens` padded tokens, and hands each request its own rows back. Model calls go through
an executor with a single thread, shared by all models, so torch never runs two calls at once and
the event loop stays free.

The runner is the served wrapper's own batch function (`run_batch`), the one its Python API runs
too, so batched answers equal unbatched ones (up to float rounding from padding).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from qtune.data.batching import sorted_batches

Runner = Callable[[list[dict]], np.ndarray]  # unpadded features -> (rows, width) float32


class QueueFullError(Exception):
    """More requests are waiting for this model than `max_queue` allows."""


class BatcherStopped(Exception):
    """The batcher stopped (the server is shutting down) before this request was answered."""


@dataclass
class _Pending:
    features: Sequence[dict]
    future: asyncio.Future
    tokens: int = field(init=False)

    def __post_init__(self):
        self.tokens = sum(len(f["input_ids"]) for f in self.features)


class MicroBatcher:
    def __init__(self, run: Runner, executor, *, max_batch_tokens: int, max_wait_ms: float, max_queue: int,
                 on_call: Callable[[int], None] | None = None):
        self.run, self.executor, self.on_call = run, executor, on_call
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait_ms / 1000
        self.max_queue = max_queue
        self.model_calls = 0  # for /metrics and the tests
        self.pending = 0  # requests submitted and not yet answered (waiting or being computed)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Requests waiting in the queue (not yet taken into a model call)."""
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            _fail(self._queue.get_nowait(), BatcherStopped())
        self._worker = None

    async def submit(self, features: Sequence[dict]) -> np.ndarray:
        """(len(features), width) rows for these features, in their order."""
        if self._queue is None or self._worker is None or self._worker.done():
            raise RuntimeError("the batcher is not running")
        item = _Pending(features, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.max_queue} requests are already waiting for this model") from None
        self.pending += 1
        try:
            return await item.future
        finally:
            self.pending -= 1

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            tokens = items[0].tokens
            deadline = loop.time() + self.max_wait
            while tokens < self.max_batch_tokens:
                remaining = deadline - loop.time()
                try:
                    item = self._queue.get_nowait() if remaining <= 0 else \
                        await asyncio.wait_for(self._queue.get(), remaining)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                items.append(item)
                tokens += item.tokens
            items = [i for i in items if not i.future.done()]  # a client that went away
            if items:
                await self._run(items)

    async def _run(self, items: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        rows = [(i, j, f) for i, item in enumerate(items) for j, f in enumerate(item.features)]
        rows.sort(key=lambda row: -len(row[2]["input_ids"]))  # longest first: little padding per call
        outputs: list[np.ndarray | None] = [None] * len(items)
        try:
            lengths = [len(f["input_ids"]) for _, _, f in rows]
            for start, end in sorted_batches(lengths, max(len(rows), 1), self.max_batch_tokens):
                chunk = rows[start:end]
                result = await loop.run_in_executor(self.executor, self.run, [f for _, _, f in chunk])
                self.model_calls += 1
                if self.on_call is not None:
                    self.on_call(len(chunk))
                for (i, j, _), vector in zip(chunk, result):
                    if outputs[i] is None:
                        outputs[i] = np.zeros((len(items[i].features), result.shape[1]), dtype=np.float32)
                    outputs[i][j] = vector
        except asyncio.CancelledError:  # stopped mid-batch: its requests get an answer, not a hang
            for item in items:
                _fail(item, BatcherStopped())
            raise
        except Exception as error:  # noqa: BLE001 -- the model failed: every request of this batch learns why
            for item in items:
                _fail(item, error)
            return
        for item, out in zip(items, outputs):
            if not item.future.done():
                item.future.set_result(out)


def _fail(item: _Pending, error: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(error)
