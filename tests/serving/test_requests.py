"""A request is answered whole or not at all, by versions it holds from the moment they are
chosen: a batch whose observations two versions answer, a pinned version retired while the
body is in transit, a later group that fails. Whole servers in this process, on small ONNX
policies written here, with model callers that hold chosen versions' calls."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from policy_server.serving.registry import PolicyRegistry, sticky_choice
from policy_server.serving.service import PredictionEvent
from tests.inprocess import (
    ADMIN_KEY,
    OBSERVATION,
    Gate,
    InProcess,
    gated_callers,
    in_process,
    repository,
    settings,
)

SPLIT = {"1": 50.0, "2": 50.0}
ADMIN = {"access-token": ADMIN_KEY}


class Recorder:
    """An observer that keeps every answered prediction."""

    def __init__(self) -> None:
        self.events: list[PredictionEvent] = []

    async def observe(self, event: PredictionEvent) -> None:
        self.events.append(event)


def episode_on(registry: PolicyRegistry, label: str, prefix: str = "e") -> str:
    """An episode id that the 50/50 split routes to version `label`."""
    entry = registry.entry("p")
    candidates = [(entry.versions[v], w) for v, w in SPLIT.items()]
    for index in range(1000):
        episode = f"{prefix}-{index}"
        if sticky_choice(episode, candidates).version == label:
            return episode
    raise AssertionError("no episode found")


def two_versions_batch(server: InProcess) -> dict[str, object]:
    first, second = episode_on(server.registry, "1"), episode_on(server.registry, "2")
    return {
        "observations": [
            {"observation": OBSERVATION, "episode_id": first},
            {"observation": OBSERVATION, "episode_id": second},
        ]
    }


async def until(condition: object, timeout: float = 10.0) -> None:
    """Let the event loop run until `condition()` holds."""
    for _ in range(int(timeout / 0.01)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


@pytest.fixture
def split(tmp_path: Path) -> Path:
    return repository(tmp_path / "repository", {"1": 1, "2": 2}, SPLIT)


def test_a_batch_holds_every_version_it_needs_until_it_is_answered(
    split: Path, tmp_path: Path
) -> None:
    """Version 2 is removed while version 1 answers the batch's first observation: version 2
    still answers the second, and is unloaded once the batch is answered."""
    gate = Gate(held={"1"})

    async def scenario() -> None:
        values = settings(split, tmp_path / "cache")
        async with in_process(values, gated_callers(gate)) as server:
            second = server.registry.entry("p").versions["2"]
            answer = asyncio.create_task(
                server.client.post("/predict_batch", json=two_versions_batch(server))
            )
            await gate.waiting.wait()
            shutil.rmtree(split / "p" / "2")
            report = await server.client.post("/admin/reload", headers=ADMIN)
            assert report.json()["unloaded"] == ["p/2"]
            await asyncio.sleep(0.05)  # the drain runs in the background
            gate.opened.set()
            response = await answer
            assert response.status_code == 200, response.text
            versions = [p["version"] for p in response.json()["predictions"]]
            assert versions == ["1", "2"]
            await until(lambda: second.caller is None)
            assert "2" not in server.registry.entry("p").versions

    asyncio.run(scenario())


def test_a_later_group_that_times_out_leaves_no_decision_and_no_step(
    split: Path, tmp_path: Path
) -> None:
    gate = Gate(held={"2"})
    recorder = Recorder()

    async def scenario() -> None:
        values = settings(split, tmp_path / "cache", inference_timeout_s=0.2)
        async with in_process(values, gated_callers(gate)) as server:
            server.app.state.service.observers.append(recorder)
            body = two_versions_batch(server)
            response = await server.client.post("/predict_batch", json=body)
            assert response.status_code == 504, response.text
            assert recorder.events == [], "no decision of the failed request was observed"
            first = body["observations"][0]  # type: ignore[index]
            again = await server.client.post("/predict", json=first)
            assert again.status_code == 200 and again.json()["step"] == 0
            gate.opened.set()

    asyncio.run(scenario())


def test_a_later_group_with_an_invalid_mask_is_refused_before_any_model_call(
    split: Path, tmp_path: Path
) -> None:
    gate = Gate()
    recorder = Recorder()

    async def scenario() -> None:
        async with in_process(settings(split, tmp_path / "cache"), gated_callers(gate)) as server:
            server.app.state.service.observers.append(recorder)
            body = two_versions_batch(server)
            body["observations"][1]["action_mask"] = [[False, False]]  # type: ignore[index]
            response = await server.client.post("/predict_batch", json=body)
            assert response.status_code == 422, response.text
            [error] = response.json()["error"]["fields"]
            assert error["field"] == "observations.1.action_mask.0"
            assert gate.calls == {}, "no model ran for a request refused as a whole"
            assert recorder.events == []
            first = body["observations"][0]  # type: ignore[index]
            again = await server.client.post("/predict", json=first)
            assert again.json()["step"] == 0

    asyncio.run(scenario())


def test_a_pinned_version_is_looked_up_once_the_body_has_arrived(
    split: Path, tmp_path: Path
) -> None:
    """Version 2 is removed while a request pinned to it is still sending its body: the
    request is told the version is gone (404), as one sent a moment later would be."""
    arrived = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"a": 0.1, "b": 0.2, '
        await arrived.wait()
        yield b'"c": 0.3, "d": 0.4}'

    async def scenario() -> None:
        async with in_process(settings(split, tmp_path / "cache")) as server:
            answer = asyncio.create_task(
                server.client.post("/policies/p/versions/2/predict", content=slow_body())
            )
            await asyncio.sleep(0.05)
            shutil.rmtree(split / "p" / "2")
            assert (await server.client.post("/admin/reload", headers=ADMIN)).status_code == 200
            await until(lambda: "2" not in server.registry.entry("p").versions)
            arrived.set()
            response = await answer
            assert response.status_code == 404, response.text
            assert "no version '2'" in response.json()["error"]["message"]

    asyncio.run(scenario())
