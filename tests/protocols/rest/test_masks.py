"""Action masks in requests: masked actions get probability exactly 0 in the sample, the mode
and the distribution, the rest renormalised; a bad mask is a 422 naming its component."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.policies import PATHMIND_KEY, shared_model
from tests.servers import RunningServer, serving

CART = [0.0, 0.1, 0.05, 0.2]
SCHEDULING = [12.0, 1.0, 0.0, 3.0, 1.0, 2.0]


def envelope(values: list[float], mask: object) -> dict[str, Any]:
    return {"observation": {"obs": values}, "action_mask": mask}


def test_a_masked_action_is_never_chosen(example_server: RunningServer) -> None:
    with example_server.client() as client:
        free = client.post("/distribution", json={"obs": CART}).json()
        assert free["most_likely"] == [1], "the example pushes right here"
        masked = client.post("/distribution", json=envelope(CART, [[True, False]])).json()
        mode = client.post("/predict_deterministic", json=envelope(CART, [[1, 0]])).json()
        samples = [
            client.post("/predict_raw", json=envelope(CART, [[True, False]])).json()
            for _ in range(50)
        ]
        batch = client.post(
            "/predict_raw_batch",
            json={"observations": [envelope(CART, [[False, True]]), CART]},
        ).json()["predictions"]
    assert masked["probabilities"] == [[1.0, 0.0]] and masked["most_likely"] == [0]
    assert mode["actions"] == [0] and mode["probability"] == 1.0
    assert {s["actions"][0] for s in samples} == {0}
    assert all(s["probability"] == 1.0 and s["log_probability"] == 0.0 for s in samples)
    assert batch[0]["actions"] == [1] and batch[0]["probability"] == 1.0
    assert batch[1]["probability"] < 1.0, "an item without a mask is not masked"


@pytest.mark.parametrize(
    ("mask", "field", "message"),
    [
        ([[False, False]], "action_mask.0", "masks every action"),
        ([[True, False, True]], "action_mask.0", "at most 2 items"),
        ([[True, False], [True]], "action_mask", "at most 1 item"),
        ([[True, "no"]], "action_mask.0.1", "0, 1, True or False"),
    ],
)
def test_a_bad_mask_is_a_422_naming_its_component(
    example_server: RunningServer, mask: object, field: str, message: str
) -> None:
    with example_server.client() as client:
        single = client.post("/predict_raw", json=envelope(CART, mask))
        batch = client.post(
            "/predict_raw_batch", json={"observations": [CART, envelope(CART, mask)]}
        )
    assert single.status_code == 422
    fields = single.json()["error"]["fields"]
    assert fields[0]["field"] == field and message in fields[0]["message"], fields
    assert batch.status_code == 422
    assert batch.json()["error"]["fields"][0]["field"].startswith("observations.1.")


@pytest.fixture(scope="module")
def scheduling(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    folder = shared_model("simple_scheduling")
    with serving(folder, cache_dir, tmp_path_factory.mktemp("sched"), PATHMIND_KEY) as server:
        yield server


@pytest.mark.models
def test_tuple_masks_renormalise_each_component(scheduling: RunningServer) -> None:
    allowed = [[True, True, False, False, False, False], [False] * 5 + [True], [True] * 6]
    with scheduling.client() as client:
        free = client.post("/distribution", json={"obs": SCHEDULING}).json()["probabilities"]
        masked = client.post("/distribution", json=envelope(SCHEDULING, allowed)).json()[
            "probabilities"
        ]
        sample = client.post("/predict_raw", json=envelope(SCHEDULING, allowed)).json()
        wrong = client.post("/predict_raw", json=envelope(SCHEDULING, allowed[:2]))
    for component, keep in enumerate(allowed):
        expected = np.where(keep, free[component], 0.0)
        np.testing.assert_allclose(masked[component], expected / expected.sum(), atol=1e-9)
        assert all(p == 0.0 for p, k in zip(masked[component], keep, strict=True) if not k)
    assert sample["actions"][1] == 5 and sample["actions"][0] in (0, 1)
    joint = np.prod([masked[c][a] for c, a in enumerate(sample["actions"])])
    assert sample["probability"] == pytest.approx(joint, rel=1e-9)
    assert wrong.status_code == 422
    assert wrong.json()["error"]["fields"][0]["field"] in ("action_mask", "action_mask.2")


def test_a_mask_for_continuous_actions_is_refused(cache_dir: Path, tmp_path: Path) -> None:
    from tests.policies import linear_box_policy

    schema = "parameters: {api_key: box-key, discrete: false}\n"
    linear_box_policy(tmp_path, np.eye(3, 2), np.zeros(2), schema)
    with serving(tmp_path, cache_dir, tmp_path, "box-key") as server, server.client() as client:
        response = client.post("/predict_raw", json=envelope([0.1, 0.2, 0.3], [[True]]))
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "action_mask"
