"""The policy service: rows in, decisions out, checked as a whole before any is counted.
In-process, on runtimes made in the test, through the real micro-batcher."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from policy_server.errors import InferenceTimeout, InvalidRows
from policy_server.runtime.base import ModelOutputs, StepInputs
from policy_server.serving.batching import MicroBatcher
from policy_server.serving.registry import PolicyEntry, PolicyRegistry, PolicyVersion
from policy_server.serving.service import (
    Episode,
    Group,
    PolicyService,
    PredictionEvent,
    local_caller,
)
from policy_server.settings import PolicySettings
from tests.runtimes import LinearRuntime, ready_entry


class Recorder:
    def __init__(self) -> None:
        self.events: list[PredictionEvent] = []

    async def observe(self, event: PredictionEvent) -> None:
        self.events.append(event)


def rows(*values: Sequence[float]) -> npt.NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


def service_of(
    versions: list[str], settings: PolicySettings | None = None
) -> tuple[PolicyService, PolicyEntry, Recorder]:
    registry = PolicyRegistry()
    entry = ready_entry(registry, "p", versions, settings=settings)
    for version in entry.versions.values():
        version.caller = local_caller(version, entry.settings)
    recorder = Recorder()
    return PolicyService(registry, [recorder]), entry, recorder


def runtime_of(version: PolicyVersion) -> LinearRuntime:
    runtime = version.loaded.runtime
    assert isinstance(runtime, LinearRuntime)
    return runtime


def test_deterministic_decisions_are_the_most_likely_actions() -> None:
    service, entry, recorder = service_of(["1"])
    version = entry.versions["1"]
    answers = asyncio.run(service.predict(version, rows([1, 0], [0, 1]), deterministic=True))
    assert [a["actions"] for a in answers] == [[0], [1]]
    assert all(a["probability"] > 0.99 and a["version"] == "1" for a in answers)
    assert answers[0]["value"] == 1.0
    assert len({a["decision_id"] for a in answers}) == 2
    [event] = recorder.events
    assert event.sampled is False and event.predictions == answers


def test_a_seed_makes_samples_reproducible() -> None:
    service, entry, _ = service_of(["1"])
    version = entry.versions["1"]
    even = rows(*([[0.01, 0.0]] * 64))

    def sample(seed: int) -> list[Any]:
        answers = asyncio.run(service.predict(version, even, seed=seed))
        return [a["actions"] for a in answers]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_episode_steps_count_up_unless_the_client_says_them() -> None:
    service, entry, _ = service_of(["1"])
    version = entry.versions["1"]

    def steps(*episodes: Episode) -> list[Any]:
        answers = asyncio.run(
            service.predict(version, rows(*[[1, 0]] * len(episodes)), episodes=episodes)
        )
        return [a.get("step") for a in answers]

    assert steps(Episode("e"), Episode("e"), Episode()) == [0, 1, None]
    assert steps(Episode("e", 10), Episode("e")) == [10, 11]
    asyncio.run(service.end_episode("e"))
    assert steps(Episode("e")) == [0]


def test_a_masked_action_is_never_chosen_and_a_bad_mask_names_its_row() -> None:
    service, entry, _ = service_of(["1"])
    version = entry.versions["1"]
    masks = [[[False, True]], None]
    answers = asyncio.run(
        service.predict(version, rows([1, 0], [1, 0]), masks=masks, deterministic=True)
    )
    assert [a["actions"] for a in answers] == [[1], [0]]
    with pytest.raises(InvalidRows) as refused:
        asyncio.run(service.predict(version, rows([1, 0], [1, 0]), masks=[None, [[True]]]))
    [error] = refused.value.rows
    assert (error.row, error.field) == (1, "action_mask.0")


def test_non_finite_logits_are_refused_by_row() -> None:
    service, entry, recorder = service_of(["1"])
    version = entry.versions["1"]
    with pytest.raises(InvalidRows) as refused:
        asyncio.run(service.predict(version, rows([0, 1], [999, 1])))
    assert [e.row for e in refused.value.rows] == [1]
    assert recorder.events == []


def test_groups_are_checked_as_a_whole_and_errors_name_the_request_rows() -> None:
    service, entry, recorder = service_of(["1", "2"])
    one, two = entry.versions["1"], entry.versions["2"]
    groups = [
        Group(one, rows([1, 0]), [Episode("a")], positions=[0]),
        Group(two, rows([0, 1], [999, 0]), [Episode("b"), Episode("c")], positions=[1, 2]),
    ]
    with pytest.raises(InvalidRows) as refused:
        asyncio.run(service.predict_groups(groups))
    assert [e.row for e in refused.value.rows] == [2]
    assert recorder.events == [], "no decision of a refused request is observed"
    assert one.in_flight == two.in_flight == 0
    groups[1] = Group(two, rows([0, 1]), [Episode("b")], positions=[1])
    answered = asyncio.run(service.predict_groups(groups, deterministic=True))
    assert [[a["version"] for a in group] for group in answered] == [["1"], ["2"]]
    assert [a["step"] for group in answered for a in group] == [0, 0], "nothing counted before"
    assert [e.version for e in recorder.events] == [one, two]


def test_a_model_that_does_not_answer_in_time_times_out() -> None:
    """The model call runs in the version's thread (its size was never seen), stalls, and
    the request is answered 504 after the time-out while the call goes on."""
    service, entry, recorder = service_of(["1"], PolicySettings(inference_timeout_s=0.05))
    version = entry.versions["1"]
    release = threading.Event()

    def stalled(rows: npt.NDArray[np.float32], step: StepInputs | None = None) -> ModelOutputs:
        release.wait(10)
        return ModelOutputs(np.zeros((len(rows), 2), np.float32), None)

    async def scenario() -> None:
        version.caller = MicroBatcher(stalled, 8, 0)
        try:
            await service.predict(version, rows([1, 0]))
        finally:
            release.set()
            await version.caller.close()

    with pytest.raises(InferenceTimeout, match=r"did not answer within 0\.05 s"):
        asyncio.run(scenario())
    assert recorder.events == [] and version.in_flight == 0


def test_the_distribution_is_exact() -> None:
    service, entry, _ = service_of(["1"])
    result = asyncio.run(service.distribution(entry.versions["1"], rows([0.1, 0.0])))
    assert result.probabilities is not None
    [probabilities] = result.probabilities
    expected = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    assert np.allclose(probabilities, expected)
    assert result.most_likely == [0] and result.version == "1"
    assert runtime_of(entry.versions["1"]).calls == [1]
