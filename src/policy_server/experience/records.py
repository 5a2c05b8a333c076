"""The records a decision log holds: decisions, rewards and episode ends, as plain dicts.

Plain dicts because the server builds one per answered decision on the request path and
orjson writes a dict fastest; the TypedDicts document the shape and let mypy check it.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any, Literal, TypedDict


class Shadow(TypedDict):
    """What the shadow version would have answered for the same observation."""

    version: str
    actions: list[Any]
    probability: float
    distribution: dict[str, Any]


class Decision(TypedDict):
    type: Literal["decision"]
    time: float
    decision_id: str
    policy: str
    version: str
    episode_id: str | None
    step: int | None
    obs: list[float]
    action_mask: list[list[int]] | None
    actions: list[Any]
    probability: float
    log_probability: float
    sampled: bool
    distribution: dict[str, Any]
    logits: list[float]
    value: float | None
    shadow: Shadow | None
    worker: str


class Reward(TypedDict):
    type: Literal["reward"]
    time: float
    decision_id: str
    reward: float
    terminated: bool | None
    truncated: bool | None


class EpisodeEnd(TypedDict):
    type: Literal["episode_end"]
    time: float
    episode_id: str
    terminated: bool
    truncated: bool


class _DecisionIds:
    """UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then a counter, then random bits.

    The counter keeps ids from one process strictly increasing within a millisecond, so
    sorting by id sorts by time, which keeps the SQLite index's B-tree appends cheap.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def new(self) -> str:
        with self._lock:
            now_ms = time.time_ns() // 1_000_000
            if now_ms > self._last_ms:
                self._last_ms, self._counter = now_ms, int.from_bytes(os.urandom(2)) & 0x3FF
            else:
                self._counter += 1
                if self._counter > 0xFFF:
                    self._last_ms, self._counter = self._last_ms + 1, 0
            ms, counter = self._last_ms, self._counter
        value = (ms & ((1 << 48) - 1)) << 80
        value |= 0x7 << 76 | counter << 64
        value |= 0b10 << 62 | int.from_bytes(os.urandom(8)) & ((1 << 62) - 1)
        return str(uuid.UUID(int=value))


new_decision_id = _DecisionIds().new
"""A new time-ordered decision id (a UUIDv7 string)."""


def reward_record(
    decision_id: str,
    reward: float,
    terminated: bool | None = None,
    truncated: bool | None = None,
) -> Reward:
    return {
        "type": "reward",
        "time": time.time(),
        "decision_id": decision_id,
        "reward": float(reward),
        "terminated": terminated,
        "truncated": truncated,
    }


def episode_end_record(episode_id: str, terminated: bool, truncated: bool) -> EpisodeEnd:
    return {
        "type": "episode_end",
        "time": time.time(),
        "episode_id": episode_id,
        "terminated": terminated,
        "truncated": truncated,
    }
