"""Observers of answered predictions: action metrics and the decision log. Shadow scoring,
the other observer, is in `shadow`."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.experience.log import DecisionLog
from policy_server.experience.records import PendingDecisions, reward_record
from policy_server.metrics import Metrics
from policy_server.policy.distribution import Categorical
from policy_server.serving.registry import PolicyRegistry
from policy_server.serving.service import PredictionEvent
from policy_server.serving.shadow import ShadowWork

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
