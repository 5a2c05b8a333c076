"""Adaptive micro-batching: concurrent forward passes of one policy become one model call.

Requests queue while the model runs; the next call takes everything queued (up to the
maximum batch size). With the default wait of 0 a lone request goes straight to the model;
a positive wait holds a call open for that long to let more requests join it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from policy_server.runtime.base import ModelOutputs

logger = logging.getLogger(__name__)

Forward = Callable[[npt.NDArray[np.float32]], ModelOutputs]


@dataclass
class _Pending:
    rows: npt.NDArray[np.float32]
    future: asyncio.Future[ModelOutputs]


class MicroBatcher:
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
        # One model thread: the event loop keeps parsing requests while the model runs.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="policy-model")

    async def forward(self, rows: npt.NDArray[np.float32]) -> ModelOutputs:
        """The model's outputs for `rows`, computed in a batch with concurrent callers."""
        future: asyncio.Future[ModelOutputs] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="micro-batcher")
        self._ready.set()
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
            batch = self._take()
            if self._max_wait_s > 0 and self._size(batch) < self._max_batch_size:
                await asyncio.sleep(self._max_wait_s)
                batch += self._take(self._max_batch_size - self._size(batch))
            await self._execute(batch)

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

    async def _execute(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        started = loop.time()
        try:
            outputs = await loop.run_in_executor(self._executor, self._forward, rows)
        except Exception as error:
            await self._execute_alone(batch, error)
            return
        if self._on_batch is not None:
            self._on_batch(len(rows), loop.time() - started)
        start = 0
        for pending in batch:
            end = start + len(pending.rows)
            if not pending.future.done():
                value = None if outputs.value is None else outputs.value[start:end]
                pending.future.set_result(ModelOutputs(outputs.logits[start:end], value))
            start = end

    async def _execute_alone(self, batch: list[_Pending], error: Exception) -> None:
        """A failed batch is retried request by request, so one bad request fails alone."""
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        logger.warning("a batch of %d requests failed (%s); retrying one by one", len(batch), error)
        for pending in batch:
            await self._execute([pending])
