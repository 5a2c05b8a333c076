"""Off-policy evaluation on a contextual bandit whose true values are exact finite sums."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from policy_server.experience import DecisionLog
from policy_server.experience.candidate import PolicyCandidate
from policy_server.experience.evaluation import evaluate
from policy_server.loading.loader import load_policy
from policy_server.settings import Settings
from tests.experience.records import decision, softmax
from tests.policies import linear_onnx_policy

# Five contexts drawn uniformly, three actions; reward = MEANS[context, action] + noise.
CONTEXTS = np.array(
    [[1.0, 0.0, 0.5], [0.0, 1.0, -0.5], [1.0, 1.0, 0.0], [-1.0, 0.5, 1.0], [0.5, -1.0, 0.0]]
)
MEANS = np.array(
    [[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.5, 0.5, 1.0], [0.2, 0.0, 0.8], [1.0, 0.0, 0.4]]
)
NOISE = 0.3
LOGGING = (np.array([[0.5, -0.5, 0.0], [0.0, 0.5, -0.5], [0.3, 0.3, 0.3]]), np.zeros(3))
CANDIDATE = (np.array([[2.0, -1.0, 0.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 1.5]]), np.array([0, 0, 0.5]))
SCHEMA = """\
parameters:
  api_key: x
  action_space: {{type: Discrete, n: {n}}}
  logits_output: logits
  value_output: value
"""


def true_value(weights: np.ndarray, bias: np.ndarray) -> float:
    """The exact expected reward: the mean over contexts of sum_a pi(a|x) f(x, a)."""
    return float((softmax(CONTEXTS @ weights + bias) * MEANS).sum(axis=1).mean())


def policy_folder(folder: Path, weights: np.ndarray, bias: np.ndarray) -> PolicyCandidate:
    folder.mkdir()
    linear_onnx_policy(folder / "model.onnx", weights, bias)
    (folder / "schema.yaml").write_text(SCHEMA.format(n=len(bias)))
    return PolicyCandidate(load_policy(Settings(policy_path=folder, cache_dir=folder / "cache")))


def log_bandit(
    directory: Path,
    count: int,
    seed: int,
    *,
    steps: int = 1,
    sampled: bool = True,
    sharpness: float = 1.0,
) -> None:
    """`count` episodes of `steps` independent bandit rounds, logged by LOGGING."""
    rng = np.random.default_rng(seed)
    records, rewards = [], []
    for episode in range(count):
        for step in range(steps):
            context = int(rng.integers(len(CONTEXTS)))
            obs = CONTEXTS[context]
            record = decision(
                obs,
                sharpness * (obs @ LOGGING[0] + LOGGING[1]),
                rng,
                episode_id=f"e{episode}" if steps > 1 else None,
                step=step if steps > 1 else None,
                sampled=sampled,
            )
            reward = MEANS[context, record["actions"][0]] + NOISE * rng.standard_normal()
            records.append(record)
            rewards.append({"decision_id": record["decision_id"], "reward": float(reward)})

    async def write() -> None:
        log = DecisionLog(directory)
        await log.append(records)
        await log.add_rewards(rewards)
        await log.aclose()

    asyncio.run(write())


@pytest.fixture(scope="module")
def bandit_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bandit")
    log_bandit(directory, 3000, seed=11)
    return directory


@pytest.mark.parametrize("which", ["logging", "candidate"])
def test_every_interval_covers_the_true_value(bandit_log: Path, tmp_path: Path, which: str) -> None:
    weights, bias = LOGGING if which == "logging" else CANDIDATE
    report = evaluate(bandit_log, policy_folder(tmp_path / which, weights, bias), bootstrap=400)
    truth = true_value(weights, bias)
    assert report["n"] == 3000
    for name in ("ips", "snips", "wis", "dr"):
        estimate = report["estimators"][name]
        assert estimate["ci_low"] <= truth <= estimate["ci_high"], (name, truth, estimate)
        assert estimate["ci_high"] - estimate["ci_low"] < 0.2
    assert report["warnings"] == []


def test_the_estimate_tells_a_better_candidate_from_the_logging_policy(
    bandit_log: Path, tmp_path: Path
) -> None:
    logged = evaluate(bandit_log, policy_folder(tmp_path / "logging", *LOGGING), bootstrap=200)
    better = evaluate(bandit_log, policy_folder(tmp_path / "better", *CANDIDATE), bootstrap=200)
    assert true_value(*CANDIDATE) > true_value(*LOGGING) + 0.15
    assert better["estimators"]["dr"]["ci_low"] > logged["estimators"]["dr"]["ci_high"]
    # On the logging policy itself every weight is 1: IPS is the logged mean exactly.
    assert logged["estimators"]["ips"]["estimate"] == pytest.approx(logged["logged_value"])
    assert logged["ess"] == pytest.approx(3000)
    assert better["ess"] < 3000


def test_multi_step_episodes_add_up_per_decision(tmp_path: Path) -> None:
    log_bandit(tmp_path / "log", 1500, seed=5, steps=3)
    candidate = policy_folder(tmp_path / "candidate", *CANDIDATE)
    report = evaluate(tmp_path / "log", candidate, bootstrap=300, gamma=0.9)
    truth = true_value(*CANDIDATE) * (1 + 0.9 + 0.81)
    assert report["n"] == 1500 and report["decisions"] == 4500
    for name in ("ips", "wis", "dr"):
        estimate = report["estimators"][name]
        assert estimate["ci_low"] <= truth <= estimate["ci_high"], (name, truth, estimate)


def test_a_log_of_modes_cannot_support_the_estimate_and_says_so(tmp_path: Path) -> None:
    log_bandit(tmp_path / "log", 300, seed=3, sampled=False)
    # A candidate that avoids what the logging policy prefers.
    opposite = policy_folder(tmp_path / "c", -3 * LOGGING[0], LOGGING[1])
    report = evaluate(tmp_path / "log", opposite, bootstrap=50)
    assert any("instead of sampling" in w for w in report["warnings"])
    assert any("mean importance weight" in w for w in report["warnings"])


class LeastLikely:
    """A candidate made in the test: always the action the sharpened logging policy likes
    least; it has no value output."""

    def log_prob(
        self, obs: np.ndarray, actions: np.ndarray, masks: np.ndarray | None
    ) -> np.ndarray:
        least = (obs @ LOGGING[0] + LOGGING[1]).argmin(axis=1)
        return np.where(actions[:, 0] == least, 0.0, -np.inf)

    def value(self, obs: np.ndarray) -> np.ndarray | None:
        return None


def test_a_candidate_the_log_rarely_supports_gets_a_warning_and_no_dr(tmp_path: Path) -> None:
    log_bandit(tmp_path / "log", 500, seed=2, sharpness=6.0)
    report = evaluate(tmp_path / "log", LeastLikely(), bootstrap=50)
    assert report["estimators"]["dr"] is None
    assert report["ess"] < 50
    assert any("effective sample size" in w for w in report["warnings"])
    assert any("no value output" in w for w in report["warnings"])


def test_a_candidate_of_another_shape_is_refused_with_a_reason(
    bandit_log: Path, tmp_path: Path
) -> None:
    wider = policy_folder(tmp_path / "wider", np.zeros((4, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="observations have 3 values but the candidate"):
        evaluate(bandit_log, wider, bootstrap=10)
    fewer = policy_folder(tmp_path / "fewer", np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="actions do not fit"):
        evaluate(bandit_log, fewer, bootstrap=10)
