"""The policy service: observation rows in, decisions and distributions out. No HTTP here.

Each call names the version that answers (resolved through the registry, per request), runs
its model through the version's caller (micro-batcher or Ray), applies the request's action
masks, chooses actions and hands the result to the observers (metrics, decision log, shadow).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

import numpy as np
import numpy.typing as npt

from policy_server.errors import InferenceTimeout, InvalidRows, PolicyUnavailable, RowError
from policy_server.policy.distribution import ActionDistribution, Actions, Categorical
from policy_server.policy.spaces import categorical_sizes
from policy_server.runtime.base import ModelOutputs, Recurrence, StepInputs
from policy_server.serving.batching import MicroBatcher
from policy_server.serving.carried import CarriedCodec, ForeignState
from policy_server.serving.episodes import (
    Carried,
    EpisodeStep,
    EpisodeStore,
    LocalEpisodes,
    StepKey,
)
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
    # Recurrent policies: where the step's state came from (held, given or initial),
    # whether the episode's state was lost, and the state after the step when asked for.
    episode_state: str
    state_reset: bool
    state: str


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
    """What a request says of the episode it belongs to: its id (sequence id) and step, the
    reward that followed the episode's previous decision and, for a recurrent policy, the
    previous action (instead of the one answered), a state string to continue from (instead
    of the held state) and whether the answer should carry the state after this step."""

    episode_id: str | None = None
    step: int | None = None
    reward: float | None = None
    prev_action: list[float] | None = None
    state: str | None = None
    return_state: bool = False


NO_EPISODE = Episode()


@dataclass(frozen=True)
class Group:
    """The rows of one request that one version answers. `positions` says where they stand
    in the request, so that row errors name the request's own rows; None: all of them, in
    order."""

    version: PolicyVersion
    rows: npt.NDArray[np.float32]
    episodes: Sequence[Episode] | None = None
    masks: Sequence[list[list[Any]] | None] | None = None
    positions: Sequence[int] | None = None


class ModelCaller(Protocol):
    """How the service reaches a version's model: the in-process micro-batcher, or Ray Serve.

    `forward` raises TimeoutError when the outputs have not come within `timeout_s` (the
    wait for the model included): the caller keeps the time-out, so that a quick call with
    nothing to wait for arms no timer."""

    async def forward(
        self,
        rows: npt.NDArray[np.float32],
        step: StepInputs | None = None,
        timeout_s: float | None = None,
    ) -> ModelOutputs: ...

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
    # Rewards the requests carried, for the decisions their episodes answered before.
    rewards: list[tuple[str, float]] = field(default_factory=list)
    # Per row: whether a recurrent episode's state was lost (None: no episode state).
    state_resets: list[bool | None] | None = None
    # What a recurrent policy was fed besides the observations.
    inputs: StepInputs | None = None
    # A version route pinned the version: the traffic split did not choose it.
    pinned: bool = False
    elapsed_s: float = 0.0


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
        name=f"model-{version.name}-{version.version}",
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
        episodes: EpisodeStore | None = None,
    ) -> None:
        self.registry = registry
        self.observers = list(observers)
        self._rng = np.random.default_rng()
        self.episodes = LocalEpisodes() if episodes is None else episodes
        self._ids = DecisionIds()
        # Told of each call the version could not answer (time-out, broken output): the
        # version, whether it was pinned, and how long the call took.
        self.failures: list[Callable[[PolicyVersion, bool, float], None]] = []
        # Attaches a caller to a version that has none yet (an app used without lifespan).
        self.attach: Callable[[PolicyVersion], Awaitable[None]] | None = None
        self._attaching: dict[PolicyVersion, asyncio.Future[None]] = {}

    async def predict(
        self,
        version: PolicyVersion,
        rows: npt.NDArray[np.float32],
        *,
        episodes: Sequence[Episode] | None = None,
        masks: Sequence[list[list[Any]] | None] | None = None,
        deterministic: bool = False,
        seed: int | None = None,
        pinned: bool = False,
    ) -> list[Prediction]:
        """Decisions for observation rows of shape (batch, the model's input width).

        A row whose episode names an id is one step of that episode: its step is counted,
        its reward joins the episode's previous decision and, for a recurrent policy, the
        model is fed the episode's state and the state it returns is kept. `pinned` when
        the request named the version rather than the traffic split."""
        decisions = await self.decide(
            version,
            rows,
            episodes=episodes,
            masks=masks,
            deterministic=deterministic,
            seed=seed,
            pinned=pinned,
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
        pinned: bool = False,
    ) -> Decisions:
        """`predict`, with the arrays the answers were made of, for protocols that answer
        with tensors (the Open Inference Protocol): no per-row conversion back."""
        group = Group(version, rows, episodes, masks)
        [decisions] = await self.decide_groups(
            [group], deterministic=deterministic, seed=seed, pinned=pinned
        )
        return decisions

    async def predict_groups(
        self,
        groups: Sequence[Group],
        *,
        deterministic: bool = False,
        seed: int | None = None,
        pinned: bool = False,
    ) -> list[list[Prediction]]:
        """Decisions for one request whose rows several versions answer, one list per group
        (see `decide_groups`)."""
        decided = await self.decide_groups(
            groups, deterministic=deterministic, seed=seed, pinned=pinned
        )
        return [decisions.predictions for decisions in decided]

    async def decide_groups(
        self,
        groups: Sequence[Group],
        *,
        deterministic: bool = False,
        seed: int | None = None,
        pinned: bool = False,
    ) -> list[Decisions]:
        """Decisions for one request whose rows several versions answer, one per group.

        The request is answered whole or not at all: every version is leased before the
        first model call (call this in the same step of the event loop as the lookup that
        chose them), and every group's masks, episode inputs and logits are checked before
        any decision reaches the observers. Episode steps are counted once every model
        answered, except a recurrent episode's, which its model call needs first (its
        state); a later group's failure leaves that step counted."""
        started = time.perf_counter()
        with self.registry.lease(*(group.version for group in groups)):
            masks = [self._group_masks(group) for group in groups]
            ids = [self._ids.take(len(group.rows)) for group in groups]
            steps: list[list[EpisodeStep | None] | None] = [None] * len(groups)
            inputs: list[StepInputs | None] = [None] * len(groups)
            origins: list[list[str] | None] = [None] * len(groups)
            for index, group in enumerate(groups):
                recurrence = group.version.loaded.runtime.recurrence
                if recurrence is not None:
                    steps[index] = await self._group_begin(group, ids[index], recurrent=True)
                    inputs[index], origins[index] = self._group_inputs(
                        group, recurrence, steps[index]
                    )
            try:
                outputs = await self._forward_all(groups, inputs)
                logits = [
                    self._checked_logits(group, output, mask)
                    for group, output, mask in zip(groups, outputs, masks, strict=True)
                ]
            except Exception:
                for group in groups:
                    for failure in self.failures:
                        failure(group.version, pinned, time.perf_counter() - started)
                raise
            for index, group in enumerate(groups):
                if origins[index] is None and group.episodes is not None:
                    steps[index] = await self._group_begin(group, ids[index], recurrent=False)
            answers, events = [], []
            for index, group in enumerate(groups):
                version, output, logit = group.version, outputs[index], logits[index]
                policy = version.loaded
                if deterministic:
                    chosen = policy.distribution.mode(logit)
                else:
                    rng = self._rng if seed is None else np.random.default_rng(seed)
                    chosen = policy.distribution.sample(logit, rng)
                predictions = self._predictions(
                    version, chosen, output, ids[index], group.episodes, steps[index]
                )
                resets: list[bool | None] | None = None
                found = origins[index]
                if found is not None:
                    resets = await self._carry(
                        version, group.episodes, steps[index], found, output, chosen, predictions
                    )
                answers.append(Decisions(predictions, logit, output, chosen))
                events.append(
                    PredictionEvent(
                        version,
                        group.rows,
                        logit,
                        output,
                        chosen,
                        predictions,
                        not deterministic,
                        masks[index],
                        _rewards(group.episodes, steps[index]),
                        resets,
                        inputs[index],
                        pinned,
                    )
                )
            if self.observers:
                elapsed = time.perf_counter() - started
                for event in events:
                    event.elapsed_s = elapsed
                    for observer in self.observers:
                        await observer.observe(event)
        return answers

    async def _group_begin(
        self, group: Group, ids: list[str], *, recurrent: bool
    ) -> list[EpisodeStep | None] | None:
        try:
            return await self._begin(group.version, group.episodes, ids, recurrent)
        except InvalidRows as error:
            raise _in_request(group, error) from None

    def _group_inputs(
        self, group: Group, recurrence: Recurrence, steps: list[EpisodeStep | None] | None
    ) -> tuple[StepInputs, list[str]]:
        try:
            return self._step_inputs(
                group.version, recurrence, group.episodes, steps, len(group.rows)
            )
        except InvalidRows as error:
            raise _in_request(group, error) from None

    async def _begin(
        self,
        version: PolicyVersion,
        episodes: Sequence[Episode] | None,
        ids: list[str],
        recurrent: bool,
    ) -> list[EpisodeStep | None] | None:
        """Each row's step as the episode store counts it (None for a row of no episode)."""
        if episodes is None:
            return None
        rows = [i for i, e in enumerate(episodes) if e.episode_id is not None]
        if not rows:
            return None
        if recurrent:
            _refuse_repeated_episodes(episodes, rows)
        keys = []
        for row in rows:
            episode = episodes[row]
            assert episode.episode_id is not None
            keys.append(
                StepKey(episode.episode_id, version.name, version.version, ids[row], episode.step)
            )
        found = await self.episodes.begin(keys)
        steps: list[EpisodeStep | None] = [None] * len(episodes)
        for row, step in zip(rows, found, strict=True):
            steps[row] = step
        return steps

    def codec(self, version: PolicyVersion) -> CarriedCodec:
        """The version's state codec, built once and kept on the version."""
        policy = version.loaded
        found: CarriedCodec | None = policy.derived.get("service.codec")
        if found is None:
            assert policy.runtime.recurrence is not None
            found = CarriedCodec(
                version.name, version.version, policy.runtime.recurrence, self.episodes.secret
            )
            policy.derived["service.codec"] = found
        return found

    def _step_inputs(
        self,
        version: PolicyVersion,
        recurrence: Recurrence,
        episodes: Sequence[Episode] | None,
        steps: list[EpisodeStep | None] | None,
        count: int,
    ) -> tuple[StepInputs, list[str]]:
        """What each row feeds besides its observation, and where its state came from: the
        request's `state`, the episode's held state, else zeros (RLlib's initial state)."""
        inputs = recurrence.initial(count)
        origins = ["initial"] * count
        if episodes is None:
            return inputs, origins
        codec = self.codec(version)
        errors: list[RowError] = []
        for row, episode in enumerate(episodes):
            step = steps[row] if steps is not None else None
            carried = None
            if episode.state is not None:
                try:
                    carried = codec.verify(episode.state)
                except ForeignState as error:
                    errors.append(RowError(row, "state", f"the state string {error}"))
                    continue
                origins[row] = "given"
            elif step is not None and step.carried is not None:
                carried, origins[row] = step.carried, "held"
            if carried is not None:
                state, action = codec.decode(carried)
                for target, values in zip(inputs.state, state, strict=True):
                    target[row] = values
                inputs.prev_actions[row] = action
            if episode.prev_action is not None:
                if len(episode.prev_action) != recurrence.action_width:
                    errors.append(
                        RowError(
                            row,
                            "prev_action",
                            f"needs {recurrence.action_width} value(s), one per action "
                            f"component, got {len(episode.prev_action)}",
                        )
                    )
                    continue
                inputs.prev_actions[row] = episode.prev_action
            # RLlib feeds 0 at an episode's first step, whatever followed the one before.
            first = step is not None and step.step == 0 and origins[row] != "given"
            if episode.reward is not None and not first:
                inputs.prev_rewards[row] = episode.reward
        if errors:
            raise InvalidRows("invalid episode state", errors)
        return inputs, origins

    async def _carry(
        self,
        version: PolicyVersion,
        episodes: Sequence[Episode] | None,
        steps: list[EpisodeStep | None] | None,
        origins: list[str],
        outputs: ModelOutputs,
        chosen: Actions,
        predictions: list[Prediction],
    ) -> list[bool | None]:
        """Keep each episode's state after the step; hand it out where asked for."""
        assert outputs.state is not None
        codec = self.codec(version)
        carried = codec.encode(outputs.state, chosen.values.astype(np.float32))
        kept, resets = [], []
        for row, prediction in enumerate(predictions):
            episode = episodes[row] if episodes is not None else None
            step = steps[row] if steps is not None else None
            prediction["episode_state"] = origins[row]
            if step is not None and episode is not None and episode.episode_id is not None:
                prediction["state_reset"] = step.state_reset and origins[row] != "given"
                kept.append(
                    Carried(episode.episode_id, version.name, version.version, carried[row])
                )
            resets.append(None if step is None else prediction["state_reset"])
            if episode is not None and episode.return_state:
                prediction["state"] = codec.sign(carried[row])
        if kept:
            await self.episodes.keep(kept)
        return resets

    async def distribution(
        self,
        version: PolicyVersion,
        rows: npt.NDArray[np.float32],
        masks: Sequence[list[list[Any]] | None] | None = None,
        episodes: Sequence[Episode] | None = None,
    ) -> DistributionResult:
        """The exact distribution; never a step of an episode: a recurrent policy's is
        computed from the request's `state` (and `prev_action`, `reward`), else from the
        initial state."""
        policy = version.loaded
        recurrence = policy.runtime.recurrence
        group = Group(version, rows, episodes, masks)
        with self.registry.lease(version):
            inputs = None
            if recurrence is not None:
                inputs, _ = self._group_inputs(group, recurrence, None)
            mask = self._group_masks(group)
            [outputs] = await self._forward_all([group], [inputs])
            logits = self._checked_logits(group, outputs, mask)
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

    def _group_masks(self, group: Group) -> npt.NDArray[np.bool_] | None:
        try:
            return self._masks(group.version, group.masks, len(group.rows))
        except InvalidRows as error:
            raise _in_request(group, error) from None

    def _checked_logits(
        self, group: Group, outputs: ModelOutputs, mask: npt.NDArray[np.bool_] | None
    ) -> npt.NDArray[np.floating[Any]]:
        """The model's logits with the masks applied and checked."""
        logits = _masked(group.version.loaded.distribution, outputs.logits, mask)
        try:
            self._check(group.version, logits)
        except InvalidRows as error:
            raise _in_request(group, error) from None
        return logits

    async def _forward_all(
        self, groups: Sequence[Group], inputs: Sequence[StepInputs | None]
    ) -> list[ModelOutputs]:
        if len(groups) == 1:
            return [await self._forward(groups[0].version, groups[0].rows, inputs[0])]
        # Every call finishes before the leases end, the failed ones too.
        results = await asyncio.gather(
            *(
                self._forward(group.version, group.rows, step)
                for group, step in zip(groups, inputs, strict=True)
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def _forward(
        self,
        version: PolicyVersion,
        rows: npt.NDArray[np.float32],
        inputs: StepInputs | None = None,
    ) -> ModelOutputs:
        if version.caller is None and self.attach is not None:
            await self._attached(version)
        caller = version.caller
        if caller is None:
            raise PolicyUnavailable(f"{version.name} version {version.version} is not attached")
        timeout = self.registry.entry(version.name).settings.inference_timeout_s
        try:
            outputs: ModelOutputs = await caller.forward(rows, inputs, timeout)
        except TimeoutError:
            raise InferenceTimeout(
                f"{version.name} version {version.version} did not answer within {timeout:g} s"
            ) from None
        return outputs

    async def _attached(self, version: PolicyVersion) -> None:
        """Attach `version`'s caller once, however many first requests wait for it: a second
        caller would be a second micro-batcher, or a Ray deployment nobody closes. A failed
        attachment is retried by the next request."""
        assert self.attach is not None
        attaching = self._attaching.get(version)
        if attaching is None:
            attaching = asyncio.ensure_future(self.attach(version))
            self._attaching[version] = attaching
            attaching.add_done_callback(lambda _: self._attaching.pop(version, None))
        # Shielded: a waiter that times out or goes away does not cancel the others' attachment.
        await asyncio.shield(attaching)

    def _check(self, version: PolicyVersion, logits: npt.NDArray[np.floating[Any]]) -> None:
        if math.isfinite(logits.sum()):  # every logit finite: one call, no per-row test
            return
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
        ids: list[str],
        episodes: Sequence[Episode] | None,
        steps: list[EpisodeStep | None] | None,
    ) -> list[Prediction]:
        values = chosen.values.tolist()
        log_probs = chosen.log_prob.tolist()
        if len(log_probs) == 1:  # a numpy call costs more than one exponential
            probabilities = [math.exp(log_probs[0])]
        else:
            probabilities = np.exp(chosen.log_prob).tolist()
        estimates = [None] * len(values) if outputs.value is None else outputs.value.tolist()
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
        if episodes is not None and steps is not None:
            for prediction, episode, step in zip(predictions, episodes, steps, strict=True):
                if episode.episode_id is not None and step is not None:
                    prediction["episode_id"] = episode.episode_id
                    prediction["step"] = step.step
        return predictions

    async def end_episode(self, episode_id: str) -> None:
        """Forget the episode: its next step starts from zeros, counted from 0."""
        await self.episodes.end(episode_id)


def _refuse_repeated_episodes(episodes: Sequence[Episode], rows: list[int]) -> None:
    """Two steps of one recurrent episode in one call have no order: the second would need
    the state the first returns."""
    seen: dict[str, int] = {}
    errors = []
    for row in rows:
        episode_id = episodes[row].episode_id
        assert episode_id is not None
        if episode_id in seen:
            errors.append(
                RowError(
                    row,
                    "episode_id",
                    f"episode {episode_id!r} is also item {seen[episode_id]} of this batch; "
                    "send a recurrent episode's steps one call at a time",
                )
            )
        else:
            seen[episode_id] = row
    if errors:
        raise InvalidRows("two steps of one episode in one batch", errors)


def _rewards(
    episodes: Sequence[Episode] | None, steps: list[EpisodeStep | None] | None
) -> list[tuple[str, float]]:
    """The rewards the requests carried, for the decisions that preceded them."""
    if episodes is None or steps is None:
        return []
    return [
        (step.previous_decision, episode.reward)
        for episode, step in zip(episodes, steps, strict=True)
        if step is not None
        and episode.reward is not None
        and step.previous_decision is not None
        and step.step > 0
    ]


def _in_request(group: Group, error: InvalidRows) -> InvalidRows:
    """A group's row errors, renumbered as the request's rows."""
    if group.positions is None:
        return error
    positions = group.positions
    return InvalidRows(
        error.message, [RowError(positions[r.row], r.field, r.message) for r in error.rows]
    )


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
            ms, counter = self._last_ms, self._counter
            base = self._random.getrandbits(62 - 20) << 20  # room to count up `count` ids
        # The UUID's groups straight from the integers, no slicing; a batch's ids share
        # everything but the last group, formatted by one template (half an f-string's cost).
        head = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7{counter:03x}-"
        low = (0b10 << 62) | base
        group, rest = low >> 48, low & 0xFFFF_FFFF_FFFF
        if count == 1:
            return [f"{head}{group:04x}-{rest:012x}"]
        return list(map(f"{head}{group:04x}-%012x".__mod__, range(rest, rest + count)))
