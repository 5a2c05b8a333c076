"""Adaptive micro-batching: concurrent forward passes of one policy become one model call.

Requests queue while earlier ones are parsed, validated and answered; each model call takes
everything queued (up to the maximum batch size). With the default wait of 0 a lone request
goes straight to the model; a positive wait holds a call open to let more requests join.

Each version's model runs in a thread of its own, so that a slow call (the TensorFlow
fallback, a batch of 10,000 rows, a big model) holds up neither the event loop (`/ready`, the
worker's other connections) nor the caller's time-out. A call expected to take less than
`INLINE_BUDGET_S` (an ONNX policy's small batches: tens of microseconds) runs on the loop
itself instead, where handing it to the thread and back would cost more than the call; the
expectation is the recent duration of calls of about the same size, and a size not seen yet
goes to the thread.

A caller's time-out (queueing included) is kept by the batcher: each request carries its
deadline, and one timer, armed only while the worker waits (for the thread, or for a batch to
fill), fails the requests whose deadline passed. A call on the loop cannot be interrupted
anyway, so the requests of quick calls arm no timer of their own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from policy_server.runtime.base import ModelOutputs, StepInputs

logger = logging.getLogger(__name__)

# A runtime's forward pass: observations, and for a recurrent policy its step inputs.
Forward = Callable[..., ModelOutputs]
INLINE_BUDGET_S = 0.001


@dataclass(slots=True)
class _Pending:
    rows: npt.NDArray[np.float32]
    future: asyncio.Future[ModelOutputs]
    # A recurrent policy's state and previous actions and rewards, one row per observation.
    step: StepInputs | None
    deadline: float  # the loop's clock; infinite without a time-out


class MicroBatcher:
    """Coalesces the concurrent forward passes of one policy version into model calls of at
    most `max_batch_size` observations, waiting up to `max_wait_s` for more when a batch is
    not full (0: a lone request never waits; requests that arrive while the model runs form
    the next batch). Each call runs in the version's own thread, unless calls of its size
    proved quicker than `inline_budget_s`. A failed batch is retried request by request, so
    a bad request fails alone."""

    def __init__(
        self,
        forward: Forward,
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "model",
        inline_budget_s: float = INLINE_BUDGET_S,
    ) -> None:
        self._forward = forward
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._name = name
        self._queue: deque[_Pending] = deque()
        self._ready = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._durations = Durations(inline_budget_s)
        # The batch being computed while the worker waits for the thread, and the one timer
        # that fails the waiting requests whose deadline passed.
        self._running: list[_Pending] = []
        self._watchdog: asyncio.TimerHandle | None = None

    async def forward(
        self,
        rows: npt.NDArray[np.float32],
        step: StepInputs | None = None,
        timeout_s: float | None = None,
    ) -> ModelOutputs:
        """The model's outputs for `rows`, computed in a batch with concurrent callers;
        TimeoutError when they have not come within `timeout_s` (the model call goes on
        in its thread, and its result is dropped)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ModelOutputs] = loop.create_future()
        deadline = math.inf if timeout_s is None else loop.time() + timeout_s
        self._queue.append(_Pending(rows, future, step, deadline))
        if self._running:  # the worker waits: this request's deadline may come first
            self._arm(deadline)
        if self._worker is None or self._worker.done():
            # The event of this loop: a client without lifespan runs each request on an event
            # loop of its own, whose end cancels the worker.
            self._ready = asyncio.Event()
            self._worker = asyncio.create_task(self._run(), name="micro-batcher")
        self._ready.set()
        return await future

    async def close(self) -> None:
        self._disarm()
        if self._worker is not None:
            self._worker.cancel()
        if self._thread is not None:
            # A call still running finishes in its thread; nobody waits for it.
            self._thread.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
            batch = self._take()
            if self._max_wait_s > 0 and self._size(batch) < self._max_batch_size:
                self._running = batch
                self._arm()
                await asyncio.sleep(self._max_wait_s)
                self._disarm()
                batch = [p for p in batch if not p.future.done()]
                batch += self._take(self._max_batch_size - self._size(batch))
            await self._execute(batch)
            # Let the requests that arrived meanwhile reach the queue before the next batch.
            await asyncio.sleep(0)

    def _take(self, room: int | None = None) -> list[_Pending]:
        room = self._max_batch_size if room is None else room
        batch: list[_Pending] = []
        # The first request is always taken, even one larger than the maximum batch.
        while self._queue and (not batch or len(self._queue[0].rows) <= room):
            pending = self._queue.popleft()
            if pending.future.done():  # the client went away, or timed out
                continue
            batch.append(pending)
            room -= len(pending.rows)
        return batch

    @staticmethod
    def _size(batch: list[_Pending]) -> int:
        return sum(len(p.rows) for p in batch)

    async def _execute(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        steps = [p.step for p in batch if p.step is not None]
        step = StepInputs.concatenate(steps) if steps else None
        try:
            if self._durations.quick(len(rows)):
                outputs, seconds = self._timed(rows, step)
            else:
                loop = asyncio.get_running_loop()
                call = self._executor()
                self._running = batch
                self._arm()
                try:
                    outputs, seconds = await loop.run_in_executor(call, self._timed, rows, step)
                finally:
                    self._disarm()
        except Exception as error:
            await self._execute_alone(batch, error)
            return
        self._durations.record(len(rows), seconds)
        if self._on_batch is not None:
            self._on_batch(len(rows), seconds)
        start = 0
        for pending in batch:
            end = start + len(pending.rows)
            if not pending.future.done():
                pending.future.set_result(outputs.rows(start, end))
            start = end

    def _arm(self, earliest: float | None = None) -> None:
        """Set the watchdog at the earliest deadline of the requests waiting (those being
        computed and the queued), or at `earliest` if sooner than the one set."""
        if earliest is None:
            waiting = (*self._running, *self._queue)
            earliest = min((p.deadline for p in waiting if not p.future.done()), default=math.inf)
        elif self._watchdog is not None and self._watchdog.when() <= earliest:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if earliest < math.inf:
            self._watchdog = asyncio.get_running_loop().call_at(earliest, self._expire)

    def _disarm(self) -> None:
        self._running = []
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _expire(self) -> None:
        now = asyncio.get_running_loop().time()
        for pending in (*self._running, *self._queue):
            if not pending.future.done() and pending.deadline <= now:
                pending.future.set_exception(TimeoutError())
        self._watchdog = None
        self._arm()

    def _timed(
        self, rows: npt.NDArray[np.float32], step: StepInputs | None
    ) -> tuple[ModelOutputs, float]:
        started = time.perf_counter()
        outputs = self._forward(rows) if step is None else self._forward(rows, step)
        return outputs, time.perf_counter() - started

    def _executor(self) -> ThreadPoolExecutor:
        if self._thread is None:
            # One thread: a version's calls run one at a time, as on the loop before.
            self._thread = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        return self._thread

    async def _execute_alone(self, batch: list[_Pending], error: Exception) -> None:
        """A failed batch is retried request by request, so one bad request fails alone."""
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        logger.warning("a batch of %d requests failed (%s); retrying one by one", len(batch), error)
        for pending in batch:
            await self._execute([pending])


class Durations:
    """How long recent model calls took, by batch size in powers of two."""

    SMOOTHING = 0.2

    def __init__(self, budget_s: float) -> None:
        self._budget_s = budget_s
        self._seconds: dict[int, float] = {}

    def quick(self, rows: int) -> bool:
        """Whether a call of `rows` rows is expected within the budget; unknown: no."""
        expected = self._seconds.get(rows.bit_length())
        return expected is not None and expected < self._budget_s

    def record(self, rows: int, seconds: float) -> None:
        size = rows.bit_length()
        before = self._seconds.get(size)
        self._seconds[size] = (
            seconds if before is None else before + self.SMOOTHING * (seconds - before)
        )
