"""What the workers of one server share through the supervisor's run folder: their slots,
and the admin changes (`state.json`) that every worker applies.

The worker whose admin route received a change applies it and records it there; every
other worker checks the file each second and applies what changed, and a replacement
applies it at start-up. A file rather than a signal from the supervisor: changes survive any
worker's death, and the supervisor stays out of the request path.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from policy_server.errors import PolicyLoadError, PolicyNotFound
from policy_server.metrics import Metrics
from policy_server.serving.lifecycle import PolicyManager, ReloadReport
from policy_server.serving.registry import PolicyEntry, PolicyRegistry, Traffic
from policy_server.settings import Settings

logger = logging.getLogger(__name__)

FOLLOW_INTERVAL_S = 1.0


@dataclass(frozen=True)
class RunFolder:
    """The supervisor's folder, shared with its workers."""

    path: Path

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def startup_error(self) -> Path:
        return self.path / "startup-error.txt"

    @property
    def episodes(self) -> Path:
        """The episode store: step counts and recurrent state, shared by the workers."""
        return self.path / "episodes.sqlite"

    def claim_slot(self) -> tuple[int, IO[bytes]]:
        """The lowest worker index no live worker holds, and the lock that holds it."""
        index = 0
        while True:
            handle = (self.path / f"worker-{index}.lock").open("ab")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                index += 1
                continue
            return index, handle


@dataclass(frozen=True)
class AdminState:
    """What the admins changed so far: a count of reloads, and the traffic set per policy."""

    reloads: int = 0
    traffic: dict[str, Traffic] = field(default_factory=dict)

    def to_json(self) -> str:
        policies = {name: {"traffic": t, "shadow": s} for name, (t, s) in self.traffic.items()}
        return json.dumps({"reloads": self.reloads, "traffic": policies})

    @classmethod
    def from_json(cls, text: str) -> AdminState:
        data = json.loads(text)
        traffic = {name: (p["traffic"], p["shadow"]) for name, p in data["traffic"].items()}
        return cls(int(data["reloads"]), traffic)


class SharedState:
    """`state.json`, replaced atomically, so a reader never sees half a change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> AdminState:
        try:
            return AdminState.from_json(self.path.read_text())
        except FileNotFoundError:
            return AdminState()

    def record_reload(self) -> AdminState:
        return self._update(lambda state: AdminState(state.reloads + 1, state.traffic))

    def record_traffic(self, name: str, traffic: Traffic) -> AdminState:
        return self._update(
            lambda state: AdminState(state.reloads, state.traffic | {name: traffic})
        )

    def _update(self, change: Callable[[AdminState], AdminState]) -> AdminState:
        with self._locked():
            state = change(self.read())
            staging = self.path.with_suffix(".tmp")
            staging.write_text(state.to_json())
            staging.replace(self.path)
            return state

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self.path.with_suffix(".lock").open("ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield


class SharedPolicyManager(PolicyManager):
    """A worker's manager: the admin changes it receives are recorded for the other workers,
    and it applies theirs. It scans the policy folders on the usual interval itself, apart
    from the admin reloads, which are the only ones shared."""

    def __init__(
        self,
        settings: Settings,
        registry: PolicyRegistry,
        metrics: Metrics,
        state: SharedState,
        slot: IO[bytes],
    ) -> None:
        super().__init__(settings, registry, metrics)
        self.state = state
        self.slot = slot  # held for the worker's life: its index is taken
        self._seen = state.read()
        self._follower: asyncio.Task[None] | None = None
        self._changing = asyncio.Lock()

    @property
    def poll_interval(self) -> float:
        return 0.0  # the follower scans the folders instead (`_follow`)

    async def start(self) -> None:
        await super().start()
        self._apply_traffic(AdminState(), self._seen)  # a replacement catches up
        self.changed()
        self._follower = asyncio.create_task(self._follow(), name="admin-follower")

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        await super().close()

    async def reload(self) -> ReloadReport:
        """An admin's reload: this worker reloads now, the others within a second."""
        report = await super().reload()
        recorded = await asyncio.to_thread(self.state.record_reload)
        self._seen = AdminState(recorded.reloads, self._seen.traffic)
        return report

    async def set_traffic(
        self, name: str, traffic: dict[str, float] | None, shadow: str | None
    ) -> PolicyEntry:
        """Applied here at once, then recorded for the other workers in a thread: the state
        file's lock may be held by another worker. One change at a time, so that the file
        records them in the order they were applied."""
        async with self._changing:
            entry = self._set_traffic(name, traffic, shadow)
            await asyncio.to_thread(self.state.record_traffic, name, (traffic, shadow))
            seen = self._seen
            self._seen = AdminState(seen.reloads, seen.traffic | {name: (traffic, shadow)})
        return entry

    async def _follow(self) -> None:
        scan_every = super().poll_interval
        next_scan = time.monotonic() + scan_every if scan_every else math.inf
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL_S)
            try:
                await self._catch_up()
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + scan_every
                    await super().reload()
            except Exception:  # the follower must outlive any one failure
                logger.exception("following the other workers' changes failed")

    async def _catch_up(self) -> None:
        state = await asyncio.to_thread(self.state.read)
        if state == self._seen:
            return
        seen, self._seen = self._seen, state
        if state.reloads != seen.reloads:
            await super().reload()
        self._apply_traffic(seen, state)
        self.changed()

    def _apply_traffic(self, seen: AdminState, state: AdminState) -> None:
        for name, (traffic, shadow) in state.traffic.items():
            if seen.traffic.get(name) == (traffic, shadow):
                continue
            try:
                self._set_traffic(name, traffic, shadow)
            except (PolicyLoadError, PolicyNotFound) as error:
                logger.warning("another worker's traffic change of %s: %s", name, error)
