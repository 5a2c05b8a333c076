"""The micro-batcher with a small runtime made here: coalescing, ordering, error isolation."""

import asyncio
import threading

import numpy as np
import pytest

from policy_server.runtime.base import ModelOutputs
from policy_server.serving.batching import MicroBatcher


class EchoModel:
    """Returns each row as its logits; records batch sizes; refuses rows holding -1."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.threads: list[str] = []
        self.delay = delay
        self.lock = threading.Lock()

    def forward(self, rows: np.ndarray) -> ModelOutputs:
        with self.lock:
            self.batches.append(len(rows))
            self.threads.append(threading.current_thread().name)
        if self.delay:
            threading.Event().wait(self.delay)
        if (rows == -1).any():
            raise ValueError("poisoned row")
        return ModelOutputs(rows.copy(), rows[:, 0].copy())


def rows(value: float, count: int = 1) -> np.ndarray:
    return np.full((count, 3), value, dtype=np.float32)


async def gather(batcher: MicroBatcher, inputs: list[np.ndarray]) -> list[object]:
    return await asyncio.gather(*(batcher.forward(r) for r in inputs), return_exceptions=True)


def test_concurrent_callers_share_model_calls_and_get_their_own_rows() -> None:
    model = EchoModel(delay=0.01)

    async def scenario() -> list[object]:
        batcher = MicroBatcher(model.forward, max_batch_size=16, max_wait_s=0)
        try:
            return await gather(batcher, [rows(i) for i in range(64)])
        finally:
            await batcher.close()

    results = asyncio.run(scenario())
    for i, result in enumerate(results):
        assert isinstance(result, ModelOutputs)
        assert result.logits.tolist() == [[i, i, i]] and result.value is not None
        assert result.value.tolist() == [i]
    assert sum(model.batches) == 64
    assert len(model.batches) < 64 and max(model.batches) <= 16


def test_a_lone_request_is_not_delayed_and_large_requests_go_whole() -> None:
    model = EchoModel()

    async def scenario() -> tuple[ModelOutputs, ModelOutputs]:
        batcher = MicroBatcher(model.forward, max_batch_size=8, max_wait_s=0)
        try:
            return await batcher.forward(rows(1)), await batcher.forward(rows(2, count=20))
        finally:
            await batcher.close()

    lone, large = asyncio.run(scenario())
    assert lone.logits.shape == (1, 3) and large.logits.shape == (20, 3)
    assert model.batches == [1, 20]


def test_a_positive_wait_gathers_callers_that_arrive_later() -> None:
    model = EchoModel()

    async def scenario() -> None:
        batcher = MicroBatcher(model.forward, max_batch_size=64, max_wait_s=0.05)

        async def later(i: int) -> ModelOutputs:
            await asyncio.sleep(0.005 * i)
            return await batcher.forward(rows(i))

        try:
            await asyncio.gather(*(later(i) for i in range(5)))
        finally:
            await batcher.close()

    asyncio.run(scenario())
    assert model.batches == [5]


def test_a_failing_request_fails_alone() -> None:
    model = EchoModel(delay=0.01)

    async def scenario() -> list[object]:
        batcher = MicroBatcher(model.forward, max_batch_size=64, max_wait_s=0.02)
        try:
            inputs = [rows(-1 if i == 7 else i) for i in range(20)]
            return await gather(batcher, inputs)
        finally:
            await batcher.close()

    results = asyncio.run(scenario())
    assert isinstance(results[7], ValueError)
    for i, result in enumerate(results):
        if i != 7:
            assert isinstance(result, ModelOutputs) and result.logits[0, 0] == i


@pytest.mark.parametrize("size", [1, 5])
def test_maximum_batch_size_is_respected(size: int) -> None:
    model = EchoModel(delay=0.005)

    async def scenario() -> None:
        batcher = MicroBatcher(model.forward, max_batch_size=size, max_wait_s=0)
        try:
            await gather(batcher, [rows(i) for i in range(30)])
        finally:
            await batcher.close()

    asyncio.run(scenario())
    assert max(model.batches) <= size and sum(model.batches) == 30


def test_quick_calls_run_on_the_loop_and_slow_ones_in_the_versions_thread() -> None:
    """A size not seen yet goes to the thread; once its calls proved quick, they run inline."""
    quick, slow = EchoModel(), EchoModel(delay=0.1)

    async def scenario() -> None:
        for model in (quick, slow):
            batcher = MicroBatcher(model.forward, 8, 0, name="model-p-1", inline_budget_s=0.05)
            try:
                for _ in range(3):
                    await batcher.forward(rows(1))
                await batcher.forward(rows(1, count=6))
            finally:
                await batcher.close()

    asyncio.run(scenario())
    loop = threading.current_thread().name
    assert [name.startswith("model-p-1") for name in quick.threads] == [True, False, False, True]
    assert all(name.startswith("model-p-1") and name != loop for name in slow.threads)


def test_a_call_that_outlives_its_caller_leaves_the_batcher_serving() -> None:
    model = EchoModel(delay=0.2)

    async def scenario() -> ModelOutputs:
        batcher = MicroBatcher(model.forward, 8, 0)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await batcher.forward(rows(1))
            return await batcher.forward(rows(2))
        finally:
            await batcher.close()

    assert asyncio.run(scenario()).logits.tolist() == [[2, 2, 2]]


def test_the_time_out_fails_the_computed_and_the_queued_requests_alone() -> None:
    """A slow call in the version's thread: its request, and one queued behind it, time out
    at their own deadlines; a request without a time-out waits for its answer; the batcher
    then serves the next request."""
    model = EchoModel(delay=0.3)

    async def scenario() -> tuple[list[object], float, ModelOutputs]:
        batcher = MicroBatcher(model.forward, max_batch_size=1, max_wait_s=0)
        try:
            started = asyncio.get_running_loop().time()
            first = asyncio.ensure_future(batcher.forward(rows(1), timeout_s=0.05))
            await asyncio.sleep(0.01)  # the first is in the thread before the others come
            others = [
                batcher.forward(rows(2), timeout_s=0.1),
                batcher.forward(rows(3)),
            ]
            results: list[object] = list(
                await asyncio.gather(first, *others, return_exceptions=True)
            )
            elapsed = asyncio.get_running_loop().time() - started
            return results, elapsed, await batcher.forward(rows(4), timeout_s=5)
        finally:
            await batcher.close()

    (first, second, third), elapsed, after = asyncio.run(scenario())
    assert isinstance(first, TimeoutError) and isinstance(second, TimeoutError)
    assert isinstance(third, ModelOutputs) and third.logits.tolist() == [[3, 3, 3]]
    assert elapsed >= 0.3, "the request without a time-out waited for its call"
    assert after.logits.tolist() == [[4, 4, 4]]
    # The timed-out second request was dropped from the queue, never computed.
    assert model.batches == [1, 1, 1]


def test_a_time_out_also_holds_while_a_batch_waits_to_fill() -> None:
    model = EchoModel()

    async def scenario() -> None:
        batcher = MicroBatcher(model.forward, max_batch_size=8, max_wait_s=0.5)
        try:
            with pytest.raises(TimeoutError):
                await batcher.forward(rows(1), timeout_s=0.05)
        finally:
            await batcher.close()

    asyncio.run(scenario())
