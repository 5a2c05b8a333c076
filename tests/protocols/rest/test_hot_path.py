"""The prediction routes validate bodies from bytes in their own handlers; the same bodies get
the same statuses and errors as FastAPI's own handling of the same models (the way the
routes worked before), checked against a FastAPI route built here as the reference."""

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Body, FastAPI

from policy_server.loading.loader import load_policy
from policy_server.protocols.rest.errors import install_error_handlers
from policy_server.settings import Settings
from tests.policies import EXAMPLE
from tests.servers import RunningServer, app_in_thread

GOOD = {"cart_position": 0.0, "cart_velocity": 0.1, "pole_angle": 0.02, "pole_angular_velocity": 1}
BODIES: list[Any] = [
    GOOD,
    GOOD | {"pole_angle": "0.1"},
    GOOD | {"pole_angle": True},
    GOOD | {"pole_angle": None},
    GOOD | {"pole_angle": 1e39},
    GOOD | {"pole_angle": [1.0]},
    GOOD | {"extra": 1},
    {k: v for k, v in GOOD.items() if k != "cart_velocity"},
    {},
    [],
    [GOOD],
    "text",
    3,
    None,
    {"obs": [0.0, 0.0, 0.0, 0.0]},
]
RAW_BODIES: list[Any] = [
    {"obs": [0.0, 0.1, 0.2, 0.3]},
    {"obs": [0.0, 0.1, 0.2]},
    {"obs": [0.0, 0.1, 0.2, "x"]},
    {"obs": [0.0, 0.1, 0.2, 1e39]},
    {"obs": [0.0, 0.1, 0.2, 0.3], "more": 1},
    {"obs": "0,0,0,0"},
    {},
]
RAW_TEXT = [b'{"obs": [0, 0, 0, NaN]}', b'{"obs": [0, 0, 0, Infinity]}', b"{", b"", b"nul"]


@pytest.fixture(scope="module")
def reference(cache_dir: Path) -> Iterator[httpx.Client]:
    """FastAPI's own body handling of the policy's models, with our error handlers."""
    policy = load_policy(Settings(policy_path=EXAMPLE, cache_dir=cache_dir))
    Observation, Raw = policy.observation_model, policy.raw_model
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/predict")
    async def predict(observation: Annotated[Observation, Body()]) -> dict[str, bool]:  # type: ignore[valid-type]
        return {"ok": True}

    @app.post("/predict_raw")
    async def predict_raw(observation: Annotated[Raw, Body()]) -> dict[str, bool]:  # type: ignore[valid-type]
        return {"ok": True}

    with app_in_thread(app) as url, httpx.Client(base_url=url) as client:
        yield client


def outcome(response: httpx.Response, messages: bool = True) -> tuple[int, Any]:
    if response.status_code == 200:
        return 200, None
    error = response.json()["error"]
    fields = [(f["field"], f["message"] if messages else "") for f in error["fields"]]
    return response.status_code, (error["code"], fields)


@pytest.mark.parametrize("body", BODIES)
def test_typed_bodies_answer_as_fastapi_would(
    example_server: RunningServer, reference: httpx.Client, body: Any
) -> None:
    with example_server.client() as client:
        ours = client.post("/predict", json=body)
    assert outcome(ours) == outcome(reference.post("/predict", json=body)), ours.text


@pytest.mark.parametrize("body", RAW_BODIES)
def test_raw_bodies_answer_as_fastapi_would(
    example_server: RunningServer, reference: httpx.Client, body: Any
) -> None:
    with example_server.client() as client:
        ours = client.post("/predict_raw", json=body)
    assert outcome(ours) == outcome(reference.post("/predict_raw", json=body)), ours.text


@pytest.mark.parametrize("text", RAW_TEXT)
def test_undecodable_bodies_answer_as_fastapi_would(
    example_server: RunningServer, reference: httpx.Client, text: bytes
) -> None:
    """Same status, code and fields; the JSON parser's own wording of a syntax error may
    differ (pydantic's parser against the standard library's)."""
    headers = {"content-type": "application/json"}
    with example_server.client() as client:
        ours = client.post("/predict_raw", content=text, headers=headers)
    theirs = reference.post("/predict_raw", content=text, headers=headers)
    assert outcome(ours, messages=False) == outcome(theirs, messages=False), ours.text
