"""A continuous-action (Box) policy over V2: list, int and bool fields as tensors, the
schema's bounds, FP32 actions, and no key (`--no-auth`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.policies import linear_box_policy
from tests.protocols.rest.test_continuous import BODY, LOG_STD, SCHEMA, WEIGHTS
from tests.servers import RunningServer, serving


@pytest.fixture(scope="module")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("box") / "box"
    folder.mkdir()
    linear_box_policy(folder, WEIGHTS, LOG_STD, SCHEMA)
    with serving(folder, cache_dir, folder.parent, None, "--no-auth") as running:
        yield running


def inputs(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": "speed", "datatype": "FP32", "shape": [1], "data": [body["speed"]]},
        {"name": "sensors", "datatype": "FP32", "shape": [1, 3], "data": [body["sensors"]]},
        {"name": "gears", "datatype": "INT64", "shape": [1, 2], "data": [body["gears"]]},
        {"name": "braking", "datatype": "BOOL", "shape": [1], "data": [body["braking"]]},
    ]


def test_metadata_describes_the_fields_and_the_box(server: RunningServer) -> None:
    metadata = httpx.get(server.url + "/v2/models/box").json()
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("speed", "FP32", [-1]),
        ("sensors", "FP32", [-1, 3]),
        ("gears", "INT64", [-1, 2]),
        ("braking", "BOOL", [-1]),
    ]
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]}
    assert outputs["actions"] == ("FP32", [-1, 2])
    assert not any(name.startswith("probabilities") for name in outputs)


def test_deterministic_actions_are_the_mean(server: RunningServer) -> None:
    body = {"inputs": inputs(BODY), "parameters": {"deterministic": True}}
    answer = httpx.post(server.url + "/v2/models/box/infer", json=body).json()
    actions = next(o for o in answer["outputs"] if o["name"] == "actions")
    mode = httpx.post(server.url + "/api/v1/predict_deterministic", json=BODY).json()
    assert actions["shape"] == [1, 2]
    assert actions["data"] == pytest.approx(mode["actions"], rel=1e-6)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"speed": 11.0}, ("speed", "above the maximum 10")),
        ({"speed": -1.0}, ("speed", "below the minimum 0")),
    ],
)
def test_the_schema_bounds_hold(server: RunningServer, change: dict[str, Any], words: Any) -> None:
    answer = httpx.post(server.url + "/v2/models/box/infer", json={"inputs": inputs(BODY | change)})
    assert answer.status_code == 400
    assert all(word in answer.json()["error"] for word in words)


def test_a_mask_or_a_wrong_list_length_is_refused(server: RunningServer) -> None:
    mask = {"name": "action_mask", "datatype": "BOOL", "shape": [1, 2], "data": [True, True]}
    answer = httpx.post(server.url + "/v2/models/box/infer", json={"inputs": [*inputs(BODY), mask]})
    assert answer.status_code == 400 and "continuous" in answer.json()["error"]
    short = inputs(BODY)
    short[1] = {"name": "sensors", "datatype": "FP32", "shape": [1, 2], "data": [[0.1, 0.2]]}
    answer = httpx.post(server.url + "/v2/models/box/infer", json={"inputs": short})
    assert answer.status_code == 400 and "sensors" in answer.json()["error"]
    assert "[-1, 3]" in answer.json()["error"]
