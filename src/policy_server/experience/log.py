"""The decision log: records queued by the event loop, written by one thread in group commits.

The request path only appends to a bounded queue what it already has (`PendingDecisions`:
ids and arrays, nothing converted). A writer thread takes everything waiting, builds the
records (the distribution, the lists and dicts), serialises them, writes them as one block,
fsyncs once when a caller needs durability, updates the index in one transaction, then
answers everyone in that group. A full queue makes callers wait (back-pressure) instead of
growing memory or dropping records.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from policy_server.experience.files import (
    Compressor,
    ReadStats,
    RotatingStream,
    check_worker,
    compress,
    leftovers,
    list_streams,
    lock_worker,
    other_workers,
    read_file,
    read_records,
    workers_with_leftovers,
)
from policy_server.experience.index import INDEX_NAME, DecisionIndex
from policy_server.experience.metrics import DecisionLogMetrics
from policy_server.experience.records import (
    PendingDecisions,
    episode_end_record,
    pending_records,
    reward_record,
)

logger = logging.getLogger(__name__)

MiB = 1 << 20
_INDEX_CHUNK = 50_000
# How long a reward or an episode end that names no known decision waits for another worker,
# which in async mode answers its decisions before writing them (a group commit or two).
PEER_GRACE_S = 2.0
_PEER_POLL_S = 0.05
_DUMPS_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY
# In asynchronous mode the writer lets a group gather this long before writing it: waking
# the writer thread for every decision costs the event loop a thread switch per request, a
# group of one pays a whole index transaction, and while the writer builds and serialises a
# group it holds the interpreter the event loop needs. 50 ms measured 0.80x of the log off
# in-process where 10 ms gave 0.70x (bench/COMPONENTS.md); sync mode writes at once, and
# close() (SIGTERM, shutdown) writes everything queued.
LINGER_S = 0.05


class DecisionLogClosed(RuntimeError):
    """The log is closed, or its writer failed; nothing more can be acknowledged."""


Records = Sequence[Mapping[str, Any]] | PendingDecisions
_NONE: Counter[str] = Counter()  # the episodes of a batch that has none (never written to)


@dataclass
class _Batch:
    # Built records, or decisions the writer builds into records.
    records: Sequence[Mapping[str, Any]] | PendingDecisions
    decision_ids: Sequence[str]
    episode_ids: Counter[str]
    # Set once the batch is written and fsync'ed; None when the caller does not wait for it.
    done: concurrent.futures.Future[None] | None = field(default=None)


class DecisionLog:
    """Decisions, rewards and episode ends of one worker process, in `directory`.

    `sync=True` answers `append` only once its records are fsync'ed (grouped with everything
    else waiting), so a killed process loses nothing acknowledged. Otherwise `append` returns
    once the records are queued, and `close()` (SIGTERM, lifespan shutdown) writes them all.
    Several processes may share a directory, each with its own `worker` name; a log waits up
    to `lock_wait_s` for its name, which another worker may hold while recovering its files.
    """

    def __init__(
        self,
        directory: Path,
        *,
        worker: str = "0",
        sync: bool = False,
        max_queue: int = 10_000,
        rotate_bytes: int = 64 * MiB,
        rotate_seconds: float = 3600.0,
        registry: CollectorRegistry | None = None,
        lock_wait_s: float = 60.0,
    ) -> None:
        if max_queue < 1 or rotate_bytes < 1 or rotate_seconds <= 0:
            raise ValueError("max_queue, rotate_bytes and rotate_seconds must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.worker = check_worker(worker)
        self.sync = sync
        self.max_queue = max_queue
        self._lock_file = lock_worker(self.directory, worker, lock_wait_s)
        self.metrics = DecisionLogMetrics(registry)
        rebuild = not (self.directory / INDEX_NAME).exists() and bool(list_streams(self.directory))
        self._index = DecisionIndex(self.directory, durable=sync)
        if rebuild:
            self._rebuild_index()
        self._compressor = Compressor()
        self._recover()
        self.metrics.awaiting_reward.set(self._index.awaiting_reward())
        self._stream = RotatingStream(
            self.directory, worker, rotate_bytes, rotate_seconds, self._compressor.submit
        )
        self._cond = threading.Condition(threading.Lock())  # a plain lock: cheaper than RLock
        self._pending: deque[_Batch] = deque()
        self._queued = 0
        # Ids of decisions queued or being written, until their index transaction commits.
        self._queued_ids: set[str] = set()
        self._queued_episodes: Counter[str] = Counter()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._closing = False
        self._failure: BaseException | None = None
        # Called in the writer thread with each group of records once it is written and
        # indexed (a rollout's controller reads decisions and rewards there).
        self.committed: list[Callable[[Sequence[Mapping[str, Any]]], None]] = []
        # The writer waits for work with nothing queued; the first record wakes it.
        self._writer_idle = False
        # A queue this deep wakes a lingering writer at once, before back-pressure starts.
        self._wake_at = max(1, max_queue // 2)
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()
        # The server closes the log on shutdown; this covers scripts that forget to.
        atexit.register(self.close)

    async def append(self, records: Records) -> None:
        """Queue records; waits while the queue is full, and in sync mode until written."""
        if not records:
            return
        batch = self._batch(records)
        with self._cond:
            queued = self._offer(batch)
        if not queued:
            await self._offer_when_room(batch)
        if batch.done is not None:
            # Shielded: a cancelled request must not cancel the future the writer resolves.
            await asyncio.shield(asyncio.wrap_future(batch.done))

    async def _offer_when_room(self, batch: _Batch) -> None:
        """Back-pressure: wait for the writer to make room, then queue."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._offer(batch):
                    return
                waiter = loop.create_future()
                self._waiters.append((loop, waiter))
            await waiter

    def append_blocking(self, records: Records) -> None:
        """`append` for threads outside an event loop (scripts, tests, tools)."""
        if not records:
            return
        batch = self._batch(records)
        with self._cond:
            while not self._offer(batch):
                self._cond.wait()
        if batch.done is not None:
            batch.done.result()

    async def add_rewards(self, items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Log rewards for known decisions; one result per item, in order.

        Status: "joined", "unknown_decision" (never logged here, or still queued in another
        worker process), or "invalid" (a reward that is not a finite number).
        """
        items = list(items)
        known = await self._known([str(item.get("decision_id")) for item in items])
        results, records = [], []
        for item in items:
            decision_id = str(item.get("decision_id"))
            status = _reward_status(item, decision_id in known)
            results.append({"decision_id": decision_id, "status": status})
            if status == "joined":
                records.append(
                    reward_record(
                        decision_id,
                        float(item["reward"]),
                        _flag(item.get("terminated")),
                        _flag(item.get("truncated")),
                    )
                )
        self.metrics.unknown_rewards.inc(sum(r["status"] == "unknown_decision" for r in results))
        await self.append(records)
        return results

    async def end_episode(
        self, episode_id: str, terminated: bool = True, truncated: bool = False
    ) -> dict[str, Any]:
        """Close an episode: status "closed", or "unknown_episode" when no decision has it."""
        known = self._episode_queued(episode_id) or bool(
            await self._in_index([episode_id], self._episodes_in_index)
        )
        if not known:
            return {"episode_id": episode_id, "status": "unknown_episode"}
        await self.append([episode_end_record(episode_id, terminated, truncated)])
        return {"episode_id": episode_id, "status": "closed"}

    def close(self) -> None:
        """Write everything queued, close and compress the current file. Idempotent."""
        with self._cond:
            if self._closing:
                already = True
            else:
                already, self._closing = False, True
                self._cond.notify_all()
        self._thread.join()
        if already:
            return
        atexit.unregister(self.close)
        self._compressor.close()
        self._index.close()
        self._lock_file.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    @property
    def queue_depth(self) -> int:
        return self._queued

    def _batch(self, records: Records) -> _Batch:
        done: concurrent.futures.Future[None] | None = (
            concurrent.futures.Future() if self.sync else None
        )
        if isinstance(records, PendingDecisions):
            ids = records.episode_ids()
            return _Batch(records, records.decision_ids, Counter(ids) if ids else _NONE, done)
        decisions = [r for r in records if r.get("type") == "decision"]
        episodes = Counter(str(r["episode_id"]) for r in decisions if r.get("episode_id"))
        return _Batch(list(records), [str(r["decision_id"]) for r in decisions], episodes, done)

    def _offer(self, batch: _Batch) -> bool:
        """Queue the batch if there is room (an oversized batch goes alone into an empty
        queue). The caller holds the condition."""
        if self._closing or self._failure is not None:
            raise DecisionLogClosed(self._closed_reason())
        size = len(batch.records)
        if self._queued and self._queued + size > self.max_queue:
            return False
        self._pending.append(batch)
        self._queued += size
        self._queued_ids.update(batch.decision_ids)
        if batch.episode_ids:
            # update(), not +=: a Counter's += walks every key it holds.
            self._queued_episodes.update(batch.episode_ids)
        if self.sync or self._writer_idle or self._queued >= self._wake_at:
            self._cond.notify_all()
        return True

    async def _known(self, decision_ids: list[str]) -> set[str]:
        # Checked before the index: the writer drops an id from this set only after the
        # index transaction holding it has committed, so no id falls between the two.
        with self._cond:
            known = {i for i in decision_ids if i in self._queued_ids}
        rest = [i for i in decision_ids if i not in known]
        if rest:
            known |= await self._in_index(rest, self._index.known)
        return known

    async def _in_index(self, keys: list[str], look: Callable[[list[str]], set[str]]) -> set[str]:
        """The keys the index has; where another worker may still be writing some of them,
        looks again for up to PEER_GRACE_S."""
        found = await asyncio.to_thread(look, keys)
        if len(found) == len(keys) or self.sync or not other_workers(self.directory, self.worker):
            return found
        deadline = time.monotonic() + PEER_GRACE_S
        while len(found) < len(keys) and time.monotonic() < deadline:
            await asyncio.sleep(_PEER_POLL_S)
            found |= await asyncio.to_thread(look, [k for k in keys if k not in found])
        return found

    def _episodes_in_index(self, episode_ids: list[str]) -> set[str]:
        return {e for e in episode_ids if self._index.has_episode(e)}

    def _episode_queued(self, episode_id: str) -> bool:
        with self._cond:
            return episode_id in self._queued_episodes

    def _closed_reason(self) -> str:
        if self._failure is not None:
            return f"the decision log's writer failed: {self._failure!r}"
        return "the decision log is closed"

    def _run(self) -> None:
        batches: list[_Batch] = []
        try:
            while True:
                with self._cond:
                    if not self._pending and not self._closing:
                        self._writer_idle = True
                        self._cond.wait(self._stream.seconds_to_rotation())
                        self._writer_idle = False
                    if self._lingers():
                        self._cond.wait(LINGER_S)  # cut short by a deep queue or close()
                    batches = list(self._pending)
                    self._pending.clear()
                    # Set by the writer, not per append: what a scrape sees is at most one
                    # group old.
                    self.metrics.queue_depth.set(self._queued)
                    stop = self._closing and not batches
                if batches:
                    self._commit(batches)
                    batches = []
                self._stream.rotate_if_due()
                if stop:
                    break
            self._stream.close()
        except BaseException as error:
            logger.exception("the decision log's writer failed; refusing further records")
            self._fail(error, batches)

    def _lingers(self) -> bool:
        """Whether to let more records join the group first; the caller holds the
        condition."""
        return (
            bool(self._pending)
            and not self.sync
            and not self._closing
            and self._queued < self._wake_at
        )

    def _commit(self, batches: list[_Batch]) -> None:
        started = time.perf_counter()
        # One buffer, each record's bytes added and dropped at once: keeping thousands of
        # small bytes objects alive to join them cost four times their serialisation here.
        data, decisions, rewarded = bytearray(), [], []
        written: list[Mapping[str, Any]] = []
        pending = [b.records for b in batches if isinstance(b.records, PendingDecisions)]
        built = iter(pending_records(pending))
        for batch in batches:
            records = batch.records
            if isinstance(records, PendingDecisions):
                records = next(built)
            written += records
            for record in records:
                data += orjson.dumps(record, option=_DUMPS_OPTIONS)
                kind = record.get("type")
                if kind == "decision":
                    decisions.append((str(record["decision_id"]), record.get("episode_id")))
                elif kind == "reward":
                    rewarded.append(str(record["decision_id"]))
        # Rotating here too puts a group that arrives after the deadline in a new file even
        # when the writer thread has not woken since.
        self._stream.rotate_if_due()
        self._stream.write(data)
        self._stream.flush(durable=any(b.done is not None for b in batches))
        awaiting = self._index.commit(decisions, rewarded)
        self._count(len(decisions), len(rewarded), len(data), awaiting)
        if self.committed:
            self._tell(written)
        self.metrics.write_seconds.observe(time.perf_counter() - started)
        self._release(batches)

    def _tell(self, records: list[Mapping[str, Any]]) -> None:
        for sink in self.committed:
            try:
                sink(records)
            except Exception:  # a failing reader must never stop the log from writing
                logger.exception("a reader of the decision log's records failed")

    def _count(self, decisions: int, rewards: int, size: int, awaiting: int) -> None:
        self.metrics.decisions.inc(decisions)
        self.metrics.rewards.inc(rewards)
        self.metrics.bytes.inc(size)
        self.metrics.awaiting_reward.set(awaiting)

    def _release(self, batches: list[_Batch]) -> None:
        with self._cond:
            for batch in batches:
                self._queued -= len(batch.records)
                self._queued_ids.difference_update(batch.decision_ids)
                self._forget_episodes(batch.episode_ids)
            self.metrics.queue_depth.set(self._queued)
            self._wake_waiters()
        for batch in batches:
            if batch.done is not None:
                batch.done.set_result(None)

    def _forget_episodes(self, episodes: Counter[str]) -> None:
        """Take a written batch's episodes off the queued ones (only their keys: a Counter's
        -= walks every key it holds). The caller holds the condition."""
        queued = self._queued_episodes
        for episode, count in episodes.items():
            left = queued[episode] - count
            if left > 0:
                queued[episode] = left
            else:
                del queued[episode]

    def _wake_waiters(self) -> None:
        """Wake every caller waiting for room (they retry); called holding the condition."""
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            # A closed loop raises RuntimeError: nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, waiter)

    def _fail(self, error: BaseException, in_flight: list[_Batch]) -> None:
        """Refuse everything from now on; callers waiting for durability get the error."""
        with self._cond:
            self._failure = error
            batches = in_flight + list(self._pending)
            self._pending.clear()
            self._wake_waiters()
        for batch in batches:
            if batch.done is not None:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    batch.done.set_exception(DecisionLogClosed(self._closed_reason()))
        if self._queued:
            logger.error("the decision log could not write %d queued records", self._queued)

    def _recover(self) -> None:
        """Index and gzip the files that killed processes left uncompressed.

        The writer indexes each group right after writing it, so only a file being written
        when its process died can hold decisions the index lacks. Another worker's files
        are taken over only when no live process holds that worker's lock.
        """
        for worker in workers_with_leftovers(self.directory):
            if worker == self.worker:
                self._recover_worker(worker)
                continue
            try:
                lock = lock_worker(self.directory, worker)
            except RuntimeError:
                continue  # that worker is alive and owns its files
            try:
                self._recover_worker(worker)
            finally:
                lock.close()

    def _recover_worker(self, worker: str) -> None:
        for path in leftovers(self.directory, worker):
            self._index_records(functools.partial(read_file, path, ReadStats()))
            compress(path)

    def _rebuild_index(self) -> None:
        """Logs moved or restored without their index: index every file again."""
        logger.warning("%s: no %s beside the logs; rebuilding it", self.directory, INDEX_NAME)
        self._index_records(lambda: read_records(self.directory))

    def _index_records(self, records: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        """Two passes, decisions first: a reward may be in a file read before its decision's."""
        for kind in ("decision", "reward"):
            ids: list[tuple[str, str | None]] = []
            for record in records():
                if record.get("type") == kind:
                    ids.append((str(record["decision_id"]), record.get("episode_id")))
                if len(ids) >= _INDEX_CHUNK:
                    self._commit_ids(kind, ids)
                    ids = []
            self._commit_ids(kind, ids)

    def _commit_ids(self, kind: str, ids: list[tuple[str, str | None]]) -> None:
        if kind == "decision":
            self._index.commit(ids, [])
        else:
            self._index.commit([], [decision_id for decision_id, _ in ids])


def _reward_status(item: Mapping[str, Any], known: bool) -> str:
    reward = item.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
        return "invalid"
    return "joined" if known else "unknown_decision"


def _flag(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
