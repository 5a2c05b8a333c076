"""The registry of loaded policies, by name and version."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from policy_server.distribution import ActionDistribution, distribution_for
from policy_server.errors import PolicyNotFound
from policy_server.observation import Vectorizer, observation_model, raw_observation_model
from policy_server.runtime.base import PolicyRuntime
from policy_server.schema import PolicySchema


@dataclass
class LoadedPolicy:
    """A policy ready to serve: its schema, its runtime and everything derived from them once."""

    name: str
    version: str
    schema: PolicySchema
    runtime: PolicyRuntime
    distribution: ActionDistribution = field(init=False)
    observation_model: type[BaseModel] | None = field(init=False)
    raw_model: type[BaseModel] = field(init=False)
    vectorizer: Vectorizer = field(init=False)

    def __post_init__(self) -> None:
        width = self.runtime.observation_width
        self.distribution = distribution_for(self.runtime.action_space)
        self.observation_model = observation_model(self.schema)
        self.raw_model = raw_observation_model(width)
        self.vectorizer = Vectorizer(self.schema, width)


class PolicyRegistry:
    def __init__(self) -> None:
        self._policies: dict[str, dict[str, LoadedPolicy]] = {}
        self._default: LoadedPolicy | None = None

    def add(self, policy: LoadedPolicy) -> None:
        self._policies.setdefault(policy.name, {})[policy.version] = policy
        if self._default is None:
            self._default = policy

    def get(self, name: str | None = None, version: str | None = None) -> LoadedPolicy:
        if name is None:
            if self._default is None:
                raise PolicyNotFound("no policy is loaded")
            return self._default
        versions = self._policies.get(name)
        if not versions:
            raise PolicyNotFound(f"no policy named {name!r}; loaded: {sorted(self._policies)}")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise PolicyNotFound(
                f"policy {name!r} has no version {version!r}; loaded: {sorted(versions)}"
            )
        return versions[version]

    def __iter__(self) -> Iterator[LoadedPolicy]:
        for versions in self._policies.values():
            yield from versions.values()
