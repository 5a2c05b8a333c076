"""Observers of answered predictions: action metrics, and shadow scoring.

A shadow version scores the same observations in a thread of its own, after the answer has
gone out: its model never runs on the event loop, so a slow shadow adds nothing to the
answering version's latency. When the shadow falls behind, new work is skipped and counted,
never queued without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.experience.log import DecisionLog
from policy_server.experience.records import PendingDecisions, reward_record
from policy_server.metrics import Metrics
from policy_server.policy.distribution import Categorical
from policy_server.serving.registry import PolicyRegistry, PolicyVersion
from policy_server.serving.service import PredictionEvent

logger = logging.getLogger(__name__)


class ActionMetrics:
    """Counts the discrete actions served, per policy and version."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def observe(self, event: PredictionEvent) -> None:
        if isinstance(event.version.loaded.distribution, Categorical):
            values: npt.NDArray[np.int64] = event.chosen.values  # type: ignore[assignment]
            self.metrics.count_actions(event.version.name, event.version.version, values)
        if event.state_resets is not None:
            resets = sum(1 for reset in event.state_resets if reset)
            if resets:
                version = event.version
                self.metrics.state_resets.labels(version.name, version.version).inc(resets)


@dataclass
class ShadowWork:
    primary: PolicyVersion
    shadow: PolicyVersion
    rows: npt.NDArray[np.float32]
    masks: npt.NDArray[np.bool_] | None
    primary_modes: npt.NDArray[Any]
    decision_ids: list[str]


ShadowSink = Callable[[ShadowWork, dict[str, Any]], None]


class ShadowScorer:
    """Scores each answered observation with the policy's shadow version, off the request
    path, and exports how often it agrees with the version that answered."""

    def __init__(self, registry: PolicyRegistry, metrics: Metrics, capacity: int) -> None:
        self.registry = registry
        self.metrics = metrics
        self.sinks: list[ShadowSink] = []
        self._queue: queue.Queue[ShadowWork | None] = queue.Queue(capacity)
        self._thread: threading.Thread | None = None

    async def observe(self, event: PredictionEvent) -> None:
        entry = self.registry.entry(event.version.name)
        shadow = entry.shadow_version(event.version)
        if shadow is None:
            return
        modes = event.version.loaded.distribution.mode(event.logits).values
        work = ShadowWork(
            event.version,
            shadow,
            event.rows,
            event.masks,
            modes,
            [p["decision_id"] for p in event.predictions],
        )
        try:
            self._queue.put_nowait(work)
        except queue.Full:
            self.metrics.shadow_skipped.labels(shadow.name, shadow.version).inc(len(event.rows))
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            try:
                self._score(work)
            except Exception as error:  # a failing shadow is counted, never fatal
                logger.warning(
                    "shadow %s/%s failed: %s", work.shadow.name, work.shadow.version, error
                )
                self._count(work, "error", len(work.rows))

    def _score(self, work: ShadowWork) -> None:
        policy = work.shadow.policy
        if policy is None:  # unloaded meanwhile
            return
        outputs = policy.runtime.forward(work.rows)
        logits = outputs.logits
        if work.masks is not None and isinstance(policy.distribution, Categorical):
            logits = policy.distribution.masked(logits, work.masks)
        mode = policy.distribution.mode(logits)
        agree = _agreement(work.primary_modes, mode.values)
        self._count(work, "agree", int(agree.sum()))
        self._count(work, "disagree", int((~agree).sum()))
        for sink in self.sinks:
            exact = policy.distribution.distribution(logits)
            for row, decision_id in enumerate(work.decision_ids):
                sink(
                    work,
                    {
                        "decision_id": decision_id,
                        "version": work.shadow.version,
                        "actions": mode.values[row].tolist(),
                        "probability": float(np.exp(mode.log_prob[row])),
                        "distribution": _row_distribution(exact, row),
                    },
                )

    def _count(self, work: ShadowWork, result: str, count: int) -> None:
        if count:
            self.metrics.shadow_comparisons.labels(
                work.primary.name, work.primary.version, work.shadow.version, result
            ).inc(count)


def _agreement(primary: npt.NDArray[Any], shadow: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Same most likely action; for continuous actions, means within 1e-3 of each other."""
    if np.issubdtype(primary.dtype, np.integer):
        return np.asarray((primary == shadow).all(axis=1))
    return np.asarray(np.isclose(primary, shadow, atol=1e-3).all(axis=1))


def _row_distribution(exact: Any, row: int) -> dict[str, Any]:
    if exact.probabilities is not None:
        return {"probabilities": [component[row].tolist() for component in exact.probabilities]}
    return {"mean": exact.mean[row].tolist(), "std": exact.std[row].tolist()}


class DecisionLogger:
    """Writes one record per answered decision to the decision log, and the shadow's answers
    beside them. Awaits the log: its back-pressure (and sync mode) hold the answer back."""

    def __init__(
        self, log: DecisionLog, worker: str = "0", registry: PolicyRegistry | None = None
    ) -> None:
        self.log = log
        self.worker = worker
        self.registry = registry

    async def observe(self, event: PredictionEvent) -> None:
        # Only what the call already has; the log's writer thread builds the records.
        version = event.version
        predictions = event.predictions
        pending = PendingDecisions(
            time=time.time(),
            policy=version.name,
            version=version.version,
            worker=self.worker,
            decision_ids=[p["decision_id"] for p in predictions],
            episodes=[(p.get("episode_id"), p.get("step")) for p in predictions],
            rows=event.rows,
            logits=event.logits,
            chosen=event.chosen,
            values=event.outputs.value,
            sampled=event.sampled,
            action_distribution=version.loaded.distribution,
            masks=event.masks,
            state_resets=event.state_resets,
            inputs=event.inputs,
            allocation=self._allocation(event),
        )
        # A step's reward belongs to the decision before it, which this log or another
        # worker's wrote before this step was asked for.
        rewards = [reward_record(decision, reward) for decision, reward in event.rewards]
        if rewards:
            await self.log.append(rewards)
        await self.log.append(pending)

    def _allocation(self, event: PredictionEvent) -> float | None:
        """The probability the traffic split gave the answering version (an episode's too:
        weighted rendezvous hashing picks a version with probability proportional to its
        weight); None when a version route pinned it."""
        if event.pinned or self.registry is None:
            return None
        return self.registry.allocation(event.version)

    def shadow_answer(self, _: ShadowWork, answer: dict[str, Any]) -> None:
        """A shadow sink: runs in the shadow thread, so it may block on a full queue."""
        self.log.append_blocking([{"type": "shadow", "time": time.time(), **answer}])
