"""The episode store: per episode of a policy, its step count, the decision answered last
(whose reward the next step's envelope carries) and, for a recurrent policy, what the next
step feeds the model (the state the model returned and the action answered), with the
version that produced it.

It is bounded: at most `max_episodes` live episodes (the least recently stepped are evicted
first) and an episode not stepped for `idle_s` is forgotten. One process holds it in memory;
the workers of `serve --workers` share one SQLite file in the supervisor's run folder, so that
any worker answers any step of any episode the same. The service asks the store what an
episode carries before the model runs and hands back what the model returned after it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DEFAULT_MAX_EPISODES = 100_000
DEFAULT_IDLE_S = 3600.0


@dataclass(frozen=True)
class StepKey:
    """One decision of an episode, as the service asks the store for it."""

    episode_id: str
    policy: str
    version: str
    decision_id: str
    # The client's step; None lets the store count.
    given: int | None = None


@dataclass(frozen=True)
class EpisodeStep:
    """What the store held for a step. `carried` is what the previous step of the same
    version left for this one (None: start from zeros); `state_reset` says that the
    episode had steps before this one whose state is gone (evicted, idle, ended, or held
    by another version)."""

    step: int
    previous_decision: str | None
    carried: bytes | None
    state_reset: bool


@dataclass(frozen=True)
class Carried:
    """What a recurrent step leaves for the episode's next one."""

    episode_id: str
    policy: str
    version: str
    carried: bytes


class EpisodeStore(Protocol):
    secret: bytes

    async def begin(self, keys: Sequence[StepKey]) -> list[EpisodeStep]:
        """Count each key's step and remember its decision; return what it carries."""
        ...

    async def keep(self, items: Sequence[Carried]) -> None:
        """What the model returned for these steps, for the episodes' next ones."""
        ...

    async def end(self, episode_id: str) -> None:
        """Forget the episode (of every policy): its next step starts from zeros."""
        ...

    def close(self) -> None: ...


@dataclass
class _Entry:
    next: int
    decision: str | None
    version: str
    carried: bytes | None
    seen: float


def _advance(entry: _Entry | None, key: StepKey, now: float, idle_s: float) -> EpisodeStep:
    """The rules both stores follow; `entry` is None for an episode not held (or expired)."""
    if entry is not None and entry.seen < now - idle_s:
        entry = None
    if entry is None:
        step = key.given if key.given is not None else 0
        return EpisodeStep(step, None, None, state_reset=step > 0)
    step = key.given if key.given is not None else entry.next
    if step == 0:  # the client starts the episode over
        return EpisodeStep(0, entry.decision, None, state_reset=False)
    same = entry.version == key.version
    carried = entry.carried if same else None
    return EpisodeStep(step, entry.decision, carried, state_reset=not same)


class LocalEpisodes:
    """In memory, for one process; every call runs at once, on the caller's thread."""

    def __init__(
        self,
        max_episodes: int = DEFAULT_MAX_EPISODES,
        idle_s: float = DEFAULT_IDLE_S,
        secret: bytes | None = None,
    ) -> None:
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._max = max_episodes
        self._idle_s = idle_s
        self.secret = secret or os.urandom(32)

    def __len__(self) -> int:
        return len(self._entries)

    async def begin(self, keys: Sequence[StepKey]) -> list[EpisodeStep]:
        now = time.time()
        entries = self._entries
        answers = []
        for key in keys:
            slot = (key.episode_id, key.policy)
            entry = entries.get(slot)
            answer = _advance(entry, key, now, self._idle_s)
            carried = answer.carried
            if entry is None or entry.seen < now - self._idle_s:
                entry = entries[slot] = _Entry(0, None, key.version, None, now)
            entries.move_to_end(slot)
            entry.next, entry.decision, entry.seen = answer.step + 1, key.decision_id, now
            entry.version, entry.carried = key.version, carried
            answers.append(answer)
        self._prune(now)
        return answers

    async def keep(self, items: Sequence[Carried]) -> None:
        for item in items:
            entry = self._entries.get((item.episode_id, item.policy))
            if entry is not None and entry.version == item.version:
                entry.carried = item.carried

    async def end(self, episode_id: str) -> None:
        for slot in [s for s in self._entries if s[0] == episode_id]:
            del self._entries[slot]

    def close(self) -> None:
        self._entries.clear()

    def _prune(self, now: float) -> None:
        entries = self._entries
        while len(entries) > self._max:
            entries.popitem(last=False)
        # Least recently stepped first: the expired ones are at the front.
        while entries:
            oldest = next(iter(entries.values()))
            if oldest.seen >= now - self._idle_s:
                break
            entries.popitem(last=False)


class SharedEpisodes:
    """In an SQLite file that every worker opens, read and written on a thread of its own,
    never on the event loop: a worker waiting for another's write lock keeps answering.
    No fsync: a lost step count or state after a crash restarts an episode from zeros,
    which its answer reports. Expired and excess episodes are removed at most once a
    second, through an index on the time they were last stepped."""

    BUSY_TIMEOUT_S = 5.0
    PRUNE_EVERY_S = 1.0

    def __init__(
        self,
        path: Path,
        max_episodes: int = DEFAULT_MAX_EPISODES,
        idle_s: float = DEFAULT_IDLE_S,
        secret: bytes | None = None,
    ) -> None:
        self._max = max_episodes
        self._idle_s = idle_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="episode-store")
        self._pruned = 0.0
        self._local = threading.local()
        self._path = path
        db = self._db()
        with db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS episodes (episode TEXT NOT NULL, policy TEXT NOT "
                "NULL, next INTEGER NOT NULL, decision TEXT, version TEXT NOT NULL, carried "
                "BLOB, seen REAL NOT NULL, PRIMARY KEY (episode, policy)) WITHOUT ROWID"
            )
            db.execute("CREATE INDEX IF NOT EXISTS episodes_seen ON episodes (seen)")
            db.execute("CREATE TABLE IF NOT EXISTS secret (id INTEGER PRIMARY KEY, value BLOB)")
            # The first worker's secret signs every worker's state strings.
            db.execute("INSERT OR IGNORE INTO secret VALUES (0, ?)", (secret or os.urandom(32),))
            row = db.execute("SELECT value FROM secret WHERE id = 0").fetchone()
        self.secret = bytes(row[0]) if secret is None else secret

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (the constructor's, then the store's own thread's)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._path, timeout=self.BUSY_TIMEOUT_S, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            self._local.db = db
        return db

    async def _run(self, function: object, *args: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)  # type: ignore[arg-type]

    async def begin(self, keys: Sequence[StepKey]) -> list[EpisodeStep]:
        answers: list[EpisodeStep] = await self._run(self._begin, list(keys))  # type: ignore[assignment]
        return answers

    async def keep(self, items: Sequence[Carried]) -> None:
        await self._run(self._keep, list(items))

    async def end(self, episode_id: str) -> None:
        await self._run(self._end, episode_id)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _begin(self, keys: list[StepKey]) -> list[EpisodeStep]:
        now = time.time()
        db = self._db()
        answers = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for key in keys:
                row = db.execute(
                    "SELECT next, decision, version, carried, seen FROM episodes "
                    "WHERE episode = ? AND policy = ?",
                    (key.episode_id, key.policy),
                ).fetchone()
                entry = None if row is None else _Entry(row[0], row[1], row[2], row[3], row[4])
                answer = _advance(entry, key, now, self._idle_s)
                db.execute(
                    "INSERT OR REPLACE INTO episodes VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        key.episode_id,
                        key.policy,
                        answer.step + 1,
                        key.decision_id,
                        key.version,
                        answer.carried,
                        now,
                    ),
                )
                answers.append(answer)
            if now - self._pruned >= self.PRUNE_EVERY_S:
                self._pruned = now
                self._prune(db, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return answers

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM episodes WHERE seen < ?", (now - self._idle_s,))
        (count,) = db.execute("SELECT count(*) FROM episodes").fetchone()
        if count > self._max:
            db.execute(
                "DELETE FROM episodes WHERE seen <= (SELECT seen FROM episodes "
                "ORDER BY seen LIMIT 1 OFFSET ?)",
                (count - self._max - 1,),
            )

    def _keep(self, items: list[Carried]) -> None:
        db = self._db()
        db.executemany(
            "UPDATE episodes SET carried = ? WHERE episode = ? AND policy = ? AND version = ?",
            [(i.carried, i.episode_id, i.policy, i.version) for i in items],
        )

    def _end(self, episode_id: str) -> None:
        self._db().execute("DELETE FROM episodes WHERE episode = ?", (episode_id,))
