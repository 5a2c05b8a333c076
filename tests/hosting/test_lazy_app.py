"""An app served without its lifespan (`uvicorn app:app --lifespan off`, a bare test client,
a Ray Serve ingress) attaches each version's model caller at its first request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from policy_server.metrics import Metrics
from policy_server.serving.registry import PolicyVersion
from policy_server.serving.service import ModelCaller
from tests.inprocess import OBSERVATION, Gate, GatedCaller, in_process, repository, settings


def test_concurrent_first_requests_attach_one_caller(tmp_path: Path) -> None:
    attached: list[GatedCaller] = []
    gate = Gate()

    async def callers(version: PolicyVersion, _: Metrics) -> ModelCaller:
        await asyncio.sleep(0.05)  # a deployment takes a while to come up
        caller = GatedCaller(version, gate)
        attached.append(caller)
        return caller

    async def scenario() -> list[int]:
        root = repository(tmp_path / "repository", {"1": 1}, None)
        values = settings(root, tmp_path / "cache")
        async with in_process(values, callers, lifespan=False) as server:
            answers = await asyncio.gather(
                *(server.client.post("/predict", json=OBSERVATION) for _ in range(4))
            )
            return [answer.status_code for answer in answers]

    assert asyncio.run(scenario()) == [200] * 4
    assert len(attached) == 1, "one caller per version, however many first requests"
    assert gate.calls == {"1": 4}


def test_a_failed_attachment_is_retried_by_the_next_request(tmp_path: Path) -> None:
    tries: list[int] = []
    gate = Gate()

    async def callers(version: PolicyVersion, _: Metrics) -> ModelCaller:
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("the deployment did not come up")
        return GatedCaller(version, gate)

    async def scenario() -> None:
        root = repository(tmp_path / "repository", {"1": 1}, None)
        values = settings(root, tmp_path / "cache")
        async with in_process(values, callers, lifespan=False) as server:
            # The in-process transport raises what the app raised (a 500 on a real server).
            with pytest.raises(RuntimeError, match="did not come up"):
                await server.client.post("/predict", json=OBSERVATION)
            answer = await server.client.post("/predict", json=OBSERVATION)
            assert answer.status_code == 200

    asyncio.run(scenario())
    assert len(tries) == 2
