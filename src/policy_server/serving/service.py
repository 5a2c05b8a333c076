"""The policy service: observation rows in, decisions and distributions out. No HTTP here.

Each call names the version that answers (resolved through the registry, per request), runs
its model through the version's caller (micro-batcher or Ray), applies the request's action
masks, chooses actions and hands the result to the observers (metrics, decision log, shadow).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

import numpy as np
import numpy.typing as npt

from policy_server.errors import InferenceTimeout, InvalidRows, PolicyUnavailable, RowError
from policy_server.policy.distribution import ActionDistribution, Actions, Categorical
from policy_server.policy.spaces import categorical_sizes
from policy_server.runtime.base import ModelOutputs
from policy_server.serving.batching import MicroBatcher
from policy_server.serving.episodes import LocalSteps, StepCounter
from policy_server.serving.registry import PolicyRegistry, PolicyVersion
from policy_server.settings import PolicySettings


class Prediction(TypedDict, total=False):
    """A plain dict at run time: batch answers build thousands, and a dict is the cheapest."""

    actions: list[Any]
    probability: float
    log_probability: float
    value: float | None
    policy: str
    version: str
    decision_id: str
    episode_id: str
    step: int


@dataclass(frozen=True)
class DistributionResult:
    action_space: dict[str, Any]
    probabilities: list[list[float]] | None
    mean: list[float] | None
    std: list[float] | None
    most_likely: list[Any]
    value: float | None
    policy: str
    version: str


@dataclass(frozen=True)
class Decisions:
    """One call's answers and what they were made of: the logits (masked), the model's
    outputs and the chosen actions, each with one row per observation."""

    predictions: list[Prediction]
    logits: npt.NDArray[np.floating[Any]]
    outputs: ModelOutputs
    chosen: Actions


@dataclass(frozen=True)
class Episode:
    """What a request says of the episode it belongs to."""

    episode_id: str | None = None
    step: int | None = None


NO_EPISODE = Episode()


class ModelCaller(Protocol):
    """How the service reaches a version's model: the in-process micro-batcher, or Ray Serve."""

    async def forward(self, rows: npt.NDArray[np.float32]) -> ModelOutputs: ...

    async def close(self) -> None: ...


@dataclass
class PredictionEvent:
    """One answered call, as the observers see it."""

    version: PolicyVersion
    rows: npt.NDArray[np.float32]
    logits: npt.NDArray[np.floating[Any]]
    outputs: ModelOutputs
    chosen: Actions
    predictions: list[Prediction]
    sampled: bool
    masks: npt.NDArray[np.bool_] | None


class Observer(Protocol):
    """Sees every answered prediction after its answer is built (metrics, decision log,
    shadow scoring). An observer that awaits delays the answer: only the decision log's
    back-pressure and sync mode should."""

    async def observe(self, event: PredictionEvent) -> None: ...


def local_caller(
    version: PolicyVersion, settings: PolicySettings, on_batch: Any = None
) -> MicroBatcher:
    return MicroBatcher(
        version.loaded.runtime.forward,
        settings.max_batch_size,
        settings.max_batch_wait_ms / 1000.0,
        on_batch,
    )


class PolicyService:
    """The one place a prediction is made, for every protocol: observation rows of one
    version in; the model's outputs through its caller (micro-batcher or Ray Serve), masks
    applied, actions sampled or the mode taken, decisions with ids and episode steps out;
    then every observer sees the answered call. No wire format here: protocols parse and
    format, the service decides."""

    def __init__(
        self,
        registry: PolicyRegistry,
        observers: Sequence[Observer] = (),
        steps: StepCounter | None = None,
    ) -> None:
        self.registry = registry
        self.observers = list(observers)
        self._rng = np.random.default_rng()
        self._steps = steps or LocalSteps()
        self._ids = DecisionIds()
        # Attaches a caller to a version that has none yet (an app used without lifespan).
        self.attach: Callable[[PolicyVersion], Awaitable[None]] | None = None

    async def predict(
        self,
        version: PolicyVersion,
        rows: npt.NDArray[np.float32],
        *,
        episodes: Sequence[Episode] | None = None,
        masks: Sequence[list[list[Any]] | None] | None = None,
        deterministic: bool = False,
        seed: int | None = None,
    ) -> list[Prediction]:
        """Decisions for observation rows of shape (batch, the model's input width)."""
        decisions = await self.decide(
            version, rows, episodes=episodes, masks=masks, deterministic=deterministic, seed=seed
        )
        return decisions.predictions

    async def decide(
        self,
        version: PolicyVersion,
        rows: npt.NDArray[np.float32],
        *,
        episodes: Sequence[Episode] | None = None,
        masks: Sequence[list[list[Any]] | None] | None = None,
        deterministic: bool = False,
        seed: int | None = None,
    ) -> Decisions:
        """`predict`, with the arrays the answers were made of, for protocols that answer
        with tensors (the Open Inference Protocol): no per-row conversion back."""
        policy = version.loaded
        mask = self._masks(version, masks, len(rows))
        outputs, logits = await self._logits(version, rows, mask)
        if deterministic:
            chosen = policy.distribution.mode(logits)
        else:
            rng = self._rng if seed is None else np.random.default_rng(seed)
            chosen = policy.distribution.sample(logits, rng)
        predictions = self._predictions(version, chosen, outputs, episodes)
        if self.observers:
            event = PredictionEvent(
                version, rows, logits, outputs, chosen, predictions, not deterministic, mask
            )
            for observer in self.observers:
                await observer.observe(event)
        return Decisions(predictions, logits, outputs, chosen)

    async def distribution(
        self,
        version: PolicyVersion,
        rows: npt.NDArray[np.float32],
        masks: Sequence[list[list[Any]] | None] | None = None,
    ) -> DistributionResult:
        policy = version.loaded
        outputs, logits = await self._logits(version, rows, self._masks(version, masks, len(rows)))
        exact = policy.distribution.distribution(logits)
        mode = policy.distribution.mode(logits)
        return DistributionResult(
            action_space=policy.runtime.action_space.describe(),
            probabilities=None
            if exact.probabilities is None
            else [component[0].tolist() for component in exact.probabilities],
            mean=None if exact.mean is None else exact.mean[0].tolist(),
            std=None if exact.std is None else exact.std[0].tolist(),
            most_likely=mode.values[0].tolist(),
            value=None if outputs.value is None else float(outputs.value[0]),
            policy=version.name,
            version=version.version,
        )

    async def _logits(
        self,
        version: PolicyVersion,
        rows: npt.NDArray[np.float32],
        mask: npt.NDArray[np.bool_] | None,
    ) -> tuple[ModelOutputs, npt.NDArray[np.floating[Any]]]:
        """The model's outputs for `rows`, and its logits with the masks applied and checked."""
        with self.registry.lease(version):
            outputs = await self._forward(version, rows)
        logits = _masked(version.loaded.distribution, outputs.logits, mask)
        self._check(version, logits)
        return outputs, logits

    async def _forward(self, version: PolicyVersion, rows: npt.NDArray[np.float32]) -> ModelOutputs:
        if version.caller is None and self.attach is not None:
            await self.attach(version)
        caller = version.caller
        if caller is None:
            raise PolicyUnavailable(f"{version.name} version {version.version} is not attached")
        timeout = self.registry.entry(version.name).settings.inference_timeout_s
        try:
            async with asyncio.timeout(timeout):
                outputs: ModelOutputs = await caller.forward(rows)
        except TimeoutError:
            raise InferenceTimeout(
                f"{version.name} version {version.version} did not answer within {timeout:g} s"
            ) from None
        return outputs

    def _check(self, version: PolicyVersion, logits: npt.NDArray[np.floating[Any]]) -> None:
        bad = ~version.loaded.distribution.valid_rows(logits)
        if not bad.any():
            return
        raise InvalidRows(
            "the model produced non-finite logits for this observation; its values are "
            "probably far outside the range the policy was trained on",
            [RowError(int(i), "", "out of range") for i in np.flatnonzero(bad)],
        )

    def _masks(
        self,
        version: PolicyVersion,
        masks: Sequence[list[list[Any]] | None] | None,
        count: int,
    ) -> npt.NDArray[np.bool_] | None:
        """The requests' action masks as one (batch, logits width) array; None if none."""
        if masks is None or all(m is None for m in masks):
            return None
        space = version.loaded.runtime.action_space
        distribution = version.loaded.distribution
        if not isinstance(distribution, Categorical):
            raise InvalidRows(
                "action_mask applies only to discrete action spaces",
                [
                    RowError(i, "action_mask", f"the action space is {space.describe()}")
                    for i, m in enumerate(masks)
                    if m is not None
                ],
            )
        sizes = categorical_sizes(space)
        result = np.ones((count, sum(sizes)), dtype=bool)
        errors: list[RowError] = []
        for row, mask in enumerate(masks):
            if mask is not None:
                errors += _fill_mask(result[row], mask, sizes, row)
        if errors:
            raise InvalidRows("invalid action mask", errors)
        return result

    def _predictions(
        self,
        version: PolicyVersion,
        chosen: Actions,
        outputs: ModelOutputs,
        episodes: Sequence[Episode] | None,
    ) -> list[Prediction]:
        values = chosen.values.tolist()
        log_probs = chosen.log_prob.tolist()
        probabilities = np.exp(chosen.log_prob).tolist()
        estimates = [None] * len(values) if outputs.value is None else outputs.value.tolist()
        ids = self._ids.take(len(values))
        name, label = version.name, version.version
        predictions: list[Prediction] = [
            {
                "actions": a,
                "probability": p,
                "log_probability": lp,
                "value": v,
                "policy": name,
                "version": label,
                "decision_id": i,
            }
            for a, p, lp, v, i in zip(values, probabilities, log_probs, estimates, ids, strict=True)
        ]
        if episodes is not None:
            for prediction, episode in zip(predictions, episodes, strict=True):
                if episode.episode_id is not None:
                    prediction["episode_id"] = episode.episode_id
                    prediction["step"] = self._step(episode)
        return predictions

    def _step(self, episode: Episode) -> int:
        """The client's step, else the count of the episode's decisions so far."""
        assert episode.episode_id is not None
        return self._steps.take(episode.episode_id, episode.step)

    def end_episode(self, episode_id: str) -> None:
        self._steps.end(episode_id)


def _masked(
    distribution: ActionDistribution,
    logits: npt.NDArray[np.floating[Any]],
    mask: npt.NDArray[np.bool_] | None,
) -> npt.NDArray[np.floating[Any]]:
    if mask is None or not isinstance(distribution, Categorical):
        return logits
    return distribution.masked(logits, mask)


def _fill_mask(
    target: npt.NDArray[np.bool_], mask: list[list[Any]], sizes: tuple[int, ...], row: int
) -> list[RowError]:
    if len(mask) != len(sizes):
        return [
            RowError(
                row,
                "action_mask",
                f"needs {len(sizes)} component(s) of sizes {list(sizes)}, got {len(mask)}",
            )
        ]
    errors, start = [], 0
    for component, (values, size) in enumerate(zip(mask, sizes, strict=True)):
        where = f"action_mask.{component}"
        if len(values) != size:
            errors.append(RowError(row, where, f"needs {size} values, got {len(values)}"))
        elif not any(values):
            errors.append(RowError(row, where, "masks every action; leave at least one"))
        else:
            target[start : start + size] = np.asarray(values, dtype=bool)
        start += size
    return errors


class DecisionIds:
    """Time-ordered unique ids in the UUIDv7 layout: 48 bits of Unix milliseconds, a counter
    that orders calls within a millisecond, and random bits that keep processes apart. The
    ids of one call share their random base and count up from it, so a batch of a thousand
    costs one formatting each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0
        self._random = random.Random(int.from_bytes(os.urandom(16), "big"))

    def take(self, count: int) -> list[str]:
        with self._lock:
            now = time.time_ns() // 1_000_000
            if now > self._last_ms:
                self._last_ms, self._counter = now, self._random.getrandbits(8)
            else:
                self._counter += 1
                if self._counter >= 1 << 12:  # counter overflow: borrow the next millisecond
                    self._last_ms, self._counter = self._last_ms + 1, 0
            high = (self._last_ms << 16) | (0x7 << 12) | self._counter
            base = self._random.getrandbits(62 - 20) << 20  # room to count up `count` ids
        head = f"{high:016x}"
        head = f"{head[:8]}-{head[8:12]}-{head[12:]}"
        ids = []
        for low in range((0b10 << 62) | base, (0b10 << 62) | base + count):
            text = f"{low:016x}"
            ids.append(f"{head}-{text[:4]}-{text[4:]}")
        return ids
