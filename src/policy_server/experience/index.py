"""An SQLite index of every decision id logged in a directory, and whether it has a reward.

Rewards may arrive hours later, after restarts and rotations, so the server must recognise
any id ever logged without reading the logs. WAL mode lets several worker processes share
one index: each writes its own decisions, any of them may join a reward to any decision.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

import orjson

INDEX_NAME = "index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY,
    episode_id TEXT,
    rewarded INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS decisions_by_episode ON decisions (episode_id)
    WHERE episode_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS counts (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
# Kept in the transactions that change it, so that every worker reads the same exact count
# without a scan; an index made before this table existed is counted once.
_COUNT_AWAITING = """
INSERT OR IGNORE INTO counts (name, value)
SELECT 'awaiting_reward', COUNT(*) FROM decisions WHERE rewarded = 0
"""
_INSERT_DECISIONS = """
INSERT OR IGNORE INTO decisions (decision_id, episode_id)
SELECT value ->> 0, value ->> 1 FROM json_each(?)
"""
# SQLite allows 32766 host parameters per statement; stay well below.
_CHUNK = 10_000


def connect(directory: Path, durable: bool) -> sqlite3.Connection:
    connection = sqlite3.connect(
        directory / INDEX_NAME, timeout=60.0, isolation_level=None, check_same_thread=False
    )
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL survives a killed process (the WAL is in the OS's cache); FULL also a power cut.
    connection.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    connection.executescript(_SCHEMA)
    return connection


class DecisionIndex:
    """The writer thread's connection (writes) and a shared one for the event loop's reads."""

    def __init__(self, directory: Path, durable: bool) -> None:
        self._writer = connect(directory, durable)
        self._reader = connect(directory, durable)
        self._read_lock = threading.Lock()
        self._writer.execute("BEGIN IMMEDIATE")
        self._writer.execute(_COUNT_AWAITING)
        self._writer.execute("COMMIT")

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    def commit(self, decisions: Iterable[tuple[str, str | None]], rewarded: Iterable[str]) -> int:
        """Add decisions and mark rewarded ones in one transaction; returns how many
        decisions of every worker await a reward after it."""
        cursor = self._writer.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            # One statement for the whole group, not one per decision: the sqlite3 module
            # releases and takes back the GIL around every statement step, and each time
            # back costs the event loop's thread a switch.
            cursor.execute(_INSERT_DECISIONS, (orjson.dumps(list(decisions)),))
            inserted = max(cursor.rowcount, 0)
            first_rewards = 0
            for decision_id in rewarded:
                cursor.execute(
                    "UPDATE decisions SET rewarded = 1 WHERE decision_id = ? AND rewarded = 0",
                    (decision_id,),
                )
                first_rewards += cursor.rowcount
            awaiting = cursor.execute(
                "UPDATE counts SET value = value + ? WHERE name = 'awaiting_reward' "
                "RETURNING value",
                (inserted - first_rewards,),
            ).fetchone()[0]
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        return int(awaiting)

    def known(self, decision_ids: list[str]) -> set[str]:
        found: set[str] = set()
        with self._read_lock:
            for start in range(0, len(decision_ids), _CHUNK):
                chunk = decision_ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._reader.execute(
                    f"SELECT decision_id FROM decisions WHERE decision_id IN ({marks})", chunk
                )
                found.update(row[0] for row in rows)
        return found

    def has_episode(self, episode_id: str) -> bool:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT 1 FROM decisions WHERE episode_id = ? LIMIT 1", (episode_id,)
            ).fetchone()
        return row is not None

    def awaiting_reward(self) -> int:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT value FROM counts WHERE name = 'awaiting_reward'"
            ).fetchone()
        return int(row[0])
