"""What off-policy evaluation needs from a candidate policy, and the adapter for a loaded one."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from policy_server.policy.distribution import Categorical
from policy_server.policy.loaded import LoadedPolicy

FloatArray = npt.NDArray[np.float64]


class Candidate(Protocol):
    """A policy to evaluate on logged decisions.

    `obs` is (n, width); `actions` is (n, components) (ints for categorical components,
    floats for a Gaussian); `masks` is (n, logits width) of 0/1, or None when the log holds
    no action masks. `log_prob` returns (n,) log-probabilities (log-densities for a
    Gaussian) of those actions; `value` returns (n,) value estimates, or None.
    """

    def log_prob(
        self, obs: FloatArray, actions: npt.NDArray[Any], masks: npt.NDArray[Any] | None
    ) -> FloatArray: ...

    def value(self, obs: FloatArray) -> FloatArray | None: ...


class PolicyCandidate:
    """A policy loaded from a folder or the repository, run in process (no server needed)."""

    def __init__(self, policy: LoadedPolicy) -> None:
        self.policy = policy

    def log_prob(
        self, obs: FloatArray, actions: npt.NDArray[Any], masks: npt.NDArray[Any] | None
    ) -> FloatArray:
        self._check(obs, actions)
        logits: npt.NDArray[np.floating[Any]] = self.policy.runtime.forward(
            obs.astype(np.float32)
        ).logits.astype(np.float64)
        distribution = self.policy.distribution
        if isinstance(distribution, Categorical):
            if masks is not None:
                logits = distribution.masked(logits, masks.astype(bool))
            return np.asarray(distribution.log_prob(logits, actions.astype(np.int64)))
        return np.asarray(distribution.log_prob(logits, actions.astype(np.float64)))

    def _check(self, obs: FloatArray, actions: npt.NDArray[Any]) -> None:
        """Refuse a log of another shape with a message, not an index error deep in numpy."""
        runtime, name = self.policy.runtime, self.policy.name
        if obs.shape[1] != runtime.observation_width:
            raise ValueError(
                f"the log's observations have {obs.shape[1]} values but the candidate "
                f"{name!r} takes {runtime.observation_width}"
            )
        distribution = self.policy.distribution
        if isinstance(distribution, Categorical):
            sizes: tuple[int, ...] | None = distribution.sizes
            components = len(distribution.sizes)
        else:
            sizes, components = None, distribution.dim
        fits = actions.shape[1] == components and (
            sizes is None or bool((actions < np.array(sizes)).all())
        )
        if not fits:
            raise ValueError(
                f"the logged actions do not fit the candidate {name!r}'s action space "
                f"{runtime.action_space.describe()}"
            )

    def value(self, obs: FloatArray) -> FloatArray | None:
        value = self.policy.runtime.forward(obs.astype(np.float32)).value
        return None if value is None else value.astype(np.float64)
