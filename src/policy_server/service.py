"""The policy service: observations in, actions and distributions out. No HTTP here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from policy_server.batching import MicroBatcher
from policy_server.distribution import Actions, Categorical
from policy_server.errors import FieldError, InvalidObservation
from policy_server.metrics import Metrics
from policy_server.observation import as_batch
from policy_server.registry import LoadedPolicy, PolicyRegistry
from policy_server.runtime.base import ModelOutputs
from policy_server.settings import Settings


class Prediction(TypedDict):
    """A plain dict at run time: batch answers build thousands, and a dict is the cheapest."""

    actions: list[Any]
    probability: float
    log_probability: float
    value: float | None


@dataclass(frozen=True)
class DistributionResult:
    action_space: dict[str, Any]
    probabilities: list[list[float]] | None
    mean: list[float] | None
    std: list[float] | None
    most_likely: list[Any]
    value: float | None


class ModelCaller(Protocol):
    """How the service reaches a policy's model: the in-process micro-batcher, or Ray Serve."""

    async def forward(self, rows: npt.NDArray[np.float32]) -> ModelOutputs: ...

    async def close(self) -> None: ...


def local_callers(
    registry: PolicyRegistry, settings: Settings, metrics: Metrics | None = None
) -> dict[tuple[str, str], ModelCaller]:
    return {
        (policy.name, policy.version): MicroBatcher(
            policy.runtime.forward,
            settings.max_batch_size,
            settings.max_batch_wait_ms / 1000.0,
            None if metrics is None else metrics.batch_observer(policy.name),
        )
        for policy in registry
    }


class PolicyService:
    def __init__(
        self,
        registry: PolicyRegistry,
        callers: Mapping[tuple[str, str], ModelCaller],
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self._metrics = metrics
        self._rng = np.random.default_rng()
        self._callers = dict(callers)

    async def close(self) -> None:
        for caller in self._callers.values():
            await caller.close()

    async def predict(
        self,
        policy: LoadedPolicy,
        observations: Sequence[BaseModel],
        *,
        deterministic: bool = False,
        seed: int | None = None,
    ) -> list[Prediction]:
        rows = as_batch(policy.vectorizer.rows(observations, policy.raw_model))
        return await self.predict_rows(policy, rows, deterministic=deterministic, seed=seed)

    async def predict_rows(
        self,
        policy: LoadedPolicy,
        rows: npt.NDArray[np.float32],
        *,
        deterministic: bool = False,
        seed: int | None = None,
    ) -> list[Prediction]:
        """Predictions for observation vectors of shape (batch, the model's input width)."""
        outputs = await self._forward(policy, rows)
        if deterministic:
            chosen = policy.distribution.mode(outputs.logits)
        else:
            rng = self._rng if seed is None else np.random.default_rng(seed)
            chosen = policy.distribution.sample(outputs.logits, rng)
        if self._metrics is not None and isinstance(policy.distribution, Categorical):
            self._metrics.count_actions(policy.name, chosen.values)  # type: ignore[arg-type]
        return _predictions(chosen, outputs)

    async def distribution(
        self, policy: LoadedPolicy, observation: BaseModel
    ) -> DistributionResult:
        outputs = await self._forward(
            policy, as_batch(policy.vectorizer.rows([observation], policy.raw_model))
        )
        exact = policy.distribution.distribution(outputs.logits)
        mode = policy.distribution.mode(outputs.logits)
        return DistributionResult(
            action_space=policy.runtime.action_space.describe(),
            probabilities=None
            if exact.probabilities is None
            else [component[0].tolist() for component in exact.probabilities],
            mean=None if exact.mean is None else exact.mean[0].tolist(),
            std=None if exact.std is None else exact.std[0].tolist(),
            most_likely=mode.values[0].tolist(),
            value=None if outputs.value is None else float(outputs.value[0]),
        )

    async def _forward(self, policy: LoadedPolicy, rows: npt.NDArray[np.float32]) -> ModelOutputs:
        outputs = await self._callers[policy.name, policy.version].forward(rows)
        bad = ~policy.distribution.valid_rows(outputs.logits)
        if bad.any():
            raise InvalidObservation(
                "the model produced non-finite logits for this observation; its values are "
                "probably far outside the range the policy was trained on",
                [
                    FieldError(f"observations.{i}" if len(rows) > 1 else "body", "out of range")
                    for i in np.flatnonzero(bad)
                ],
            )
        return outputs


def _predictions(chosen: Actions, outputs: ModelOutputs) -> list[Prediction]:
    values = chosen.values.tolist()
    log_probs = chosen.log_prob.tolist()
    probabilities = np.exp(chosen.log_prob).tolist()
    estimates = [None] * len(values) if outputs.value is None else outputs.value.tolist()
    return [
        {"actions": a, "probability": p, "log_probability": lp, "value": v}
        for a, p, lp, v in zip(values, probabilities, log_probs, estimates, strict=True)
    ]
