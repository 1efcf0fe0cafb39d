"""The micro-batcher on its own: answers in request order, and a stop never leaves a request hanging."""

from __future__ import annotations

import asyncio
import threading
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
