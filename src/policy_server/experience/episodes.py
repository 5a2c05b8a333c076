"""Decisions joined with their rewards and episode ends, as the episodes export and
evaluation read.

Rules where the contract leaves a choice:
- A decision without an episode id is a one-step episode (a contextual bandit), terminated
  unless its reward says truncated.
- Rewards for the same decision add up; the terminated / truncated flags of any of its
  rewards, and the episode's end record, apply to the episode's last step.
- An unrewarded decision cuts its episode there unless a default reward is given: the steps
  before it are kept (an episode still running), it and the steps after it are left out.
- Within an episode, steps are ordered by `step`, then time; `t` counts from 0.
- A `shadow` record (a shadow version's answer, logged after its decision) becomes the
  decision's `shadow`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.experience.files import ReadStats, read_records

FloatArray = npt.NDArray[np.float64]
_SHADOW_FIELDS = ("version", "actions", "probability", "distribution")


@dataclass
class _Outcome:
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False


@dataclass
class Episode:
    """One episode's kept steps; arrays have one row per step."""

    episode_id: str
    decisions: list[dict[str, Any]]
    rewards: FloatArray
    next_obs: list[list[float]]
    terminated: bool
    truncated: bool

    def __len__(self) -> int:
        return len(self.decisions)

    @property
    def terminateds(self) -> list[bool]:
        return [False] * (len(self) - 1) + [self.terminated]

    @property
    def truncateds(self) -> list[bool]:
        return [False] * (len(self) - 1) + [self.truncated]


def propensity(decision: dict[str, Any]) -> float:
    """The probability the logging policy had of taking the logged action.

    A mode was taken with certainty (1.0), whatever its probability in the distribution,
    as RLlib logs `action_prob` = 1 for deterministic actions.
    """
    return float(decision["probability"]) if decision["sampled"] else 1.0


@dataclass
class Experience:
    episodes: list[Episode]
    policy: str | None
    left_out: int = 0
    defaulted: int = 0
    damaged_lines: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(len(e) for e in self.episodes)

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "episodes": len(self.episodes),
            "steps": self.steps,
            "decisions_left_out_without_reward": self.left_out,
            "decisions_given_default_reward": self.defaulted,
            "damaged_lines_skipped": self.damaged_lines,
        }


def load_experience(
    log_dir: Path,
    *,
    policy: str | None = None,
    default_reward: float | None = None,
    version: str | None = None,
) -> Experience:
    """Read a decision-log directory and join it into episodes of one policy (of one of its
    versions, when `version` is given)."""
    if not Path(log_dir).is_dir():
        raise FileNotFoundError(f"{log_dir}: no such decision-log directory")
    stats = ReadStats()
    decisions, outcomes, ends = _collect(read_records(Path(log_dir), stats))
    policy = _choose_policy(decisions, policy, log_dir)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for decision in decisions:
        if decision["policy"] == policy and version in (None, decision["version"]):
            groups[decision["episode_id"] or decision["decision_id"]].append(decision)
    experience = Experience([], policy, damaged_lines=stats.damaged_lines)
    for group, decisions_of in groups.items():
        runs = _runs(group, decisions_of)
        for index, (key, steps) in enumerate(runs):
            end = ends.get(group) if index == len(runs) - 1 else None
            episode = _episode(key, steps, outcomes, end, default_reward, experience)
            if episode is not None:
                experience.episodes.append(episode)
    return experience


def _runs(key: str, decisions: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """An episode id's decisions as runs of steps: a client that starts an episode over
    under the same id (a second step 0, as after `POST /episodes/{id}/end`) begins a new run,
    exported as episode `<id>#2`, `<id>#3`, ...; within a run, steps in order (by `step`,
    then time), as RLlib's offline format expects a recurrent policy's sequences."""
    by_time = sorted(decisions, key=lambda d: d["time"])
    runs: list[list[dict[str, Any]]] = [[]]
    started = False  # whether the current run has its step 0 already
    for decision in by_time:
        if decision["step"] == 0:
            if started:
                runs.append([])
            started = True
        runs[-1].append(decision)
    for run in runs:
        run.sort(key=lambda d: (d["step"] if d["step"] is not None else 0, d["time"]))
    return [(key if i == 0 else f"{key}#{i + 1}", run) for i, run in enumerate(runs)]


def _collect(
    records: Iterable[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, _Outcome], dict[str, tuple[bool, bool]]]:
    decisions: list[dict[str, Any]] = []
    outcomes: dict[str, _Outcome] = {}
    ends: dict[str, tuple[bool, bool]] = {}
    shadows: dict[str, dict[str, Any]] = {}
    for record in records:
        kind = record.get("type")
        if kind == "decision":
            decisions.append(record)
        elif kind == "shadow":
            shadows[record["decision_id"]] = record
        elif kind == "reward":
            outcome = outcomes.setdefault(record["decision_id"], _Outcome())
            outcome.reward += float(record["reward"])
            outcome.terminated |= bool(record.get("terminated"))
            outcome.truncated |= bool(record.get("truncated"))
        elif kind == "episode_end":
            ends[record["episode_id"]] = (bool(record["terminated"]), bool(record["truncated"]))
    for decision in decisions:
        shadow = shadows.get(decision["decision_id"])
        if shadow is not None and decision.get("shadow") is None:
            decision["shadow"] = {k: shadow[k] for k in _SHADOW_FIELDS}
    return decisions, outcomes, ends


def _choose_policy(
    decisions: list[dict[str, Any]], policy: str | None, log_dir: Path
) -> str | None:
    names = sorted({d["policy"] for d in decisions})
    if policy is not None:
        if policy not in names:
            raise ValueError(f"{log_dir}: no decisions of policy {policy!r}; it has {names}")
        return policy
    if len(names) > 1:
        raise ValueError(f"{log_dir}: holds decisions of several policies {names}; pick one")
    return names[0] if names else None


def _episode(
    key: str,
    steps: list[dict[str, Any]],
    outcomes: dict[str, _Outcome],
    end: tuple[bool, bool] | None,
    default_reward: float | None,
    experience: Experience,
) -> Episode | None:
    kept: list[_Outcome] = []
    for decision in steps:
        outcome = outcomes.get(decision["decision_id"])
        if outcome is None and default_reward is None:
            break
        if outcome is None:
            outcome = _Outcome(float(default_reward or 0.0))
            experience.defaulted += 1
        kept.append(outcome)
    experience.left_out += len(steps) - len(kept)
    if not kept:
        return None
    complete = len(kept) == len(steps)
    terminated = any(o.terminated for o in kept)
    truncated = any(o.truncated for o in kept)
    if complete and end is not None:
        terminated, truncated = terminated or end[0], truncated or end[1]
    if complete and steps[0]["episode_id"] is None and not truncated:
        terminated = True
    # The observation after the last kept step is the next decision's, when it was logged.
    observations = [d["obs"] for d in steps]
    following = observations[1 : len(kept) + 1]
    following += [observations[len(kept) - 1]] * (len(kept) - len(following))
    return Episode(
        key,
        steps[: len(kept)],
        np.array([o.reward for o in kept], dtype=np.float64),
        following,
        terminated,
        truncated,
    )
