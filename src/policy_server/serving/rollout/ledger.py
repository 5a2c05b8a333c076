"""The rollouts' own record, in an SQLite file beside the decision log (`rollouts.sqlite`).

One row per policy holds its rollout (the spec, the state, the history) and its evidence
(the confidence sequences' state); the units it has assigned and the decisions that belong
to them map each late reward to its unit in one indexed lookup. Every worker process opens
the file (WAL mode) and folds what its own decision log wrote into the shared evidence in
one transaction, so the evidence is the same whichever worker answers, each unit counts
once, and a restarted server continues the same sequences instead of starting from zero.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEDGER_NAME = "rollouts.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    policy TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    record TEXT NOT NULL,
    evidence TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS units (
    rollout TEXT NOT NULL,
    unit TEXT NOT NULL,
    candidate INTEGER NOT NULL,
    own_p REAL NOT NULL,
    total REAL NOT NULL DEFAULT 0,
    decisions INTEGER NOT NULL DEFAULT 0,
    rewarded INTEGER NOT NULL DEFAULT 0,
    last REAL NOT NULL,
    ended INTEGER NOT NULL DEFAULT 0,
    switched INTEGER NOT NULL DEFAULT 0,
    open INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (rollout, unit)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS open_units ON units (rollout, last) WHERE open = 1;
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY,
    rollout TEXT NOT NULL,
    unit TEXT NOT NULL,
    rewarded INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""


@dataclass
class Unit:
    rollout: str
    unit: str
    candidate: bool
    own_p: float  # the smallest allocation its version had over the unit's decisions
    total: float
    decisions: int
    rewarded: int
    last: float
    ended: bool
    switched: bool

    @property
    def p(self) -> float:
        """The probability the unit had of going to the candidate."""
        return self.own_p if self.candidate else 1.0 - self.own_p


_UNIT_COLUMNS = "rollout, unit, candidate, own_p, total, decisions, rewarded, last, ended, switched"


def _unit(row: tuple[Any, ...]) -> Unit:
    return Unit(
        row[0], row[1], bool(row[2]), row[3], row[4], row[5], row[6], row[7], bool(row[8]),
        bool(row[9]),
    )  # fmt: skip


class Ledger:
    """The file, shared by every worker; each method is one statement, inside `transaction`
    for the writers."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LEDGER_NAME
        self._db = sqlite3.connect(
            self.path, timeout=60.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One writer at a time across processes (BEGIN IMMEDIATE takes the write lock)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- the rollouts' rows --------------------------------------------------------------

    def rollouts(self) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        with self._lock:
            rows = self._db.execute("SELECT policy, record, evidence FROM rollouts").fetchall()
        return [(policy, json.loads(record), json.loads(state)) for policy, record, state in rows]

    def records(self) -> dict[str, dict[str, Any]]:
        """Every policy's rollout record, without the evidence's sequences (cheap)."""
        with self._lock:
            rows = self._db.execute("SELECT policy, record FROM rollouts").fetchall()
        return {policy: json.loads(record) for policy, record in rows}

    def get(self, policy: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT record, evidence FROM rollouts WHERE policy = ?", (policy,)
            ).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def put(self, policy: str, record: dict[str, Any], evidence: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO rollouts (policy, id, record, evidence) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(policy) DO UPDATE SET id = excluded.id, record = excluded.record, "
                "evidence = excluded.evidence",
                (policy, record["id"], json.dumps(record), json.dumps(evidence)),
            )

    def forget_units(self, rollout: str) -> None:
        """A finished rollout's units: nothing will read them again."""
        with self._lock:
            self._db.execute("DELETE FROM units WHERE rollout = ?", (rollout,))
            self._db.execute("DELETE FROM decisions WHERE rollout = ?", (rollout,))

    # --- units and their decisions --------------------------------------------------------

    def unit(self, rollout: str, unit: str) -> Unit | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_UNIT_COLUMNS} FROM units WHERE rollout = ? AND unit = ?",
                (rollout, unit),
            ).fetchone()
        return None if row is None else _unit(row)

    def units_named(self, unit: str) -> list[Unit]:
        """Open units of any rollout named `unit` (an episode's end names no policy)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_UNIT_COLUMNS} FROM units WHERE unit = ? AND open = 1", (unit,)
            ).fetchall()
        return [_unit(row) for row in rows]

    def save_unit(self, unit: Unit, open_: bool = True) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO units (rollout, unit, candidate, own_p, total, decisions, rewarded, "
                "last, ended, switched, open) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(rollout, unit) DO UPDATE SET candidate = excluded.candidate, "
                "own_p = excluded.own_p, total = excluded.total, decisions = excluded.decisions, "
                "rewarded = excluded.rewarded, last = excluded.last, ended = excluded.ended, "
                "switched = excluded.switched, open = excluded.open",
                (
                    unit.rollout, unit.unit, int(unit.candidate), unit.own_p, unit.total,
                    unit.decisions, unit.rewarded, unit.last, int(unit.ended),
                    int(unit.switched), int(open_),
                ),
            )  # fmt: skip

    def is_open(self, rollout: str, unit: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT open FROM units WHERE rollout = ? AND unit = ?", (rollout, unit)
            ).fetchone()
        return row is not None and bool(row[0])

    def add_decision(self, decision_id: str, rollout: str, unit: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO decisions (decision_id, rollout, unit) VALUES (?, ?, ?)",
                (decision_id, rollout, unit),
            )

    def reward_target(self, decision_id: str) -> tuple[str, str, bool] | None:
        """(rollout, unit, whether it had a reward before) of a decision, now marked
        rewarded; None for a decision no rollout counts."""
        with self._lock:
            row = self._db.execute(
                "SELECT rollout, unit, rewarded FROM decisions WHERE decision_id = ?",
                (decision_id,),
            ).fetchone()
            if row is None:
                return None
            if not row[2]:
                self._db.execute(
                    "UPDATE decisions SET rewarded = 1 WHERE decision_id = ?", (decision_id,)
                )
        return row[0], row[1], bool(row[2])

    def stale(self, rollout: str, before: float, limit: int = 10_000) -> list[Unit]:
        """Open units without activity since `before`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_UNIT_COLUMNS} FROM units WHERE rollout = ? AND open = 1 AND last < ? "
                "ORDER BY last LIMIT ?",
                (rollout, before, limit),
            ).fetchall()
        return [_unit(row) for row in rows]
