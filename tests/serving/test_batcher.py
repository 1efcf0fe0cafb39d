"""The micro-batcher on its own: answers in request order, and a stop never leaves a request hanging."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from qtune.serving.batcher import BatcherStopped, MicroBatcher


def lengths_runner(features: list[dict]) -> np.ndarray:
    """(rows, 1): each row's length, so every request can check it got its own rows back."""
    return np.array([[len(f["input_ids"])] for f in features], dtype=np.float32)


def test_concurrent_requests_get_their_own_rows_in_order():
    async def main():
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(lengths_runner, executor, max_batch_tokens=10_000, max_wait_ms=20, max_queue=8)
            batcher.start()
            requests = [[{"input_ids": [0] * n} for n in sizes] for sizes in ([3, 1, 2], [5], [4, 4, 1, 7])]
            answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
            await batcher.stop()
            return requests, answers, batcher.model_calls

    requests, answers, calls = asyncio.run(main())
    for request, answer in zip(requests, answers):
        assert answer[:, 0].tolist() == [len(f["input_ids"]) for f in request]
    assert calls == 1  # all three waited for company and went in one model call


def test_a_lone_request_is_not_held_for_company_after_a_lone_call():
    """One request at a time (a client that waits for each answer): the first waits `max_wait_ms`
    (no call has shown whether requests come alone), the ones after a lone call are computed at
    once; requests submitted together still share one call."""
    wait_s = 0.4

    async def main():
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(lengths_runner, executor, max_batch_tokens=10_000, max_wait_ms=wait_s * 1000,
                                   max_queue=8)
            batcher.start()
            await asyncio.sleep(0.01)  # the worker idle, waiting for a request
            seconds = []
            for n in (2, 3, 4):
                began = time.perf_counter()
                await batcher.submit([{"input_ids": [0] * n}])
                seconds.append(time.perf_counter() - began)
            calls = batcher.model_calls
            # 50 ms apart: two calls; submitted in the same turn of the event loop: one
            first = asyncio.ensure_future(batcher.submit([{"input_ids": [1]}]))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(batcher.submit([{"input_ids": [1, 1]}]))
            await asyncio.gather(first, second)
            together = await asyncio.gather(batcher.submit([{"input_ids": [5]}]), batcher.submit([{"input_ids": [6]}]))
            await batcher.stop()
            return seconds, calls, batcher.model_calls, together

    seconds, calls, total, together = asyncio.run(main())
    assert seconds[0] >= wait_s and max(seconds[1:]) < wait_s / 4, seconds
    assert calls == 3
    assert total == 3 + 2 + 1
    assert [a[0, 0] for a in together] == [1, 1]


def test_stopping_answers_requests_in_a_model_call_and_in_the_queue():
    release = threading.Event()

    def blocked(features):
        release.wait(10)
        return lengths_runner(features)

    async def main():
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(blocked, executor, max_batch_tokens=1, max_wait_ms=0, max_queue=4)
            batcher.start()
            running = asyncio.ensure_future(batcher.submit([{"input_ids": [1, 2]}]))
            waiting = asyncio.ensure_future(batcher.submit([{"input_ids": [3]}]))
            while batcher.pending < 2:
                await asyncio.sleep(0.01)
            await batcher.stop()  # the first is in the (blocked) model call, the second in the queue
            release.set()
            # a request left without an answer would hang here: fail after 5 s instead
            return await asyncio.wait_for(asyncio.gather(running, waiting, return_exceptions=True), 5)

    outcomes = asyncio.run(main())
    assert [type(o) for o in outcomes] == [BatcherStopped, BatcherStopped]


def test_a_stopped_batcher_refuses_new_requests():
    async def main():
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(lengths_runner, executor, max_batch_tokens=64, max_wait_ms=0, max_queue=4)
            batcher.start()
            await batcher.stop()
            with pytest.raises(RuntimeError, match="not running"):
                await batcher.submit([{"input_ids": [1]}])

    asyncio.run(main())


class RecordingRunner:
    """Each call's rows as (tag, length), tag being a row's first token id; sleeps `delay` per call."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[list[tuple[int, int]]] = []
        self.delay = delay

    def __call__(self, features: list[dict]) -> np.ndarray:
        self.calls.append([(f["input_ids"][0], len(f["input_ids"])) for f in features])
        if self.delay:
            threading.Event().wait(self.delay)
        return lengths_runner(features)


def rows(tag: int, *lengths: int) -> list[dict]:
    return [{"input_ids": [tag] * n} for n in lengths]


def test_a_call_does_not_pad_short_rows_to_a_long_one():
    async def main(budget: int):
        runner = RecordingRunner()
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(runner, executor, max_batch_tokens=budget, max_wait_ms=0, max_queue=8)
            batcher.start()
            answer = await batcher.submit(rows(1, *[10] * 10, 300, *[10] * 10))
            await batcher.stop()
        return runner.calls, answer

    calls, answer = asyncio.run(main(budget=10_000))
    assert answer[:, 0].tolist() == [10] * 10 + [300] + [10] * 10  # every row back in its place
    assert [[n for _, n in call] for call in calls] == [[300], [10] * 20]  # not 21 rows padded to 300
    calls, _ = asyncio.run(main(budget=100))
    assert all(len(call) == 1 or len(call) * max(n for _, n in call) <= 100 for call in calls)  # the budget holds
    assert [len(call) for call in calls] == [1, 10, 10]


def test_rows_of_similar_length_share_a_call_when_splitting_saves_little():
    async def main():
        runner = RecordingRunner()
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(runner, executor, max_batch_tokens=10_000, max_wait_ms=0, max_queue=8)
            batcher.start()
            await batcher.submit(rows(1, 40, 12, 30, 8))  # splitting would save 2 x 28 = 56 padded tokens
            await batcher.stop()
        return runner.calls

    assert [[n for _, n in call] for call in asyncio.run(main())] == [[40, 30, 12, 8]]


def test_a_small_request_is_answered_after_about_one_call_of_a_big_one():
    async def main():
        runner = RecordingRunner(delay=0.05)
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(runner, executor, max_batch_tokens=20, max_wait_ms=0, max_queue=8)
            batcher.start()
            big = asyncio.ensure_future(batcher.submit(rows(1, *[10] * 20)))  # 10 calls of 2 rows
            while not runner.calls:
                await asyncio.sleep(0.005)
            calls_before = len(runner.calls)
            small = await batcher.submit(rows(2, 10))
            answered_after = len(runner.calls) - calls_before
            await big
            await batcher.stop()
        return runner.calls, small, answered_after

    calls, small, answered_after = asyncio.run(main())
    assert small[:, 0].tolist() == [10]
    assert answered_after <= 2, calls  # the call in progress, then the small request's own
    assert sum(len(call) for call in calls) == 21 and all(len(call) <= 2 for call in calls)


def test_the_rows_of_a_cancelled_request_are_not_computed():
    async def main():
        runner = RecordingRunner(delay=0.05)
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(runner, executor, max_batch_tokens=20, max_wait_ms=0, max_queue=8)
            batcher.start()
            abandoned = asyncio.ensure_future(batcher.submit(rows(1, *[10] * 20)))
            while not runner.calls:
                await asyncio.sleep(0.005)
            abandoned.cancel()  # the client went away during its first model call
            after = await batcher.submit(rows(2, 10))
            pending = batcher.pending
            await batcher.stop()
        return runner.calls, after, pending

    calls, after, pending = asyncio.run(main())
    assert after[:, 0].tolist() == [10]
    assert [tag for call in calls for tag, _ in call].count(1) <= 4  # one call in progress, maybe one more
    assert calls[-1] == [(2, 10)] and pending == 0


def test_a_request_split_over_calls_is_not_overtaken_by_a_steady_stream():
    """Round robin: the rest of a request that did not fit in a call waits only for the rows that
    were in line when that call ended (here two calls' worth), however many new requests keep
    arriving (ordered by calls had, it waited for a lull: the end of the stream)."""
    async def main():
        runner = RecordingRunner(delay=0.02)
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(runner, executor, max_batch_tokens=40, max_wait_ms=0, max_queue=64)
            batcher.start()
            # a stream of one-row requests, 4 at each call: always a full call of fresh rows waiting
            stream = [asyncio.ensure_future(batcher.submit(rows(9, 10))) for _ in range(4)]
            while not runner.calls:
                await asyncio.sleep(0.002)
            split = asyncio.ensure_future(batcher.submit(rows(1, 10, 10, 10, 10, 10, 10)))  # more than a call
            for _ in range(12):
                seen = len(runner.calls)
                stream += [asyncio.ensure_future(batcher.submit(rows(9, 10))) for _ in range(4)]
                while len(runner.calls) == seen:
                    await asyncio.sleep(0.002)
            answer = await split
            await asyncio.gather(*stream)
            await batcher.stop()
        return runner.calls, answer

    calls, answer = asyncio.run(main())
    assert answer[:, 0].tolist() == [10] * 6
    holding = [i for i, call in enumerate(calls) if any(tag == 1 for tag, _ in call)]
    assert len(holding) == 2 and holding[1] - holding[0] <= 3 and holding[1] < len(calls) - 5, calls


def test_a_padding_free_runner_gets_rows_of_any_length_in_turn_order():
    """Packed calls cost their real tokens: a short row is not left for a later call (its request
    would wait a call longer), and the budget counts real tokens, not rows x the longest."""
    async def main(padding_free: bool, budget: int):
        runner = RecordingRunner()
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(runner, executor, max_batch_tokens=budget, max_wait_ms=0, max_queue=8,
                                   padding_free=padding_free)
            batcher.start()
            answer = await batcher.submit(rows(1, *[10] * 10, 300, *[10] * 10))
            await batcher.stop()
        return [[n for _, n in call] for call in runner.calls], answer

    calls, answer = asyncio.run(main(True, 10_000))
    assert answer[:, 0].tolist() == [10] * 10 + [300] + [10] * 10
    assert calls == [[300] + [10] * 20]  # one call of 500 real tokens (padded it would be 6,300)
    assert asyncio.run(main(False, 10_000))[0] == [[300], [10] * 20]  # padded: the short rows wait
    calls, _ = asyncio.run(main(True, 400))
    assert calls == [[300] + [10] * 10, [10] * 10]  # 400 real tokens a call, the first row always in
    assert all(sum(call) <= 400 for call in calls)


def test_a_request_cut_by_the_end_of_a_call_heads_the_next_one():
    """A request that fits in a call but was cut by the end of one keeps its place in line: its
    rest goes into the next call, not behind every request that arrived meanwhile. A request bigger
    than a call still takes turns with the others."""
    async def main():
        runner = RecordingRunner(delay=0.02)
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(runner, executor, max_batch_tokens=50, max_wait_ms=0, max_queue=16,
                                   padding_free=True)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit(rows(1, 10)))
            while not runner.calls:
                await asyncio.sleep(0.002)
            later = [asyncio.ensure_future(batcher.submit(rows(tag, *sizes)))
                     for tag, sizes in ((2, (20, 10)), (3, (15, 10)), (4, (20, 20, 20)), (5, (10,)))]
            while len(runner.calls) < 2:
                await asyncio.sleep(0.002)
            # arriving during the call that cut request 3: it still goes after 3's rest
            later.append(asyncio.ensure_future(batcher.submit(rows(6, 10))))
            answers = await asyncio.gather(first, *later)
            await batcher.stop()
        return [[tag for tag, _ in call] for call in runner.calls], answers

    calls, answers = asyncio.run(main())
    assert [a[:, 0].tolist() for a in answers] == [[10], [20, 10], [15, 10], [20, 20, 20], [10], [10]]
    # call 2 is full at 50 tokens: 2, and 3's 15-token row; 3's rest heads call 3, where 4 (60
    # tokens, bigger than a call) is cut too and, being big, joins the line again behind 5 and 6
    assert calls == [[1], [2, 2, 3], [3, 4, 4], [5, 6, 4]], calls
