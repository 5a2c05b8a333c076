"""Adaptive micro-batching: concurrent forward passes of one policy become one model call.

Requests queue while earlier ones are parsed, validated and answered; each model call takes
everything queued (up to the maximum batch size). With the default wait of 0 a lone request
goes straight to the model; a positive wait holds a call open to let more requests join.

The model runs on the event loop itself: a policy's forward pass takes tens of microseconds
in ONNX Runtime, several times less than handing it to a thread and back (measured in
bench/RESULTS.md), and the requests that arrive meanwhile simply join the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from policy_server.runtime.base import ModelOutputs, StepInputs

logger = logging.getLogger(__name__)

# A runtime's forward pass: observations, and for a recurrent policy its step inputs.
Forward = Callable[..., ModelOutputs]


@dataclass
class _Pending:
    rows: npt.NDArray[np.float32]
    future: asyncio.Future[ModelOutputs]
    # A recurrent policy's state and previous actions and rewards, one row per observation.
    step: StepInputs | None = None


class MicroBatcher:
    """Coalesces the concurrent forward passes of one policy version into model calls of at
    most `max_batch_size` observations, waiting up to `max_wait_s` for more when a batch is
    not full (0: a lone request never waits; requests that arrive while the model runs form
    the next batch). A failed batch is retried request by request, so a bad request fails
    alone."""

    def __init__(
        self,
        forward: Forward,
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._forward = forward
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._ready = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    async def forward(
        self, rows: npt.NDArray[np.float32], step: StepInputs | None = None
    ) -> ModelOutputs:
        """The model's outputs for `rows`, computed in a batch with concurrent callers."""
        future: asyncio.Future[ModelOutputs] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, future, step))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="micro-batcher")
        self._ready.set()
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
            batch = self._take()
            if self._max_wait_s > 0 and self._size(batch) < self._max_batch_size:
                await asyncio.sleep(self._max_wait_s)
                batch += self._take(self._max_batch_size - self._size(batch))
            self._execute(batch)
            # Let the requests that arrived meanwhile reach the queue before the next batch.
            await asyncio.sleep(0)

    def _take(self, room: int | None = None) -> list[_Pending]:
        room = self._max_batch_size if room is None else room
        batch: list[_Pending] = []
        # The first request is always taken, even one larger than the maximum batch.
        while self._queue and (not batch or len(self._queue[0].rows) <= room):
            pending = self._queue.popleft()
            if pending.future.done():  # the client went away
                continue
            batch.append(pending)
            room -= len(pending.rows)
        return batch

    @staticmethod
    def _size(batch: list[_Pending]) -> int:
        return sum(len(p.rows) for p in batch)

    def _execute(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        steps = [p.step for p in batch if p.step is not None]
        step = StepInputs.concatenate(steps) if steps else None
        started = time.perf_counter()
        try:
            outputs = self._forward(rows) if step is None else self._forward(rows, step)
        except Exception as error:
            self._execute_alone(batch, error)
            return
        if self._on_batch is not None:
            self._on_batch(len(rows), time.perf_counter() - started)
        start = 0
        for pending in batch:
            end = start + len(pending.rows)
            if not pending.future.done():
                pending.future.set_result(outputs.rows(start, end))
            start = end

    def _execute_alone(self, batch: list[_Pending], error: Exception) -> None:
        """A failed batch is retried request by request, so one bad request fails alone."""
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        logger.warning("a batch of %d requests failed (%s); retrying one by one", len(batch), error)
        for pending in batch:
            self._execute([pending])
