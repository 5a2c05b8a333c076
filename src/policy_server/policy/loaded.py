"""A loaded policy version: its schema and runtime, and what is derived from them once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from policy_server.policy.distribution import ActionDistribution, distribution_for
from policy_server.policy.observation import Vectorizer, observation_model, raw_observation_model
from policy_server.policy.schema import PolicySchema
from policy_server.runtime.base import PolicyRuntime


@dataclass(eq=False)
class LoadedPolicy:
    """A policy version ready to run: its schema, its runtime and what is derived from them."""

    name: str
    version: str
    schema: PolicySchema
    runtime: PolicyRuntime
    folder: Path = Path(".")
    distribution: ActionDistribution = field(init=False)
    observation_model: type[BaseModel] | None = field(init=False)
    raw_model: type[BaseModel] = field(init=False)
    vectorizer: Vectorizer = field(init=False)
    # What other layers derive once per version (request models, ...), keyed by their name.
    derived: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        width = self.runtime.observation_width
        self.distribution = distribution_for(self.runtime.action_space)
        self.observation_model = observation_model(self.schema)
        self.raw_model = raw_observation_model(width)
        self.vectorizer = Vectorizer(self.schema, width)
