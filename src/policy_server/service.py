"""The policy service: observations in, actions and distributions out. No HTTP here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import numpy as np
from pydantic import BaseModel

from policy_server.distribution import Actions
from policy_server.errors import FieldError, InvalidObservation
from policy_server.observation import as_batch
from policy_server.registry import LoadedPolicy, PolicyRegistry
from policy_server.runtime.base import ModelOutputs


@dataclass(frozen=True)
class Prediction:
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


class PolicyService:
    def __init__(self, registry: PolicyRegistry) -> None:
        self.registry = registry
        self._rng = np.random.default_rng()

    def policy(self, name: str | None = None, version: str | None = None) -> LoadedPolicy:
        return self.registry.get(name, version)

    async def predict(
        self,
        policy: LoadedPolicy,
        observations: Sequence[BaseModel],
        *,
        deterministic: bool = False,
        seed: int | None = None,
    ) -> list[Prediction]:
        outputs = await self._forward(policy, observations)
        if deterministic:
            chosen = policy.distribution.mode(outputs.logits)
        else:
            rng = self._rng if seed is None else np.random.default_rng(seed)
            chosen = policy.distribution.sample(outputs.logits, rng)
        return _predictions(chosen, outputs)

    async def distribution(
        self, policy: LoadedPolicy, observation: BaseModel
    ) -> DistributionResult:
        outputs = await self._forward(policy, [observation])
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

    async def _forward(
        self, policy: LoadedPolicy, observations: Sequence[BaseModel]
    ) -> ModelOutputs:
        rows = [_row(policy, observation) for observation in observations]
        outputs = await anyio.to_thread.run_sync(policy.runtime.forward, as_batch(rows))
        bad = ~np.isfinite(outputs.logits).all(axis=1)
        if bad.any():
            raise InvalidObservation(
                "the model produced non-finite logits for this observation; its values are "
                "probably far outside the range the policy was trained on",
                [
                    FieldError(f"[{int(i)}]" if len(rows) > 1 else "obs", "out of range")
                    for i in np.flatnonzero(bad)
                ],
            )
        return outputs


def _row(policy: LoadedPolicy, observation: BaseModel) -> list[float]:
    if isinstance(observation, policy.raw_model):
        values: list[float] = observation.obs  # type: ignore[attr-defined]
        return values
    return policy.vectorizer.row(observation)


def _predictions(chosen: Actions, outputs: ModelOutputs) -> list[Prediction]:
    values = chosen.values.tolist()
    log_probs = chosen.log_prob.tolist()
    estimates = [None] * len(values) if outputs.value is None else outputs.value.tolist()
    return [
        Prediction(actions, float(np.exp(log_prob)), log_prob, value)
        for actions, log_prob, value in zip(values, log_probs, estimates, strict=True)
    ]
