"""Shadow scoring: a shadow version scores the same observations in a thread of its own,
after the answer has gone out.

Its model never runs on the event loop, so a slow shadow adds nothing to the answering
version's latency. When the shadow falls behind, new work is skipped and counted, never
queued without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.metrics import Metrics
from policy_server.policy.distribution import Categorical
from policy_server.serving.registry import PolicyRegistry, PolicyVersion
from policy_server.serving.service import PredictionEvent

logger = logging.getLogger(__name__)


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
