"""Concurrency and batch endpoints over a real server, on a linear policy with known answers."""

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.policies import linear_box_policy
from tests.servers import RunningServer, serving, without_ids

SCHEMA = """\
observations:
  x: {type: float}
  y: {type: float}
  z: {type: float}
parameters: {discrete: false, tuple: false, api_key: batch-key}
"""
WEIGHTS = np.array([[1.0, 0.5], [-2.0, 0.25], [0.5, -1.0]], dtype=np.float32)
LOG_STD = np.zeros(2, dtype=np.float32)


@pytest.fixture(scope="module")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("linear")
    linear_box_policy(folder, WEIGHTS, LOG_STD, SCHEMA)
    flags = (
        "--max-batch-size",
        "16",
        "--max-batch-wait-ms",
        "2",
        "--max-batch-observations",
        "1000",
    )
    with serving(folder, cache_dir, folder, "batch-key", *flags) as running:
        yield running


def observation(i: int) -> list[float]:
    return [float(i), float(i) / 10, -float(i) / 7]


async def hammer(server: RunningServer, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(
        base_url=server.url, headers=server.headers, limits=limits, timeout=60
    ) as client:
        return await asyncio.gather(
            *(client.post("/predict_deterministic", json=body) for body in bodies)
        )


def test_64_concurrent_clients_each_get_their_own_answer(server: RunningServer) -> None:
    bodies = [{"obs": observation(i)} for i in range(256)]
    responses = asyncio.run(hammer(server, bodies))
    for i, response in enumerate(responses):
        assert response.status_code == 200
        expected = np.array(observation(i), dtype=np.float32) @ WEIGHTS
        np.testing.assert_allclose(response.json()["actions"], expected, rtol=1e-5, atol=1e-5)


def test_a_bad_observation_does_not_fail_its_neighbours(server: RunningServer) -> None:
    # Finite inputs whose products overflow float32: infinite logits for this one only.
    poison = {"obs": [3e38, -3e38, 3e38]}
    bodies = [poison if i % 16 == 5 else {"obs": observation(i)} for i in range(128)]
    responses = asyncio.run(hammer(server, bodies))
    for i, response in enumerate(responses):
        if i % 16 == 5:
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "invalid_observation"
        else:
            assert response.status_code == 200
            expected = np.array(observation(i), dtype=np.float32) @ WEIGHTS
            np.testing.assert_allclose(response.json()["actions"], expected, rtol=1e-5, atol=1e-5)


def test_batch_endpoints_answer_in_order(server: RunningServer) -> None:
    vectors = [observation(i) for i in range(300)]
    typed = [dict(zip("xyz", v, strict=True)) for v in vectors]
    with server.client() as client:
        raw = client.post("/predict_raw_batch", params={"seed": 5}, json={"observations": vectors})
        again = client.post(
            "/predict_raw_batch", params={"seed": 5}, json={"observations": vectors}
        )
        by_type = client.post("/predict_batch", params={"seed": 5}, json={"observations": typed})
    assert raw.status_code == 200
    predictions = raw.json()["predictions"]
    assert len(predictions) == 300
    assert without_ids(raw.json()) == without_ids(again.json()) == without_ids(by_type.json())
    actions = np.array([p["actions"] for p in predictions])
    means = np.array(vectors, dtype=np.float32) @ WEIGHTS
    residuals = actions - means  # standard normal noise around each row's own mean
    assert abs(residuals.mean()) < 0.2 and 0.8 < residuals.std() < 1.2


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/predict_raw_batch", {"observations": [[0.0, 1.0, 2.0]] * 1001}, "observations"),
        ("/predict_raw_batch", {"observations": []}, "observations"),
        ("/predict_raw_batch", {"observations": [[0.0, 1.0, 2.0], [1.0]]}, "observations.1"),
        ("/predict_batch", {"observations": [{"x": 1, "y": 2, "z": "a"}]}, "observations.0.z"),
    ],
)
def test_bad_batches_name_the_item(
    server: RunningServer, path: str, body: dict[str, Any], field: str
) -> None:
    with server.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == 422
    assert field in [f["field"] for f in response.json()["error"]["fields"]]


def test_overflowing_row_in_a_batch_request_is_named(server: RunningServer) -> None:
    with server.client() as client:
        response = client.post(
            "/predict_raw_batch", json={"observations": [[1.0, 2.0, 3.0], [3e38, -3e38, 3e38]]}
        )
    assert response.status_code == 422
    assert [f["field"] for f in response.json()["error"]["fields"]] == ["observations.1"]
