"""The registry of policies by name and version, with each version's lifecycle.

A version goes `loading -> ready -> draining -> unloaded` (or `failed`). Requests resolve a
(name, version) on every call and hold a lease on the version while they run, so a version
being replaced finishes what it started before it is unloaded. Hooks create and close what a
version needs to serve (its micro-batcher, its Ray deployment); the registry knows nothing of
HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from policy_server.errors import PolicyNotFound, PolicyUnavailable
from policy_server.loading.repository import version_order
from policy_server.policy.loaded import LoadedPolicy
from policy_server.settings import PolicySettings

if TYPE_CHECKING:
    from policy_server.serving.service import ModelCaller

logger = logging.getLogger(__name__)

Traffic = tuple[dict[str, float] | None, str | None]
"""A policy's traffic weights by version (None: the newest ready version answers all) and its
shadow version."""


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    UNLOADED = "unloaded"


@dataclass(eq=False)
class PolicyVersion:
    """One version of one policy, in whatever state of its life it is."""

    name: str
    version: str
    folder: Path
    versioned: bool = False
    state: State = State.LOADING
    reason: str | None = None
    policy: LoadedPolicy | None = None
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0
    # What the hooks attach: the model caller and anything they must close later.
    caller: ModelCaller | None = None
    idle: asyncio.Event | None = None

    @property
    def loaded(self) -> LoadedPolicy:
        if self.policy is None:
            raise PolicyUnavailable(f"policy {self.name!r} version {self.version!r} is not loaded")
        return self.policy


@dataclass(eq=False)
class PolicyEntry:
    """A policy: its versions, how traffic is split between them, and its settings."""

    name: str
    settings: PolicySettings
    versions: dict[str, PolicyVersion] = field(default_factory=dict)
    traffic: dict[str, float] | None = None
    shadow: str | None = None
    # Rebuilt whenever a version changes state or the weights change: the ready versions
    # that take unpinned traffic, with their weights.
    _routable: list[tuple[PolicyVersion, float]] = field(default_factory=list)
    _latest: PolicyVersion | None = None

    def ordered(self) -> list[PolicyVersion]:
        """Oldest first (integer names as integers, else by load time)."""
        loaded_at = {v.version: v.loaded_at for v in self.versions.values()}
        return [self.versions[v] for v in version_order(list(self.versions), loaded_at)]

    def refresh(self) -> None:
        ready = [v for v in self.ordered() if v.state is State.READY]
        self._latest = ready[-1] if ready else None
        weights = self.traffic or {}
        self._routable = [(v, weights[v.version]) for v in ready if weights.get(v.version, 0) > 0]
        if not self._routable and self._latest is not None:
            # No named version is ready (or none is named): the newest ready one answers.
            self._routable = [(self._latest, 1.0)]

    @property
    def primary(self) -> PolicyVersion | None:
        """The version whose schema the policy's routes publish: the newest routable one."""
        return self._routable[-1][0] if self._routable else None

    def weight_of(self, version: PolicyVersion) -> float:
        if len(self._routable) == 1:  # the common case, asked for every decision logged
            return 100.0 if self._routable[0][0] is version else 0.0
        total = sum(w for _, w in self._routable)
        return next((100.0 * w / total for v, w in self._routable if v is version), 0.0)

    def route(self, episode_id: str | None) -> PolicyVersion:
        candidates = self._routable
        if not candidates:
            raise PolicyUnavailable(f"policy {self.name!r} has no ready version")
        if len(candidates) == 1:
            return candidates[0][0]
        if episode_id is None:
            versions = [v for v, _ in candidates]
            return random.choices(versions, [w for _, w in candidates])[0]
        return sticky_choice(episode_id, candidates)

    def shadow_version(self, answering: PolicyVersion) -> PolicyVersion | None:
        if self.shadow is None or self.shadow == answering.version:
            return None
        shadow = self.versions.get(self.shadow)
        return shadow if shadow is not None and shadow.state is State.READY else None


class Lease:
    """A context manager that holds versions (see `PolicyRegistry.lease`); a class, not a
    generator, because every request takes one."""

    __slots__ = ("versions",)

    def __init__(self, versions: tuple[PolicyVersion, ...]) -> None:
        self.versions = versions

    def __enter__(self) -> None:
        for version in self.versions:
            version.in_flight += 1

    def __exit__(self, *_: object) -> None:
        for version in self.versions:
            version.in_flight -= 1
            if version.in_flight == 0 and version.idle is not None:
                version.idle.set()


def sticky_choice(episode_id: str, candidates: list[tuple[PolicyVersion, float]]) -> PolicyVersion:
    """Weighted rendezvous hashing: the same episode always gets the same version, in every
    process and after restarts; when a version comes or goes, only the episodes that must
    move do."""
    best, best_score = candidates[0][0], -math.inf
    for version, weight in candidates:
        digest = hashlib.blake2b(f"{episode_id}\0{version.version}".encode(), digest_size=8)
        unit = (int.from_bytes(digest.digest(), "big") + 0.5) / 2.0**64
        score = -weight / math.log(unit)
        if score > best_score:
            best, best_score = version, score
    return best


Hook = Callable[[PolicyVersion], Awaitable[None]]


class PolicyRegistry:
    """Policies by name, each with its versions and their lifecycle, the traffic split and
    the default policy. Requests resolve a version here per call and hold a lease on it while
    they run; `on_ready` and `on_unload` hooks attach and close what a version needs to
    serve. The registry changes only through the lifecycle manager and the admin routes."""

    def __init__(self) -> None:
        self._entries: dict[str, PolicyEntry] = {}
        self.default_name: str | None = None
        self.on_ready: list[Hook] = []
        self.on_unload: list[Hook] = []

    # --- lookups, on every request -------------------------------------------------------

    def entry(self, name: str | None = None) -> PolicyEntry:
        if name is None:
            name = self.default_name
            if name is None:
                raise PolicyNotFound("no policy is loaded")
        entry = self._entries.get(name)
        if entry is None:
            raise PolicyNotFound(f"no policy named {name!r}; serving {sorted(self._entries)}")
        return entry

    def resolve(
        self, name: str | None = None, version: str | None = None, episode_id: str | None = None
    ) -> PolicyVersion:
        """The version that answers: pinned by `version`, else by the traffic split (sticky
        per `episode_id`)."""
        entry = self.entry(name)
        if version is None:
            return entry.route(episode_id)
        found = entry.versions.get(version)
        if found is None:
            raise PolicyNotFound(
                f"policy {entry.name!r} has no version {version!r}; it has {sorted(entry.versions)}"
            )
        if found.state is not State.READY:
            raise PolicyUnavailable(
                f"policy {entry.name!r} version {version!r} is {found.state.value}"
                + (f": {found.reason}" if found.reason else "")
            )
        return found

    def lease(self, *versions: PolicyVersion) -> Lease:
        """Hold `versions` for one request: none is unloaded before the lease ends. Take it
        in the same step of the event loop as the lookup that chose them, so that no reload
        runs in between."""
        return Lease(versions)

    def allocation(self, version: PolicyVersion) -> float | None:
        """The probability the traffic split gives `version` now (an episode's too: weighted
        rendezvous hashing picks a version with probability proportional to its weight);
        None when its policy is gone."""
        entry = self._entries.get(version.name)
        return None if entry is None else entry.weight_of(version) / 100.0

    def entries(self) -> list[PolicyEntry]:
        return list(self._entries.values())

    def all_ready(self) -> bool:
        return bool(self._entries) and all(e.primary is not None for e in self._entries.values())

    # --- lifecycle ----------------------------------------------------------------------

    def ensure_entry(self, name: str, settings: PolicySettings) -> PolicyEntry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = PolicyEntry(name, settings)
        else:
            entry.settings = settings
        return entry

    def remove_entry(self, name: str) -> None:
        self._entries.pop(name, None)
        if self.default_name == name:
            self.default_name = next(iter(self._entries), None)

    def set_traffic(
        self, name: str, traffic: dict[str, float] | None, shadow: str | None
    ) -> PolicyEntry:
        entry = self.entry(name)
        entry.traffic, entry.shadow = traffic, shadow
        entry.refresh()
        return entry

    async def add(self, entry: PolicyEntry, version: PolicyVersion, policy: LoadedPolicy) -> None:
        """Make a loaded version ready: hooks first, then it takes traffic."""
        version.policy = policy
        for hook in self.on_ready:
            await hook(version)
        version.state, version.reason = State.READY, None
        entry.versions[version.version] = version
        entry.refresh()

    def fail(self, entry: PolicyEntry, version: PolicyVersion, reason: str) -> None:
        version.state, version.reason, version.policy = State.FAILED, reason, None
        entry.versions[version.version] = version
        entry.refresh()

    async def retire(self, entry: PolicyEntry, version: PolicyVersion, timeout_s: float) -> None:
        """Stop routing to `version`, wait for its requests in flight, then unload it."""
        if version.state in (State.DRAINING, State.UNLOADED):
            return
        was_ready = version.state is State.READY
        version.state = State.DRAINING
        entry.refresh()
        if was_ready:
            version.idle = asyncio.Event()
            if version.in_flight:
                try:
                    await asyncio.wait_for(version.idle.wait(), timeout_s)
                except TimeoutError:
                    logger.warning(
                        "policy %s version %s still had %d requests after %.0fs; unloading",
                        entry.name,
                        version.version,
                        version.in_flight,
                        timeout_s,
                    )
            for hook in self.on_unload:
                await hook(version)
        version.state, version.policy, version.caller = State.UNLOADED, None, None
        if entry.versions.get(version.version) is version:
            del entry.versions[version.version]
        entry.refresh()
