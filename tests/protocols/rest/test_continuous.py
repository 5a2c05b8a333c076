"""A continuous-action (Box) policy with list observations, a route prefix and no auth.

The policy is a small linear SavedModel with RLlib's export layout for DiagGaussian:
logits are the means, then the log-standard deviations.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.policies import linear_box_policy
from tests.servers import RunningServer, serving, without_ids

SCHEMA = """\
observations:
  speed:
    type: float
    minimum: 0
    maximum: 10
  sensors:
    type: List[float]
    min_items: 3
    max_items: 3
  gears:
    type: List[int]
    max_items: 2
  braking:
    type: bool
parameters:
  discrete: False
  tuple: False
  url_path: /api/v1
"""
WIDTH = 7
WEIGHTS = np.linspace(-1.0, 1.0, WIDTH * 2, dtype=np.float32).reshape(WIDTH, 2)
LOG_STD = np.array([np.log(0.5), np.log(2.0)], dtype=np.float32)


@pytest.fixture(scope="module")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("box")
    linear_box_policy(folder, WEIGHTS, LOG_STD, SCHEMA)
    with serving(folder, cache_dir, folder, None, "--no-auth") as running:
        yield running


BODY = {"speed": 2.5, "sensors": [0.1, -0.2, 0.3], "gears": [1, 3], "braking": True}
VECTOR = np.array([2.5, 0.1, -0.2, 0.3, 1.0, 3.0, 1.0], dtype=np.float32)


def test_continuous_distribution_and_mode(server: RunningServer) -> None:
    mean = VECTOR @ WEIGHTS
    with server.client() as client:
        distribution = client.post("/api/v1/distribution", json=BODY).json()
        deterministic = client.post("/api/v1/predict_deterministic", json=BODY).json()
        raw = client.post("/api/v1/predict_deterministic", json={"obs": VECTOR.tolist()}).json()
        schema = client.get("/api/v1/schema").json()
        assert client.post("/predict", json=BODY).status_code == 404
    assert schema["action_space"] == {"type": "Box", "shape": [2]}
    assert distribution["probabilities"] is None
    np.testing.assert_allclose(distribution["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(distribution["std"], [0.5, 2.0], rtol=1e-5)
    np.testing.assert_allclose(deterministic["actions"], mean, rtol=1e-5)
    assert without_ids(raw) == without_ids(deterministic)
    density = 1 / (2 * np.pi * 0.5 * 2.0)
    assert deterministic["probability"] == pytest.approx(density, rel=1e-5)
    assert deterministic["value"] == pytest.approx(float(VECTOR.sum()), rel=1e-5)


def test_continuous_samples_spread_around_the_mean(server: RunningServer) -> None:
    with server.client() as client:
        samples = np.array(
            [client.post("/api/v1/predict", json=BODY).json()["actions"] for _ in range(400)]
        )
    mean = VECTOR @ WEIGHTS
    standard_error = np.array([0.5, 2.0]) / np.sqrt(len(samples))
    assert np.all(np.abs(samples.mean(axis=0) - mean) < 5 * standard_error)
    np.testing.assert_allclose(samples.std(axis=0), [0.5, 2.0], rtol=0.25)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sensors": [0.1, 0.2]}, "sensors"),
        ({"sensors": [0.1, 0.2, 0.3, 0.4]}, "sensors"),
        ({"gears": [1.5, 2]}, "gears.0"),
        ({"gears": [1]}, "gears"),
        ({"braking": "yes"}, "braking"),
        ({"speed": -1}, "speed"),
    ],
)
def test_list_lengths_and_bounds_are_checked(
    server: RunningServer, change: dict[str, Any], field: str
) -> None:
    with server.client() as client:
        response = client.post("/api/v1/predict", json=BODY | change)
    assert response.status_code == 422
    assert field in [f["field"] for f in response.json()["error"]["fields"]]


def test_openapi_describes_the_observation(server: RunningServer) -> None:
    with server.client() as client:
        document = client.get("/openapi.json").json()
    observation = document["components"]["schemas"]["Observation"]
    assert list(observation["properties"]) == ["speed", "sensors", "gears", "braking"]
    assert observation["properties"]["sensors"]["maxItems"] == 3
    assert observation["properties"]["speed"]["maximum"] == 10
    assert observation["examples"][0]["sensors"] == [0.0, 0.0, 0.0]
    assert "security" not in document["paths"]["/api/v1/predict"]["post"]
