"""Off-policy evaluation: how a candidate policy would have done on the logged decisions.

Estimators (Precup et al. 2000; Thomas 2015; Jiang & Li 2016), over episodes i with steps t,
importance ratios rho_it = pi_candidate(a_it|s_it) / pi_logging(a_it|s_it), cumulative
weights w_it = prod_{k<=t} rho_ik (held at their last value after an episode ends):
- ips: trajectory-wise importance sampling, mean_i w_i,T * G_i (unbiased).
- snips: the same, self-normalised by the sum of the weights (biased, lower variance).
- wis: per-decision weighted importance sampling, sum_t gamma^t sum_i w_it r_it / sum_i w_it.
- dr: per-decision doubly robust with the candidate's value output as an action-independent
  baseline, Q(s, a) := V(s), which keeps it unbiased; null when the candidate has no value.
Each comes with a percentile bootstrap interval over episodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.experience.candidate import Candidate, FloatArray
from policy_server.experience.episodes import Episode, Experience, load_experience

ESTIMATORS = ("ips", "snips", "wis", "dr")
# The share of the ideal sample size below which the log cannot support an estimate.
_MIN_ESS_SHARE = 0.1
_MIN_MEAN_WEIGHT = 0.5
# Bootstrap resamples are drawn in blocks so that the count matrix stays this small.
_BLOCK_CELLS = 4_000_000


@dataclass(frozen=True)
class _Episodes:
    """Per-episode arrays padded to the longest episode: (episodes, steps)."""

    weights: FloatArray  # cumulative importance weights w_it
    discounted: FloatArray  # gamma^t r_it, 0 after the episode ended
    dr: FloatArray | None  # per-episode doubly robust return, (episodes,)
    returns: FloatArray  # G_i, the logged discounted return

    @property
    def final_weights(self) -> FloatArray:
        return self.weights[:, -1]


def evaluate(
    log_dir: Path,
    candidate: Candidate,
    *,
    policy: str | None = None,
    gamma: float = 1.0,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Estimate the candidate's expected discounted return on the logged episodes.

    Only rewarded decisions count (an episode stops at its first unrewarded decision).
    Returns {"n", "ess", "estimators": {name: {"estimate", "ci_low", "ci_high"} | None},
    "logged_value", "warnings", ...}.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be within [0, 1], got {gamma}")
    experience = load_experience(Path(log_dir), policy=policy)
    if not experience.episodes:
        raise ValueError(f"{log_dir}: no rewarded decision to evaluate on")
    data, warnings = _prepare(experience, candidate, gamma)
    estimators = _estimators(data)
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, float | None] | None] = dict.fromkeys(ESTIMATORS)
    for name, estimator in estimators.items():
        low, high = _bootstrap(estimator, len(data.returns), bootstrap, rng, confidence)
        point = estimator(np.ones((1, len(data.returns))))[0]
        results[name] = {"estimate": float(point), "ci_low": low, "ci_high": high}
    ess = _ess(data.final_weights)
    warnings += _support_warnings(data.final_weights, ess)
    return {
        "policy": experience.policy,
        "n": len(data.returns),
        "decisions": experience.steps,
        "gamma": gamma,
        "ess": ess,
        "estimators": results,
        "logged_value": float(data.returns.mean()),
        "warnings": warnings,
    }


def _prepare(
    experience: Experience, candidate: Candidate, gamma: float
) -> tuple[_Episodes, list[str]]:
    episodes = experience.episodes
    decisions = [d for e in episodes for d in e.decisions]
    obs = np.array([d["obs"] for d in decisions], dtype=np.float64)
    actions = np.array([d["actions"] for d in decisions])
    candidate_logp = np.asarray(candidate.log_prob(obs, actions, _masks(decisions)), np.float64)
    logged_logp = np.array(
        [d["log_probability"] if d["sampled"] else 0.0 for d in decisions], np.float64
    )
    values = candidate.value(obs)
    ratios = _split(np.exp(candidate_logp - logged_logp), episodes)
    warnings = _logging_warnings(experience, decisions)
    if values is None:
        warnings.append("dr: the candidate has no value output, so there is no dr estimate")
    width = max(len(e) for e in episodes)
    weights = np.stack([_pad(np.cumprod(r).astype(np.float64), width, hold=True) for r in ratios])
    discount = gamma ** np.arange(width)
    rewards = np.stack([_pad(e.rewards, width, hold=False) for e in episodes])
    dr = None
    if values is not None:
        split_values = _split(np.asarray(values, np.float64), episodes)
        dr = np.array(
            [
                _dr_return(e.rewards, r, v, gamma)
                for e, r, v in zip(episodes, ratios, split_values, strict=True)
            ]
        )
    returns = (rewards * discount).sum(axis=1)
    return _Episodes(weights, rewards * discount, dr, returns), warnings


def _masks(decisions: list[dict[str, Any]]) -> npt.NDArray[np.int8] | None:
    """Logged action masks flattened to the logits' width; unmasked rows allow everything."""
    if all(d["action_mask"] is None for d in decisions):
        return None
    width = len(decisions[0]["logits"])
    return np.array(
        [
            [m for component in d["action_mask"] for m in component]
            if d["action_mask"] is not None
            else [1] * width
            for d in decisions
        ],
        dtype=np.int8,
    )


def _split(values: FloatArray, episodes: list[Episode]) -> list[FloatArray]:
    bounds = np.cumsum([len(e) for e in episodes])[:-1]
    return list(np.split(values, bounds))


def _pad(values: FloatArray, width: int, *, hold: bool) -> FloatArray:
    fill = values[-1] if hold else 0.0
    return np.concatenate([values, np.full(width - len(values), fill)])


def _dr_return(rewards: FloatArray, ratios: FloatArray, values: FloatArray, gamma: float) -> float:
    """Jiang & Li's recursion, V_t = v_t + rho_t (r_t + gamma V_{t+1} - v_t), from the end."""
    estimate = 0.0
    for r, rho, v in zip(rewards[::-1], ratios[::-1], values[::-1], strict=True):
        estimate = v + rho * (r + gamma * estimate - v)
    return float(estimate)


Estimator = Callable[[FloatArray], FloatArray]


def _estimators(data: _Episodes) -> dict[str, Estimator]:
    """Each estimator maps bootstrap counts (resamples, episodes) to (resamples,) estimates;
    counts of all ones give the estimate on the log itself."""
    weighted_returns = data.final_weights * data.returns
    weighted_rewards = data.weights * data.discounted

    def ips(counts: FloatArray) -> FloatArray:
        return np.asarray(counts @ weighted_returns / counts.sum(axis=1))

    def snips(counts: FloatArray) -> FloatArray:
        return _ratio(counts @ weighted_returns, counts @ data.final_weights)

    def wis(counts: FloatArray) -> FloatArray:
        per_step = _ratio(counts @ weighted_rewards, counts @ data.weights)
        return np.asarray(per_step.sum(axis=1))

    estimators: dict[str, Estimator] = {"ips": ips, "snips": snips, "wis": wis}
    if data.dr is not None:
        dr_returns = data.dr

        def dr(counts: FloatArray) -> FloatArray:
            return np.asarray(counts @ dr_returns / counts.sum(axis=1))

        estimators["dr"] = dr
    return estimators


def _ratio(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    """numerator / denominator, 0 where no resampled episode has any weight."""
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.asarray(np.where(denominator > 0, numerator / safe, 0.0))


def _bootstrap(
    estimator: Estimator, n: int, resamples: int, rng: np.random.Generator, confidence: float
) -> tuple[float | None, float | None]:
    """Percentile interval of the estimator over episodes resampled with replacement."""
    if resamples < 1 or n < 2:
        return None, None
    block = max(1, _BLOCK_CELLS // n)
    estimates = []
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
        estimates.append(estimator(counts))
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(np.concatenate(estimates), [tail, 100.0 - tail])
    return float(low), float(high)


def _ess(weights: FloatArray) -> float:
    """Kish's effective sample size of the trajectory weights."""
    squares = float((weights**2).sum())
    return float(weights.sum() ** 2 / squares) if squares > 0 else 0.0


def _logging_warnings(experience: Experience, decisions: list[dict[str, Any]]) -> list[str]:
    warnings = []
    modes = sum(not d["sampled"] for d in decisions)
    if modes:
        warnings.append(
            f"{modes} of {len(decisions)} logged decisions took the most likely action "
            "instead of sampling: the logging policy never tried the alternatives there, so "
            "the estimates only see the candidate where it agrees with those modes"
        )
    if experience.left_out:
        warnings.append(
            f"{experience.left_out} decisions have no reward yet and were left out "
            "(with the rest of their episodes)"
        )
    return warnings


def _support_warnings(weights: FloatArray, ess: float) -> list[str]:
    warnings = []
    n = len(weights)
    if ess < _MIN_ESS_SHARE * n:
        warnings.append(
            f"the effective sample size is {ess:.1f} of {n} episodes: the logging policy "
            "rarely took the candidate's actions, so the estimates rest on a few episodes"
        )
    mean = float(weights.mean())
    if mean < _MIN_MEAN_WEIGHT:
        warnings.append(
            f"the mean importance weight is {mean:.3f} (it should be near 1): the candidate "
            "often takes actions the logging policy (almost) never took"
        )
    return warnings


@dataclass(frozen=True)
class PairedEvaluation:
    """Per logged episode: the candidate's doubly robust return (per-decision importance
    sampling when it has no value output), the return logged, and the weights' ESS."""

    estimator: str
    candidate: FloatArray
    logged: FloatArray
    ess: float

    @property
    def differences(self) -> FloatArray:
        return np.asarray(self.candidate - self.logged)


def paired_evaluation(
    log_dir: Path, candidate: Candidate, *, policy: str, version: str, gamma: float = 1.0
) -> PairedEvaluation | None:
    """The candidate against one logged version, episode by episode; None without a
    rewarded decision of that version."""
    experience = load_experience(Path(log_dir), policy=policy, version=version)
    if not experience.episodes:
        return None
    data, _ = _prepare(experience, candidate, gamma)
    if data.dr is not None:
        return PairedEvaluation("dr", data.dr, data.returns, _ess(data.final_weights))
    # Without a value output the baseline is 0: the recursion is per-decision IS, still
    # unbiased, only noisier.
    per_decision = (data.weights * data.discounted).sum(axis=1)
    return PairedEvaluation("pdis", per_decision, data.returns, _ess(data.final_weights))
