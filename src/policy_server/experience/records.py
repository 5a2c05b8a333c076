"""The records a decision log holds: decisions, rewards and episode ends, as plain dicts.

Plain dicts because orjson writes a dict fastest; the TypedDicts document the shape and let
mypy check it. An answered call hands the log `PendingDecisions` (the arrays it already has);
the log's writer thread turns them into records, off the request path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt

from policy_server.policy.distribution import ActionDistribution, Actions, Distribution
from policy_server.runtime.base import StepInputs


class Shadow(TypedDict):
    """What the shadow version would have answered for the same observation."""

    version: str
    actions: list[Any]
    probability: float
    distribution: dict[str, Any]


class Decision(TypedDict):
    type: Literal["decision"]
    time: float
    decision_id: str
    policy: str
    version: str
    episode_id: str | None
    step: int | None
    obs: list[float]
    action_mask: list[list[int]] | None
    actions: list[Any]
    probability: float
    log_probability: float
    sampled: bool
    distribution: dict[str, Any]
    logits: list[float]
    value: float | None
    shadow: Shadow | None
    worker: str
    # Recurrent policies only: whether this step's state was lost and started from zeros,
    # and what the model was fed besides the observation (RLlib's columns of that name).
    state_reset: NotRequired[bool | None]
    prev_actions: NotRequired[list[float]]
    prev_rewards: NotRequired[float]
    state_in: NotRequired[list[list[float]]]
    # The probability the traffic split gave this version when it answered; null when the
    # request pinned the version. A rollout weighs each unit by it.
    allocation: float | None


class Reward(TypedDict):
    type: Literal["reward"]
    time: float
    decision_id: str
    reward: float
    terminated: bool | None
    truncated: bool | None


class EpisodeEnd(TypedDict):
    type: Literal["episode_end"]
    time: float
    episode_id: str
    terminated: bool
    truncated: bool


def decision_records(
    *,
    policy: str,
    version: str,
    worker: str,
    decision_ids: Sequence[str],
    episodes: Sequence[tuple[str | None, int | None]],
    rows: npt.NDArray[Any],
    logits: npt.NDArray[Any],
    chosen: Actions,
    values: npt.NDArray[Any] | None,
    sampled: bool,
    distribution: Distribution,
    masks: npt.NDArray[np.bool_] | None,
    state_resets: Sequence[bool | None] | None = None,
    inputs: StepInputs | None = None,
    allocation: float | None = None,
    now: float | None = None,
) -> list[Decision]:
    """The decision records of one answered batch, converted from arrays once per batch.

    `episodes` holds each row's (episode_id, step); `masks` is (batch, logits width) or None;
    `logits` are the ones actions were drawn from (masked entries as given); `now` is when
    the decisions were made (default: now).
    """
    now = time.time() if now is None else now
    records = _decision_rows(
        now,
        policy,
        version,
        worker,
        decision_ids,
        episodes,
        rows,
        logits,
        chosen,
        values,
        sampled,
        distribution,
        masks,
        allocation,
    )
    if inputs is not None:
        states = [s.tolist() for s in inputs.state]
        for row, (record, prev, reward) in enumerate(
            zip(records, inputs.prev_actions.tolist(), inputs.prev_rewards.tolist(), strict=True)
        ):
            record["prev_actions"] = prev
            record["prev_rewards"] = reward
            record["state_in"] = [state[row] for state in states]
            record["state_reset"] = None if state_resets is None else state_resets[row]
    return records


def _decision_rows(
    now: float,
    policy: str,
    version: str,
    worker: str,
    decision_ids: Sequence[str],
    episodes: Sequence[tuple[str | None, int | None]],
    rows: npt.NDArray[Any],
    logits: npt.NDArray[Any],
    chosen: Actions,
    values: npt.NDArray[Any] | None,
    sampled: bool,
    distribution: Distribution,
    masks: npt.NDArray[np.bool_] | None,
    allocation: float | None,
) -> list[Decision]:
    per_row = zip(
        decision_ids,
        episodes,
        rows.tolist(),
        logits.tolist(),
        chosen.values.tolist(),
        chosen.log_prob.tolist(),
        [None] * len(rows) if values is None else values.tolist(),
        _row_distributions(distribution, len(rows)),
        _row_masks(masks, distribution, len(rows)),
        strict=True,
    )
    return [
        {
            "type": "decision",
            "time": now,
            "decision_id": decision_id,
            "policy": policy,
            "version": version,
            "episode_id": episode_id,
            "step": step,
            "obs": obs,
            "action_mask": mask,
            "actions": actions,
            "probability": math.exp(log_prob),
            "log_probability": log_prob,
            "sampled": sampled,
            "distribution": row_distribution,
            "logits": row_logits,
            "value": value,
            "shadow": None,
            "worker": worker,
            "allocation": allocation,
        }
        for (
            decision_id,
            (episode_id, step),
            obs,
            row_logits,
            actions,
            log_prob,
            value,
            row_distribution,
            mask,
        ) in per_row
    ]


@dataclass(slots=True)
class PendingDecisions:
    """One answered call's decisions as the request path has them: references to its arrays,
    nothing converted. `records()` builds the decision records (the distribution, the lists,
    the dicts); the decision log calls it on its writer thread. The arrays are not written
    to after the answer, so reading them there is safe. Not frozen: a frozen dataclass sets
    each of its fields through `object.__setattr__`, and every decision builds one.
    """

    time: float
    policy: str
    version: str
    worker: str
    decision_ids: Sequence[str]
    episodes: Sequence[tuple[str | None, int | None]]
    rows: npt.NDArray[Any]
    logits: npt.NDArray[Any]
    chosen: Actions
    values: npt.NDArray[Any] | None
    sampled: bool
    action_distribution: ActionDistribution
    masks: npt.NDArray[np.bool_] | None
    state_resets: Sequence[bool | None] | None = None
    inputs: StepInputs | None = None
    allocation: float | None = None

    def __len__(self) -> int:
        return len(self.decision_ids)

    def episode_ids(self) -> list[str]:
        return [episode_id for episode_id, _ in self.episodes if episode_id]

    def merges_with(self, other: PendingDecisions) -> bool:
        """Whether the two calls' records can be built as one batch: same version, same
        way of choosing, and neither with masks or a recurrent policy's inputs."""
        return (
            self.policy == other.policy
            and self.version == other.version
            and self.worker == other.worker
            and self.sampled == other.sampled
            and self.allocation == other.allocation
            and self.action_distribution is other.action_distribution
            and (self.values is None) == (other.values is None)
            and self.masks is None
            and other.masks is None
            and self.inputs is None
            and other.inputs is None
            and self.state_resets is None
            and other.state_resets is None
        )

    def records(self) -> list[Decision]:
        return decision_records(
            policy=self.policy,
            version=self.version,
            worker=self.worker,
            decision_ids=self.decision_ids,
            episodes=self.episodes,
            rows=self.rows,
            logits=self.logits,
            chosen=self.chosen,
            values=self.values,
            sampled=self.sampled,
            distribution=self.action_distribution.distribution(self.logits),
            masks=self.masks,
            state_resets=self.state_resets,
            inputs=self.inputs,
            allocation=self.allocation,
            now=self.time,
        )


def pending_records(pending: Sequence[PendingDecisions]) -> list[list[Decision]]:
    """The records of each call, in order. Consecutive calls that `merges_with` each other
    are built as one batch (one distribution, one conversion of each array): the writer
    thread holds the interpreter while it builds them, and the event loop waits for it."""
    built: list[list[Decision]] = []
    start = 0
    while start < len(pending):
        end = start + 1
        while end < len(pending) and pending[start].merges_with(pending[end]):
            end += 1
        run = pending[start:end]
        if len(run) == 1:
            built.append(run[0].records())
        else:
            built += _split(_merged(run).records(), [len(p) for p in run], [p.time for p in run])
        start = end
    return built


def _merged(run: Sequence[PendingDecisions]) -> PendingDecisions:
    first = run[0]
    values = [p.values for p in run]
    return PendingDecisions(
        time=first.time,
        policy=first.policy,
        version=first.version,
        worker=first.worker,
        decision_ids=[i for p in run for i in p.decision_ids],
        episodes=[e for p in run for e in p.episodes],
        rows=np.concatenate([p.rows for p in run]),
        logits=np.concatenate([p.logits for p in run]),
        chosen=Actions(
            np.concatenate([p.chosen.values for p in run]),
            np.concatenate([p.chosen.log_prob for p in run]),
        ),
        values=None if values[0] is None else np.concatenate(values),  # type: ignore[arg-type]
        sampled=first.sampled,
        action_distribution=first.action_distribution,
        masks=None,
        allocation=first.allocation,
    )


def _split(records: list[Decision], sizes: list[int], times: list[float]) -> list[list[Decision]]:
    """A merged batch's records back into its calls, each with its own time."""
    parts, start = [], 0
    for size, when in zip(sizes, times, strict=True):
        part = records[start : start + size]
        for record in part:
            record["time"] = when
        parts.append(part)
        start += size
    return parts


def _row_distributions(distribution: Distribution, batch: int) -> list[dict[str, Any]]:
    if distribution.probabilities is not None:
        components = [c.tolist() for c in distribution.probabilities]
        return [{"probabilities": [c[row] for c in components]} for row in range(batch)]
    assert distribution.mean is not None and distribution.std is not None
    return [
        {"mean": mean, "std": std}
        for mean, std in zip(distribution.mean.tolist(), distribution.std.tolist(), strict=True)
    ]


def _row_masks(
    masks: npt.NDArray[np.bool_] | None, distribution: Distribution, batch: int
) -> list[list[list[int]] | None]:
    """Masks as the request gave them: one 0/1 list per categorical component."""
    if masks is None or distribution.probabilities is None:
        return [None] * batch
    bounds = np.cumsum([c.shape[1] for c in distribution.probabilities])[:-1]
    parts = [part.tolist() for part in np.split(masks.astype(np.int8), bounds, axis=1)]
    return [[part[row] for part in parts] for row in range(batch)]


def reward_record(
    decision_id: str,
    reward: float,
    terminated: bool | None = None,
    truncated: bool | None = None,
) -> Reward:
    return {
        "type": "reward",
        "time": time.time(),
        "decision_id": decision_id,
        "reward": float(reward),
        "terminated": terminated,
        "truncated": truncated,
    }


def episode_end_record(episode_id: str, terminated: bool, truncated: bool) -> EpisodeEnd:
    return {
        "type": "episode_end",
        "time": time.time(),
        "episode_id": episode_id,
        "terminated": terminated,
        "truncated": truncated,
    }
