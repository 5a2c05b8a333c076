"""Step counts of episodes whose requests do not say their step.

One process counts in memory. Several worker processes share one count through a small
SQLite file in the supervisor's run folder: an episode's requests may reach any worker, and
its steps must still follow each other.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Protocol


class StepCounter(Protocol):
    def take(self, episode_id: str, given: int | None) -> int:
        """The step of this decision: `given` when the client said it, else the next one;
        either way, the episode's next step is the one after."""
        ...

    def end(self, episode_id: str) -> None: ...


class LocalSteps:
    """In memory, for one process; the least recently seen episodes are forgotten first."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._steps: OrderedDict[str, int] = OrderedDict()
        self._capacity = capacity

    def take(self, episode_id: str, given: int | None) -> int:
        steps = self._steps
        step = given if given is not None else steps.get(episode_id, 0)
        steps[episode_id] = step + 1
        steps.move_to_end(episode_id)
        if len(steps) > self._capacity:
            steps.popitem(last=False)
        return step

    def end(self, episode_id: str) -> None:
        self._steps.pop(episode_id, None)


class SharedSteps:
    """In an SQLite file that every worker opens. One statement a decision, no fsync: a
    count is worth less than the latency an fsync would cost, and a lost count only means
    that a client that never sends `step` sees its numbering restart after a crash."""

    FORGET_AFTER_S = 24 * 3600.0
    _PRUNE_EVERY = 10_000

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS steps "
            "(episode TEXT PRIMARY KEY, next INTEGER NOT NULL, seen REAL NOT NULL)"
        )
        self._lock = threading.Lock()
        self._taken = 0

    def take(self, episode_id: str, given: int | None) -> int:
        now = time.time()
        with self._lock:
            if given is None:
                row = self._db.execute(
                    "INSERT INTO steps VALUES (?, 1, ?) ON CONFLICT(episode) DO UPDATE "
                    "SET next = next + 1, seen = excluded.seen RETURNING next - 1",
                    (episode_id, now),
                ).fetchone()
                step = int(row[0])
            else:
                self._db.execute(
                    "INSERT INTO steps VALUES (?, ?, ?) ON CONFLICT(episode) DO UPDATE "
                    "SET next = excluded.next, seen = excluded.seen",
                    (episode_id, given + 1, now),
                )
                step = given
            self._taken += 1
            if self._taken % self._PRUNE_EVERY == 0:
                self._db.execute("DELETE FROM steps WHERE seen < ?", (now - self.FORGET_AFTER_S,))
        return step

    def end(self, episode_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM steps WHERE episode = ?", (episode_id,))
