"""The front layer answers the prediction routes itself, ahead of Starlette's stack: what the
stack would have done must still happen there. An unexpected error is a JSON 500 with the
request's id (and is raised to the server, which logs it); a HEAD, a trailing slash and a
pinned version's path reach the same handlers; a request with an Origin under CORS goes
through the stack and gets its CORS headers. Whole servers in this process, on a small ONNX
policy written here."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from policy_server.hosting.app import build_app
from policy_server.metrics import Metrics
from policy_server.runtime.base import ModelOutputs, StepInputs
from policy_server.serving.registry import PolicyVersion
from tests.inprocess import KEY, OBSERVATION, in_process, onnx_policy, repository, settings


class BrokenCaller:
    """A model caller whose every call fails with an error nobody expects."""

    async def forward(
        self,
        rows: npt.NDArray[np.float32],
        step: StepInputs | None = None,
        timeout_s: float | None = None,
    ) -> ModelOutputs:
        raise RuntimeError("the model's library broke")

    async def close(self) -> None:
        pass


async def broken(_: PolicyVersion, __: Metrics) -> BrokenCaller:
    return BrokenCaller()


def test_an_unexpected_error_is_a_json_500_with_the_request_id(tmp_path: Path) -> None:
    values = settings(onnx_policy(tmp_path / "p"), tmp_path / "cache")
    app = build_app(values, broken)

    async def scenario() -> None:
        # As a server would: the app raises the error after answering it.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://in-process") as client,
        ):
            response = await client.post(
                "/predict",
                json=OBSERVATION,
                headers={"access-token": KEY, "x-request-id": "broken-1"},
            )
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "internal_error"
            assert response.headers["x-request-id"] == "broken-1"
            # The same without the transport's shield: the error reaches the server.
            raising = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=raising, base_url="http://x") as direct:
                with pytest.raises(RuntimeError, match="library broke"):
                    await direct.post("/predict", json=OBSERVATION, headers={"access-token": KEY})

    asyncio.run(scenario())


def test_head_trailing_slash_and_pinned_paths_reach_the_prediction_handlers(
    tmp_path: Path,
) -> None:
    values = settings(repository(tmp_path / "repository", {"1": 0}, None), tmp_path / "cache")

    async def scenario() -> None:
        async with in_process(values) as server:
            client = server.client
            plain = await client.post("/predict", json=OBSERVATION)
            slash = await client.post("/predict/", json=OBSERVATION)
            pinned = await client.post("/policies/p/versions/1/predict", json=OBSERVATION)
            for response in (plain, slash, pinned):
                assert response.status_code == 200, response.text
                assert set(response.json()) >= {"actions", "probability", "decision_id"}
            assert pinned.json()["version"] == "1"
            schema = await client.head("/policies/p/schema")
            assert schema.status_code == 200
            assert schema.content == b""
            assert int(schema.headers["content-length"]) > 0
            missing = await client.post("/policies/nope/predict", json=OBSERVATION)
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"

    asyncio.run(scenario())


def test_an_origin_under_cors_goes_through_the_stack_and_gets_its_headers(
    tmp_path: Path,
) -> None:
    origin = "http://page.example"
    values = settings(onnx_policy(tmp_path / "p"), tmp_path / "cache", cors_origins=origin)

    async def scenario() -> None:
        async with in_process(values) as server:
            headers: dict[str, Any] = {"origin": origin}
            response = await server.client.post("/predict", json=OBSERVATION, headers=headers)
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == origin
            plain = await server.client.post("/predict", json=OBSERVATION)
            assert "access-control-allow-origin" not in plain.headers

    asyncio.run(scenario())
