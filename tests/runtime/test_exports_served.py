"""Kinds of export that are easy to refuse at start-up, served over a real HTTP server."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.exports import Linear, masked_policy, prev_action_policy, tf1_timestep_policy
from tests.policies import ROOT
from tests.reference import softmax
from tests.servers import RunningServer, serve_command, serving

KEY = "k"


@pytest.fixture(scope="module")
def masked_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningServer, Linear]]:
    folder = tmp_path_factory.mktemp("masked-policy")
    linear = masked_policy(folder)
    tmp = tmp_path_factory.mktemp("masked-server")
    with serving(folder, tmp / "cache", tmp, KEY) as server:
        yield server, linear


@pytest.fixture(scope="module")
def nested_tf1_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningServer, Linear]]:
    folder = tmp_path_factory.mktemp("nested-policy")
    linear = tf1_timestep_policy(folder, nested=True)
    tmp = tmp_path_factory.mktemp("nested-server")
    with serving(folder, tmp / "cache", tmp, KEY) as server:
        yield server, linear


def test_masked_policy_serves_masked_actions_no_probability(
    masked_server: tuple[RunningServer, Linear],
) -> None:
    server, linear = masked_server
    row = np.array([[1.5, 1, 10, 1, 0, 1]], dtype=np.float32)
    with server.client() as client:
        answer = client.post("/distribution", json={"obs": row[0].tolist()})
        assert answer.status_code == 200, answer.text
        probabilities = np.array(answer.json()["probabilities"][0])
        sampled = {
            client.post("/predict_raw", json={"obs": row[0].tolist()}).json()["actions"][0]
            for _ in range(30)
        }
    logits = np.where(row[:, 3:].astype(bool), linear.logits(row), -np.inf)
    np.testing.assert_allclose(probabilities, softmax(logits)[0], atol=1e-6)
    assert probabilities[1] == 0.0 and 1 not in sampled
    assert "(onnx," in server.output() and "Traceback" not in server.output()


def test_tf1_policy_zipped_one_folder_down_is_served(
    nested_tf1_server: tuple[RunningServer, Linear],
) -> None:
    server, linear = nested_tf1_server
    rows = np.random.default_rng(8).normal(size=(3, 4)).astype(np.float32)
    with server.client() as client:
        for row in rows:
            answer = client.post("/distribution", json={"obs": row.tolist()})
            assert answer.status_code == 200, answer.text
            np.testing.assert_allclose(
                answer.json()["probabilities"][0],
                softmax(linear.logits(row[None]))[0],
                atol=1e-5,
            )
    assert "(onnx," in server.output() and "Traceback" not in server.output()


def test_policy_onnx_cannot_take_is_refused_without_a_traceback(tmp_path: Path) -> None:
    prev_action_policy(tmp_path)
    command = serve_command(tmp_path, tmp_path / "cache", "--runtime", "onnx")
    result = subprocess.run(
        [arg.replace("{port}", "1") for arg in command],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "its logits read ['prev_action:0'] besides the observations" in result.stderr
    assert "Traceback" not in result.stderr
