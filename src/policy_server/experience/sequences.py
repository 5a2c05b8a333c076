"""Anytime-valid confidence sequences: intervals that hold at every sample size at once.

A rollout looks at its evidence after every reward; a fixed-sample interval looked at that
often promotes a candidate that is no better far more often than its level says. A
confidence sequence (C_t) holds P(mean in C_t for every t) >= 1 - alpha, so any stopping
rule built on it keeps its level.

The one implemented here is the hedged betting confidence sequence of Waudby-Smith and
Ramdas, "Estimating means of bounded random variables by betting", JRSS-B 86(1), 2024
(arXiv 2010.09686), Theorem 3 with the predictable plug-in bets of its section 5.1
("hedged capital", aGRAPA's simpler cousin). For each candidate mean m a gambler bets
against m with predictable bets lambda_t:

    K_t(m) = 1/2 prod_i (1 + lambda+_i(m) (x_i - m)) + 1/2 prod_i (1 - lambda-_i(m) (x_i - m))

is a nonnegative martingale when the conditional mean of every x_i is m, so by Ville's
inequality P(sup_t K_t(m) >= 1/alpha) <= alpha, and C_t = {m : K_s(m) < 1/alpha for all
s <= t} is a confidence sequence. Nothing is assumed of the x_i but that each lies in a
range [low_i, high_i] known before it is seen (predictable) and that their conditional
means are equal; they need not be identically distributed. That is what lets the bounds
vary per unit: an inverse-propensity-weighted difference (below) has a range that depends
on the probability that unit had of being assigned, which changes as a canary ramps.

`ipw_difference` builds that difference for two arms with known assignment probabilities:
with Z = 1 when the unit went to the candidate (probability p, fixed before it was
assigned) and Y its outcome in [0, 1],

    x = (Y - g) (Z / p - (1 - Z) / (1 - p))

has conditional mean E[Y | candidate] - E[Y | incumbent] for any baseline g fixed before
the unit is seen (E[Z/p - (1-Z)/(1-p)] = 0), and g near the outcomes' mean shrinks its
variance (an augmented IPW estimator with a constant outcome model). The grid of candidate
means is a fixed array, so each update costs the same however many units came before.

Pure numpy: the server imports it; scipy is not needed.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Largest share of the capital bet on one unit: WSR's truncation c (they use 1/2 or 3/4).
_MAX_BET = 0.5
DEFAULT_GRID = 1001


class BettingSequence:
    """A confidence sequence for the common conditional mean of observations, each in a
    predictable range, over the means [mean_low, mean_high] (a grid of `grid` points)."""

    def __init__(
        self, alpha: float, mean_low: float, mean_high: float, grid: int = DEFAULT_GRID
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be within (0, 1), got {alpha}")
        if not mean_low < mean_high:
            raise ValueError("mean_low must be below mean_high")
        self.alpha = alpha
        self.grid = np.linspace(mean_low, mean_high, grid)
        self.log_up = np.zeros(grid)
        self.log_down = np.zeros(grid)
        # Once a mean is rejected it stays rejected: the running intersection.
        self.rejected = np.zeros(grid, dtype=bool)
        self.n = 0
        self.total = 0.0
        # Predictable plug-in estimates of the mean and variance, with a prior sample.
        self._mean_hat = 0.5 * (mean_low + mean_high)
        self._sq_dev = 0.25 * (mean_high - mean_low) ** 2
        self._threshold = math.log(2.0 / alpha)  # K = (K+ + K-)/2 >= 1/alpha
        self._log_two_over_alpha = 2.0 * math.log(2.0 / alpha)

    def update(self, x: float, low: float, high: float, scale: float = 1.0) -> None:
        """Take one observation x in [low, high] (the range known before x was seen).

        `scale` in (0, 1] is the share of a full bet this observation deserves, known before
        it is seen: an observation whose variance is k times the others' is best bet on
        with 1/k of the stake (the growth rate lambda*d - lambda^2*var/2 peaks at d/var).
        Any predictable bet keeps the capital a martingale, so validity does not rest on it.
        """
        if not low <= x <= high:
            raise ValueError(f"{x} is outside its stated range [{low}, {high}]")
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be within (0, 1], got {scale}")
        t = self.n + 1
        variance = self._sq_dev / t
        bet = scale * math.sqrt(self._log_two_over_alpha / (variance * t * math.log(1.0 + t)))
        m = self.grid
        up = np.minimum(bet, _MAX_BET / np.maximum(m - low, 1e-12))
        down = np.minimum(bet, _MAX_BET / np.maximum(high - m, 1e-12))
        self.log_up += np.log1p(up * (x - m))
        self.log_down += np.log1p(-down * (x - m))
        capital = np.logaddexp(self.log_up, self.log_down)  # log(K+ + K-)
        self.rejected |= capital >= self._threshold
        # The plug-ins see x only after the bet on x was placed: they stay predictable. The
        # variance is of scaled deviations, the variance a full bet is sized for.
        self._sq_dev += scale * (x - self._mean_hat) ** 2
        self.n = t
        self.total += x
        self._mean_hat = (self._mean_hat * t + x) / (t + 1)

    @property
    def estimate(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def lower(self) -> float:
        """The lowest mean not rejected, one grid step down so that rounding stays safe."""
        kept = np.flatnonzero(~self.rejected)
        if not len(kept):
            return float(self.grid[-1])
        return float(self.grid[max(kept[0] - 1, 0)])

    @property
    def upper(self) -> float:
        kept = np.flatnonzero(~self.rejected)
        if not len(kept):
            return float(self.grid[0])
        return float(self.grid[min(kept[-1] + 1, len(self.grid) - 1)])

    @property
    def empty(self) -> bool:
        """Every mean rejected: the data contradict the assumptions (a shifted mean)."""
        return bool(self.rejected.all())

    # --- a state that survives restarts and crosses processes --------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "grid": [float(self.grid[0]), float(self.grid[-1]), len(self.grid)],
            "log_up": _pack(self.log_up),
            "log_down": _pack(self.log_down),
            "rejected": base64.b64encode(np.packbits(self.rejected).tobytes()).decode(),
            "n": self.n,
            "total": self.total,
            "mean_hat": self._mean_hat,
            "sq_dev": self._sq_dev,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BettingSequence:
        low, high, size = state["grid"]
        sequence = cls(state["alpha"], low, high, int(size))
        sequence.log_up = _unpack(state["log_up"])
        sequence.log_down = _unpack(state["log_down"])
        bits = np.frombuffer(base64.b64decode(state["rejected"]), dtype=np.uint8)
        sequence.rejected = np.unpackbits(bits)[: int(size)].astype(bool)
        sequence.n = int(state["n"])
        sequence.total = float(state["total"])
        sequence._mean_hat = float(state["mean_hat"])
        sequence._sq_dev = float(state["sq_dev"])
        return sequence


def _pack(values: FloatArray) -> str:
    return base64.b64encode(values.astype("<f8").tobytes()).decode()


def _unpack(text: str) -> FloatArray:
    return np.frombuffer(base64.b64decode(text), dtype="<f8").copy()


@dataclass(frozen=True)
class Term:
    """One unit's term of a difference, with the range it was known to lie in."""

    value: float
    low: float
    high: float
    scale: float = 1.0


def ipw_difference(y: float, candidate: bool, p: float, baseline: float) -> Term:
    """The unit's inverse-propensity-weighted difference term, candidate minus incumbent:
    `y` in [0, 1], `p` the probability the unit had of going to the candidate, `baseline`
    a value in [0, 1] fixed before the unit was seen."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"an assignment probability must be within (0, 1), got {p}")
    lows = ((0.0 - baseline) / p, -(1.0 - baseline) / (1.0 - p))
    highs = ((1.0 - baseline) / p, (baseline - 0.0) / (1.0 - p))
    value = (y - baseline) / p if candidate else -(y - baseline) / (1.0 - p)
    # The term's variance grows as 1/(p (1 - p)): the bet shrinks with it.
    return Term(value, min(lows), max(highs), 4.0 * p * (1.0 - p))


def asymptotic_bounds(
    values: FloatArray, alpha: float, t_star: float
) -> tuple[float, float, float]:
    """The mean of `values` and a two-sided asymptotic confidence sequence at level alpha:
    Waudby-Smith, Arbour, Sinha, Kennedy and Ramdas, "Time-uniform central limit theory and
    asymptotic confidence sequences", Annals of Statistics 52(6), 2024 (arXiv 2103.06476),
    Theorem 2.2 (Robbins' normal mixture with the sample variance), its width tuned to be
    smallest at t_star observations. For unbounded terms (doubly robust returns, whose
    importance weights have no useful bound) where a betting sequence needs bounds."""
    t = len(values)
    if t < 2:
        return (float(values.mean()) if t else math.nan), -math.inf, math.inf
    mean = float(values.mean())
    std = float(values.std(ddof=1))
    log_alpha = -2.0 * math.log(alpha)
    rho2 = (log_alpha + math.log(log_alpha + 1.0)) / max(t_star, 1.0)
    width = std * math.sqrt(
        2.0 * (t * rho2 + 1.0) / (t * t * rho2) * math.log(math.sqrt(t * rho2 + 1.0) / alpha)
    )
    return mean, mean - width, mean + width
