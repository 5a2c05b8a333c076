"""Action distributions computed exactly from a batch of logits: sample, mode, probabilities.

Every runtime hands its logits here, so TensorFlow and ONNX give the same distribution.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.policy.spaces import ActionSpace, Box, categorical_sizes

Array = npt.NDArray[np.floating[Any]]
_LOG_2PI = float(np.log(2.0 * np.pi))


@dataclass(slots=True)
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
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        self._slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        self._whole = len(sizes) == 1  # one component: a row is its block

    def _blocks(self, logits: Array) -> list[tuple[Array, Array]]:
        """Per component: logits shifted by their row maximum, and log of the partition sum.

        Masked actions carry about -3.4e38; after the shift exp() gives exactly 0, not NaN.
        """
        values = logits.astype(np.float64)
        blocks = []
        for part in self._slices:
            block = values[:, part]
            shifted = block - block.max(axis=1, keepdims=True)
            blocks.append((shifted, np.log(np.exp(shifted).sum(axis=1))))
        return blocks

    def distribution(self, logits: Array) -> Distribution:
        probabilities = [
            np.exp(shifted - log_z[:, None]) for shifted, log_z in self._blocks(logits)
        ]
        return Distribution(probabilities, None, None)

    def valid_rows(self, logits: Array) -> npt.NDArray[np.bool_]:
        """Rows a distribution can be read from: -inf masks an action, but NaN, +inf or a
        component with every action masked means the model overflowed."""
        finite = np.isfinite(logits)
        if finite.all():
            return finite[:, 0]
        valid = ~(np.isnan(logits) | np.isposinf(logits)).any(axis=1)
        for part in self._slices:
            valid &= finite[:, part].any(axis=1)
        return np.asarray(valid)

    def mode(self, logits: Array) -> Actions:
        return self._choose(logits, None)

    def sample(self, logits: Array, rng: np.random.Generator) -> Actions:
        return self._choose(logits, rng)

    def log_prob(self, logits: Array, actions: npt.NDArray[np.int64]) -> Array:
        """Log-probability of given actions, shape (batch, components), under the logits."""
        rows = np.arange(logits.shape[0])
        total = np.zeros(logits.shape[0])
        for index, (shifted, log_z) in enumerate(self._blocks(logits)):
            total += shifted[rows, actions[:, index]] - log_z
        return total

    def masked(self, logits: Array, masks: npt.NDArray[np.bool_]) -> Array:
        """The logits with every action whose mask is False set to -inf (probability 0)."""
        return np.where(masks, logits.astype(np.float64), -np.inf)

    def _choose(self, logits: Array, rng: np.random.Generator | None) -> Actions:
        if logits.shape[0] == 1:
            return self._choose_one(logits[0].tolist(), rng)
        batch = logits.shape[0]
        rows = np.arange(batch)
        actions = np.empty((batch, len(self.sizes)), dtype=np.int64)
        total = np.zeros(batch)
        for index, (shifted, log_z) in enumerate(self._blocks(logits)):
            if rng is None:
                chosen = shifted.argmax(axis=1)
            else:
                cumulative = np.exp(shifted).cumsum(axis=1)
                # Scaling by the last cumulative value means rounding never picks a masked
                # (zero-probability) action: the first index past the draw has positive mass.
                draws = rng.random((batch, 1)) * cumulative[:, -1:]
                chosen = (cumulative > draws).argmax(axis=1)
            actions[:, index] = chosen
            total += shifted[rows, chosen] - log_z
        return Actions(actions, total)

    def _choose_one(self, row: list[float], rng: np.random.Generator | None) -> Actions:
        """`_choose` for one row, in Python floats: on a single observation, each of the
        dozen numpy calls above costs more than its arithmetic. The same draws (one
        `rng.random()` per component), the first maximum for the mode."""
        actions, total = [], 0.0
        for part in self._slices:
            block = row if self._whole else row[part]
            top = max(block)
            weights = [math.exp(x - top) for x in block]
            if rng is None:
                chosen = block.index(top)
            else:
                cumulative = list(itertools.accumulate(weights))
                # The first action whose cumulative weight exceeds the draw.
                chosen = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
            actions.append(chosen)
            total += block[chosen] - top - math.log(sum(weights))
        return Actions(np.array([actions], dtype=np.int64), np.array([total]))


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

    def log_prob(self, logits: Array, actions: Array) -> Array:
        mean, std = self._moments(logits)
        return self._log_prob(actions.astype(np.float64), mean, std)

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
