"""Every endpoint of the real Pathmind policies, over a real uvicorn server."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.policies import PATHMIND_KEY, shared_model
from tests.reference import load_signature, reference_outputs, softmax
from tests.servers import RunningServer, serving, without_ids

pytestmark = pytest.mark.models

MOUSE_FIELDS = [
    "mouse_row",
    "mouse_col",
    "mouse_row_distance",
    "mouse_col_distance",
    "cheese_row",
    "cheese_col",
]
SCHEDULING_FIELDS = [
    "total_products_processed",
    "machine1_seized",
    "machine2_seized",
    "seizeDelayStage1_queue",
    "seizeDelayStage2_queue",
    "seizeDelayStage3_queue",
]
# An observation whose distribution is not degenerate (about 0.63, 0.01, 0, 0.35).
SPREAD = [0.5, 0.2, -0.2, 0.3, 0.3, 0.5]


def start(name: str, cache_dir: Path, tmp: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serving(shared_model(name), cache_dir, tmp.mktemp(name), PATHMIND_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def mouse(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start("mouse_and_cheese", cache_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def scheduling(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    yield from start("simple_scheduling", cache_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def stock(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start("stock", cache_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def deployment(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    yield from start("deployment_test", cache_dir, tmp_path_factory)


def observation(fields: list[str], values: list[float]) -> dict[str, float]:
    return dict(zip(fields, values, strict=True))


def tf_probabilities(
    name: str, values: list[float], tmp: Path, components: int = 1
) -> list[np.ndarray]:
    signature = load_signature(shared_model(name) / "saved_model.zip", tmp)
    outputs = reference_outputs(signature, np.array([values], dtype=np.float32))
    logits = outputs.get("action_dist_inputs", outputs.get("behaviour_logits"))
    assert logits is not None
    return [softmax(block[0]) for block in np.split(logits, components, axis=1)]


def test_mouse_every_endpoint(mouse: RunningServer, tmp_path: Path) -> None:
    values = [0.2, 0.4, 0.1, -0.3, 0.6, 0.8]
    body = observation(MOUSE_FIELDS, values)
    with mouse.client() as client:
        assert client.get("/").json() == "ok"
        prediction = client.post("/predict", json=body).json()
        assert set(prediction) == {
            "actions",
            "probability",
            "log_probability",
            "value",
            "decision_id",
            "policy",
            "version",
        }
        assert prediction["policy"] == "mouse_and_cheese"
        assert len(prediction["actions"]) == 1 and prediction["actions"][0] in range(4)
        distribution = client.post("/distribution", json=body).json()
        raw_distribution = client.post("/distribution", json={"obs": values}).json()
        deterministic = client.post("/predict_deterministic", json=body).json()
        raw_deterministic = client.post("/predict_deterministic", json={"obs": values}).json()
        raw = client.post("/predict_raw", json={"obs": values}).json()
        schema = client.get("/schema").json()
    expected = tf_probabilities("mouse_and_cheese", values, tmp_path)[0]
    probabilities = np.array(distribution["probabilities"][0])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert raw_distribution == distribution
    assert without_ids(deterministic) == without_ids(raw_deterministic)
    assert deterministic["actions"] == [int(expected.argmax())] == distribution["most_likely"]
    assert deterministic["probability"] == pytest.approx(expected.max(), abs=1e-5)
    assert prediction["probability"] == pytest.approx(expected[prediction["actions"][0]], abs=1e-5)
    assert raw["actions"][0] in range(4)
    assert [f["name"] for f in schema["observations"]] == MOUSE_FIELDS
    assert schema["action_space"] == {"type": "Discrete", "n": 4}
    assert "api_key" not in str(schema) and PATHMIND_KEY not in str(schema)


def test_mouse_sampled_actions_follow_the_distribution(mouse: RunningServer) -> None:
    body = observation(MOUSE_FIELDS, SPREAD)
    draws = 600
    with mouse.client() as client:
        p = np.array(client.post("/distribution", json=body).json()["probabilities"][0])
    assert p.max() < 0.8, "the test needs an observation with several likely actions"
    with mouse.client() as client:
        actions = [client.post("/predict", json=body).json()["actions"][0] for _ in range(draws)]
    frequencies = np.bincount(actions, minlength=4) / draws
    tolerance = 5 * np.sqrt(p * (1 - p) / draws) + 1e-3
    assert np.all(np.abs(frequencies - p) <= tolerance), (frequencies, p)


def test_mouse_seeded_predictions_repeat(mouse: RunningServer) -> None:
    body = observation(MOUSE_FIELDS, SPREAD)
    with mouse.client() as client:
        runs = [
            [client.post("/predict", params={"seed": s}, json=body).json() for s in range(20)]
            for _ in range(2)
        ]
    assert [without_ids(a) for a in runs[0]] == [without_ids(b) for b in runs[1]]
    assert len({p["actions"][0] for p in runs[0]}) > 1, "different seeds give different samples"


def test_scheduling_tuple_actions(scheduling: RunningServer, tmp_path: Path) -> None:
    values = [12.0, 1.0, 0.0, 3.0, 1.0, 2.0]
    body = observation(SCHEDULING_FIELDS, values)
    with scheduling.client() as client:
        prediction = client.post("/predict", json=body).json()
        distribution = client.post("/distribution", json=body).json()
        deterministic = client.post("/predict_deterministic", json={"obs": values}).json()
        sampled = [client.post("/predict_raw", json={"obs": values}).json() for _ in range(300)]
        schema = client.get("/schema").json()
    assert schema["action_space"] == {"type": "MultiDiscrete", "nvec": [6, 6, 6]}
    assert len(prediction["actions"]) == 3
    expected = tf_probabilities("simple_scheduling", values, tmp_path, components=3)
    for component, p in enumerate(expected):
        np.testing.assert_allclose(distribution["probabilities"][component], p, atol=1e-5)
    assert deterministic["actions"] == [int(p.argmax()) for p in expected]
    joint = float(np.prod([p.max() for p in expected]))
    assert deterministic["probability"] == pytest.approx(joint, abs=1e-5)
    for component, p in enumerate(expected):
        counts = np.bincount([s["actions"][component] for s in sampled], minlength=6) / 300
        assert np.all(np.abs(counts - p) <= 5 * np.sqrt(p * (1 - p) / 300) + 1e-3)


def test_stock_is_raw_only(stock: RunningServer, tmp_path: Path) -> None:
    values = [0.5, -1.0, 2.0]
    with stock.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
        assert "/predict" not in paths
        assert {"/predict_raw", "/predict_deterministic", "/distribution"} <= set(paths)
        assert client.post("/predict", json={"obs": values}).status_code == 404
        raw = client.post("/predict_raw", json={"obs": values}).json()
        distribution = client.post("/distribution", json={"obs": values}).json()
        deterministic = client.post("/predict_deterministic", json={"obs": values}).json()
        wrong = client.post("/predict_raw", json={"obs": [1.0, 2.0]})
    assert raw["actions"][0] in (0, 1)
    expected = tf_probabilities("stock", values, tmp_path)[0]
    np.testing.assert_allclose(distribution["probabilities"][0], expected, atol=1e-5)
    assert deterministic["actions"] == [int(expected.argmax())]
    assert wrong.status_code == 422 and wrong.json()["error"]["fields"][0]["field"] == "obs"


def test_deployment_test_old_output_names(deployment: RunningServer, tmp_path: Path) -> None:
    values = [30.0, 12.0, 3.0, 6.0, 101.5]
    body = observation(["minute", "hour", "day", "month", "price"], [30, 12, 3, 6, 101.5])
    with deployment.client() as client:
        prediction = client.post("/predict", json=body).json()
        distribution = client.post("/distribution", json=body).json()
        deterministic = client.post("/predict_deterministic", json=body).json()
        wrong_type = client.post("/predict", json=body | {"minute": 1.5})
    expected = tf_probabilities("deployment_test", values, tmp_path)[0]
    assert len(distribution["probabilities"][0]) == 24
    np.testing.assert_allclose(distribution["probabilities"][0], expected, atol=1e-5)
    assert deterministic["actions"] == [int(expected.argmax())]
    assert prediction["actions"][0] in range(24)
    assert wrong_type.status_code == 422
    assert wrong_type.json()["error"]["fields"][0]["field"] == "minute"
