"""Runtimes made in the test: plain numpy, no model file, for unit tests of the layers above
the runtime (registry, service, batching)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from policy_server.policy.loaded import LoadedPolicy
from policy_server.policy.schema import PolicySchema, parse_schema
from policy_server.policy.spaces import ActionSpace, Discrete
from policy_server.runtime.base import ModelOutputs, Recurrence, StepInputs
from policy_server.serving.registry import PolicyEntry, PolicyRegistry, PolicyVersion, State
from policy_server.settings import PolicySettings

SCHEMA: PolicySchema = parse_schema(
    {
        "observations": {"a": {"type": "float"}, "b": {"type": "float"}},
        "parameters": {"discrete": True, "tuple": False, "api_key": "k"},
    }
)


@dataclass
class LinearRuntime:
    """logits = rows @ weights; the value is the sum of each row. Rows whose first value is
    `poison` give NaN logits, as a model far outside its training range can."""

    weights: npt.NDArray[np.float32]
    name: str = "numpy"
    poison: float = 999.0
    calls: list[int] = field(default_factory=list)
    recurrence: Recurrence | None = None
    observation_width: int = field(init=False)
    action_space: ActionSpace = field(init=False)

    def __post_init__(self) -> None:
        self.observation_width = int(self.weights.shape[0])
        self.action_space = Discrete(int(self.weights.shape[1]))

    def forward(
        self, observations: npt.NDArray[np.float32], step: StepInputs | None = None
    ) -> ModelOutputs:
        self.calls.append(len(observations))
        logits = np.asarray(observations @ self.weights, dtype=np.float32)
        logits[observations[:, 0] == self.poison] = np.nan
        return ModelOutputs(logits, observations.sum(axis=1).astype(np.float32))


def identity_runtime(actions: int = 2) -> LinearRuntime:
    """Two inputs; action i's logit is 10 times input i (so the argmax is the larger input)."""
    weights = np.zeros((2, actions), dtype=np.float32)
    weights[0, 0] = weights[1, 1 % actions] = 10.0
    return LinearRuntime(weights)


def loaded(name: str, version: str, runtime: LinearRuntime | None = None) -> LoadedPolicy:
    return LoadedPolicy(name, version, SCHEMA, runtime or identity_runtime(), Path("."))


def ready_entry(
    registry: PolicyRegistry,
    name: str,
    versions: list[str],
    traffic: dict[str, float] | None = None,
    settings: PolicySettings | None = None,
) -> PolicyEntry:
    """`name` with each of `versions` loaded and ready, as the lifecycle manager leaves it."""
    entry = registry.ensure_entry(name, settings or PolicySettings())
    for label in versions:
        version = PolicyVersion(name, label, Path("."))
        version.policy, version.state = loaded(name, label), State.READY
        entry.versions[label] = version
    entry.traffic = traffic
    entry.refresh()
    if registry.default_name is None:
        registry.default_name = name
    return entry
