"""Action distributions computed exactly from a batch of logits: sample, mode, probabilities.

Every runtime hands its logits here, so TensorFlow and ONNX give the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.spaces import ActionSpace, Box, categorical_sizes

Array = npt.NDArray[np.floating[Any]]
_LOG_2PI = float(np.log(2.0 * np.pi))


@dataclass(frozen=True)
class Actions:
    """Chosen actions for a batch: shape (batch, components), and their log-likelihood."""

    values: npt.NDArray[np.int64] | Array
    log_prob: Array


@dataclass(frozen=True)
class Distribution:
    """Per-row view of the exact distribution: categorical probabilities or Gaussian moments."""

    probabilities: list[Array] | None
    mean: Array | None
    std: Array | None


class Categorical:
    """Independent categorical components (one for Discrete, several for MultiDiscrete)."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes
        self._splits = np.cumsum(sizes)[:-1]

    def log_softmax(self, logits: Array) -> list[Array]:
        blocks = np.split(logits.astype(np.float64), self._splits, axis=1)
        result = []
        for block in blocks:
            # Masked actions carry about -3.4e38; shifting by the max keeps exp() at 0, not NaN.
            shifted = block - block.max(axis=1, keepdims=True)
            result.append(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))
        return result

    def distribution(self, logits: Array) -> Distribution:
        return Distribution([np.exp(lp) for lp in self.log_softmax(logits)], None, None)

    def valid_rows(self, logits: Array) -> npt.NDArray[np.bool_]:
        """Rows a distribution can be read from: -inf masks an action, but NaN, +inf or a
        component with every action masked means the model overflowed."""
        valid = ~(np.isnan(logits) | np.isposinf(logits)).any(axis=1)
        for block in np.split(logits, self._splits, axis=1):
            valid &= np.isfinite(block).any(axis=1)
        return np.asarray(valid)

    def mode(self, logits: Array) -> Actions:
        return self._choose(logits, None)

    def sample(self, logits: Array, rng: np.random.Generator) -> Actions:
        return self._choose(logits, rng)

    def _choose(self, logits: Array, rng: np.random.Generator | None) -> Actions:
        log_probs = self.log_softmax(logits)
        rows = np.arange(logits.shape[0])
        actions = np.empty((logits.shape[0], len(self.sizes)), dtype=np.int64)
        total = np.zeros(logits.shape[0])
        for index, block in enumerate(log_probs):
            chosen = block.argmax(axis=1) if rng is None else _inverse_cdf(np.exp(block), rng)
            actions[:, index] = chosen
            total += block[rows, chosen]
        return Actions(actions, total)


def _inverse_cdf(probabilities: Array, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    cumulative = probabilities.cumsum(axis=1)
    # Scaling by the last cumulative value means rounding can never pick a zero-probability
    # (masked) action: the first index whose cumulative sum exceeds u has positive mass.
    draws = rng.random((probabilities.shape[0], 1)) * cumulative[:, -1:]
    return np.asarray((cumulative > draws).argmax(axis=1), dtype=np.int64)


class DiagGaussian:
    """Independent normal per action dimension; logits are means then log-stds."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def _moments(self, logits: Array) -> tuple[Array, Array]:
        values = logits.astype(np.float64)
        return values[:, : self.dim], np.exp(values[:, self.dim :])

    def distribution(self, logits: Array) -> Distribution:
        mean, std = self._moments(logits)
        return Distribution(None, mean, std)

    def valid_rows(self, logits: Array) -> npt.NDArray[np.bool_]:
        return np.asarray(np.isfinite(logits).all(axis=1))

    def mode(self, logits: Array) -> Actions:
        mean, std = self._moments(logits)
        return Actions(mean, self._log_prob(mean, mean, std))

    def sample(self, logits: Array, rng: np.random.Generator) -> Actions:
        mean, std = self._moments(logits)
        values = mean + std * rng.standard_normal(mean.shape)
        return Actions(values, self._log_prob(values, mean, std))

    @staticmethod
    def _log_prob(values: Array, mean: Array, std: Array) -> Array:
        z = (values - mean) / std
        return np.asarray((-0.5 * z**2 - np.log(std) - 0.5 * _LOG_2PI).sum(axis=1))


ActionDistribution = Categorical | DiagGaussian


def distribution_for(space: ActionSpace) -> ActionDistribution:
    if isinstance(space, Box):
        return DiagGaussian(space.dim)
    return Categorical(categorical_sizes(space))
