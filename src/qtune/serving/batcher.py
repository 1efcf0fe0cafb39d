"""Micro-batching: many concurrent requests, few model calls, and no request starved by another.

One `MicroBatcher` per model, each with one worker task. Requests wait in a pool of rows. When the
worker is idle and a request arrives, it waits up to `max_wait_ms` for company (or until the waiting
rows reach `max_batch_tokens`), then makes model calls one at a time, each picked afresh from the
rows still waiting. It waits only while requests come together: after a call that served one
request alone, the next request that finds the worker idle is computed at once (a client sending
one request at a time would only wait for nobody); requests arriving during that call make the
next call one of several requests, and waiting resumes:

- fairness: requests take turns (round robin): a request is in line from its arrival, and one
  bigger than a call joins the line again when a call that held some of its rows ends, behind the
  requests that arrived during it (a request the end of a call merely cut keeps its place: its
  rest heads the next call). A small request that arrives during a big one goes into the next
  call instead of waiting for all of the big one's rows, and a request split over calls never
  waits behind requests that arrived after its last call (under a steady stream of new requests
  it would otherwise wait for a lull);
- padding: a call's longest row is the longest waiting row of the requests served least so far;
  the call takes rows no longer than that, at most `max_batch_tokens` padded tokens (rows x longest row), and leaves rows
  shorter than half its longest for a later call when that saves at least `min_split_saving`
  padded tokens (one short text among long ones, or one long text among short ones, no longer
  pads every row of the call). A `padding_free` runner (packed batches: its cost follows the real
  tokens) needs none of that: its calls take rows in turn order up to `max_batch_tokens` real
  tokens, so no request's short rows wait a call longer than its long ones;
- abandonment: a request whose caller went away (its future cancelled) is dropped from the pool,
  its rows not yet computed never are;
- call time: with `target_call_ms`, a call holds at most the tokens (as `max_batch_tokens` counts
  them) the model computes in that time, at the speed measured on its earlier calls (the first call holds at most
  `FIRST_CALL_TOKENS`): one big request is many short calls, and the model thread, which every
  model shares, is never held for long by one of them.

Model calls go through an executor with a single thread, shared by all models, so torch never runs
two calls at once and the event loop stays free. The runner is the served wrapper's own batch
function (`run_batch`), the one its Python API runs too, so batched answers equal unbatched ones
(up to float rounding from padding).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Runner = Callable[[list[dict]], np.ndarray]  # unpadded features -> (rows, width) float32

# A model call costs about as much as this many padded tokens whatever its size (kernel launches,
# pooling, copies): splitting rows into two calls to save less padding than that is not worth it.
MIN_SPLIT_SAVING = 256
# Before a model's speed is measured its first call holds at most this many tokens: small on
# any machine, and enough for most requests. Later calls are sized from the measured speed.
FIRST_CALL_TOKENS = 2048
# Calls are never sized below this many tokens: a call costs about MIN_SPLIT_SAVING tokens
# whatever its size, and a small call timed while the machine was busy elsewhere would otherwise
# shrink the next ones.
MIN_CALL_TOKENS = 256


class QueueFullError(Exception):
    """More requests are waiting for this model than `max_queue` allows."""


class BatcherStopped(Exception):
    """The batcher stopped (the server is shutting down) before this request was answered."""


@dataclass(eq=False)
class _Pending:
    features: Sequence[dict]
    future: asyncio.Future
    seq: int  # arrival order
    turn: int = field(init=False)  # place in line: `seq`, then where it joined the line again after a call
    lengths: list[int] = field(init=False)
    tokens: int = field(init=False)
    waiting: list[int] = field(init=False)  # rows not yet in a model call, longest first
    running: int = 0  # rows in the model call now being made
    calls: int = 0  # model calls this request has had rows in
    output: np.ndarray | None = None  # (rows, width), filled call by call

    def __post_init__(self):
        self.turn = self.seq
        self.lengths = [len(f["input_ids"]) for f in self.features]
        self.tokens = sum(self.lengths)
        self.waiting = sorted(range(len(self.features)), key=lambda j: -self.lengths[j])

    @property
    def live(self) -> bool:
        return not self.future.done()


class MicroBatcher:
    def __init__(self, run: Runner, executor, *, max_batch_tokens: int, max_wait_ms: float, max_queue: int,
                 on_call: Callable[[int], None] | None = None, min_split_saving: int = MIN_SPLIT_SAVING,
                 target_call_ms: float | None = None, padding_free: bool = False):
        self.run, self.executor, self.on_call = run, executor, on_call
        self.padding_free = padding_free  # calls cost their real tokens (`run` packs rows): see `next_call`
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait_ms / 1000
        self.target_call_s = None if target_call_ms is None else target_call_ms / 1000
        self.seconds_per_token: float | None = None  # measured on the calls so far (a moving average)
        self._warm = False  # the first call is not timed: it pays for lazy initialisation
        self.max_queue, self.min_split_saving = max_queue, min_split_saving
        self.model_calls = 0  # for /metrics and the tests
        self.pending = 0  # requests submitted and not yet answered (waiting or being computed)
        self._pool: list[_Pending] = []  # requests with rows waiting or running, in arrival order
        self._arrivals = itertools.count()
        self._round = 0  # the place in line (see `_Pending.turn`) the last call's end gave
        self._alone = False  # the last call served one request: an idle worker does not wait for company
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Requests none of whose rows has reached a model call yet."""
        return sum(1 for item in self._pool if item.live and item.calls == 0 and item.running == 0)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for item in self._pool:
            _fail(item, BatcherStopped())
        self._pool.clear()
        self._worker = None

    async def submit(self, features: Sequence[dict]) -> np.ndarray:
        """(len(features), width) rows for these features, in their order. Cancelling the caller
        drops the rows not yet computed."""
        if self._wake is None or self._worker is None or self._worker.done():
            raise RuntimeError("the batcher is not running")
        if self.queued >= self.max_queue:
            raise QueueFullError(f"{self.max_queue} requests are already waiting for this model")
        item = _Pending(features, asyncio.get_running_loop().create_future(), next(self._arrivals))
        if not item.waiting:
            return np.zeros((0, 0), dtype=np.float32)
        self._pool.append(item)
        self._wake.set()
        self.pending += 1
        try:
            return await item.future
        finally:
            self.pending -= 1

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._prune():
                self._wake.clear()
                await self._wake.wait()
                if self._alone:
                    await asyncio.sleep(0)  # the requests submitted in the same turn of the event loop
                else:
                    await self._gather(loop.time() + self.max_wait)
            call = self.next_call()
            if call:
                self._alone = len({id(item) for item, _ in call}) == 1
                await self._run(call)

    def _prune(self) -> bool:
        """Drop answered and abandoned requests; whether any row still waits."""
        self._pool = [item for item in self._pool if item.live and (item.waiting or item.running)]
        return any(item.waiting for item in self._pool)

    async def _gather(self, deadline: float) -> None:
        """Wait for company until `deadline` or until the waiting rows fill a model call."""
        loop = asyncio.get_running_loop()
        while sum(item.tokens for item in self._pool if item.live) < self.call_tokens:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    @property
    def call_tokens(self) -> int:
        """The most tokens of the next model call (as `_cost` counts them)."""
        if self.target_call_s is None:
            return self.max_batch_tokens
        if self.seconds_per_token is None:
            return min(self.max_batch_tokens, FIRST_CALL_TOKENS)
        return min(self.max_batch_tokens, max(MIN_CALL_TOKENS, int(self.target_call_s / self.seconds_per_token)))

    def _timed(self, features: list[dict]) -> np.ndarray:
        """`run(features)`, on the model thread, measuring its speed (not the time spent waiting for the thread)."""
        began = time.perf_counter()
        result = self.run(features)
        if not self._warm:
            self._warm = True
            return result
        measured = (time.perf_counter() - began) / max(self._cost([len(f["input_ids"]) for f in features]), 1)
        previous = self.seconds_per_token
        self.seconds_per_token = measured if previous is None else (previous + measured) / 2
        return result

    def _cost(self, lengths: Sequence[int]) -> int:
        """A call's size in the tokens `max_batch_tokens` counts: real ones for a padding-free
        runner, else rows x the longest row."""
        return sum(lengths) if self.padding_free else len(lengths) * max(lengths, default=0)

    def next_call(self) -> list[tuple[_Pending, int]]:
        """(request, row) pairs of the next model call, taken out of the waiting rows."""
        ready = sorted((item for item in self._pool if item.live and item.waiting), key=lambda i: i.turn)
        if not ready:
            return []
        call = self._padding_free_call(ready) if self.padding_free else self._padded_call(ready)
        taken: dict[int, set[int]] = {}
        for item, j in call:
            taken.setdefault(id(item), set()).add(j)
        for item in ready:
            rows = taken.get(id(item))
            if rows:
                item.waiting = [j for j in item.waiting if j not in rows]
                item.running += len(rows)
                item.calls += 1
        return call

    def _padding_free_call(self, ready: list[_Pending]) -> list[tuple[_Pending, int]]:
        """Rows in turn order while their real tokens fit the call (its first row always does)."""
        budget, used, call = self.call_tokens, 0, []
        for item in ready:
            for j in item.waiting:
                if call and used + item.lengths[j] > budget:
                    return call
                call.append((item, j))
                used += item.lengths[j]
        return call

    def _padded_call(self, ready: list[_Pending]) -> list[tuple[_Pending, int]]:
        """Rows of about one length, sized by padded tokens (see the module's notes on padding)."""
        # The call is cut around the longest row of the requests in line since before the last
        # call ended (this round); that request goes first, so the call surely holds the row its
        # padding is sized for.
        front = [item for item in ready if item.turn < self._round] or ready
        first = max(front, key=lambda item: item.lengths[item.waiting[0]])
        ready = [first, *(item for item in ready if item is not first)]
        longest = first.lengths[first.waiting[0]]
        room = max(1, self.call_tokens // max(longest, 1))
        every, alike = [], []  # the first `room` rows no longer than `longest`; the same without short ones
        for item in ready:
            for j in item.waiting:
                length = item.lengths[j]
                if length > longest:
                    continue
                if len(every) < room:
                    every.append((item, j))
                if 2 * length >= longest and len(alike) < room:
                    alike.append((item, j))
                if len(alike) >= room:
                    break
            if len(alike) >= room:
                break
        short = [item.lengths[j] for item, j in every if 2 * item.lengths[j] < longest]
        saving = len(short) * (longest - max(short)) if short else 0
        return alike if saving >= self.min_split_saving else every

    async def _run(self, call: list[tuple[_Pending, int]]) -> None:
        loop = asyncio.get_running_loop()
        items = list({id(item): item for item, _ in call}.values())
        try:
            result = await loop.run_in_executor(self.executor, self._timed, [item.features[j] for item, j in call])
        except asyncio.CancelledError:  # stopped mid-call: its requests get an answer, not a hang
            for item in items:
                _fail(item, BatcherStopped())
            raise
        except Exception as error:  # noqa: BLE001 -- the model failed: every request in this call learns why
            for item in items:
                item.running = 0
                _fail(item, error)
            return
        self.model_calls += 1
        if self.on_call is not None:
            self.on_call(len(call))
        for (item, j), vector in zip(call, result):  # result: (rows, width)
            item.running -= 1
            if not item.live:
                continue
            if item.output is None:
                item.output = np.zeros((len(item.features), result.shape[1]), dtype=np.float32)
            item.output[j] = vector
        for item in items:
            if item.live and not item.waiting and not item.running:
                item.future.set_result(item.output)
        # the line as it stands when this call ends: requests with rows left that are bigger than a
        # call join it again at its end; a request the call's end merely cut keeps its place (its
        # rest heads the next call rather than waiting behind every request now in line)
        self._round = next(self._arrivals)
        for item in items:
            if item.waiting and self._cost(item.lengths) > self.call_tokens:
                item.turn = self._round


def _fail(item: _Pending, error: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(error)
