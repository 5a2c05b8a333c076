"""Recurrent exports of each kind are recognised, and their runtimes feed the state, the
previous action and reward as the network run by hand takes them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from policy_server.errors import PolicyLoadError
from policy_server.loading.loader import load_folder
from policy_server.runtime.base import PolicyRuntime, StepInputs
from policy_server.settings import RuntimeChoice, Settings
from tests.recurrent_exports import (
    CELL,
    cell,
    keras_policy,
    onnx_recurrent_policy,
    tf1_recurrent_policy,
)


def _load(folder: Path, cache: Path, runtime: RuntimeChoice = "auto") -> PolicyRuntime:
    settings = Settings(policy_path=folder, cache_dir=cache, runtime=runtime)
    return load_folder(folder, "p", None, settings).runtime


def _episode(runtime, net, steps: int = 5, seed: int = 0) -> None:  # type: ignore[no-untyped-def]
    """Steps of a batch of two episodes through the runtime and by hand, state fed back."""
    rng = np.random.default_rng(seed)
    batch = 2
    h = c = np.zeros((batch, CELL), np.float32)
    width = 1 if net.discrete else net.actions
    prev = np.zeros((batch, width), np.float32)
    reward = np.zeros(batch, np.float32)
    state = runtime.recurrence.initial(batch).state
    for _ in range(steps):
        obs = rng.normal(size=(batch, 3)).astype(np.float32)
        got = runtime.forward(obs, StepInputs(state, prev.copy(), reward.copy()))
        logits, value, h, c = net.step(obs, h, c, prev, reward)
        np.testing.assert_allclose(got.logits, logits, atol=1e-5)
        np.testing.assert_allclose(got.value, value, atol=1e-5)
        np.testing.assert_allclose(got.state[0], h, atol=1e-5)
        np.testing.assert_allclose(got.state[1], c, atol=1e-5)
        state = got.state
        if net.discrete:
            prev = rng.integers(0, net.actions, (batch, 1)).astype(np.float32)
        else:
            prev = rng.normal(size=(batch, net.actions)).astype(np.float32)
        reward = rng.normal(size=batch).astype(np.float32)


@pytest.mark.parametrize(
    ("discrete", "unnamed"),
    [(True, False), (False, False), (True, True)],
    ids=["discrete", "continuous", "unnamed"],
)
def test_tf1_rllib_signature_steps_as_by_hand(
    tmp_path: Path, cache_dir: Path, discrete: bool, unnamed: bool
) -> None:
    net = cell(discrete=discrete, actions=3 if discrete else 2)
    tf1_recurrent_policy(tmp_path, net, unnamed=unnamed)
    runtime = _load(tmp_path, cache_dir)
    assert runtime.name == "onnx"  # converted with its state inputs, verified mid-episode
    assert runtime.recurrence is not None
    assert runtime.recurrence.state_sizes == (CELL, CELL)
    assert runtime.recurrence.reads_prev_action and runtime.recurrence.reads_prev_reward
    _episode(runtime, net)


def test_tf1_without_previous_action_and_reward(tmp_path: Path, cache_dir: Path) -> None:
    net = cell()
    tf1_recurrent_policy(tmp_path, net, prev=False)
    runtime = _load(tmp_path, cache_dir)
    assert runtime.recurrence is not None and not runtime.recurrence.reads_prev_action
    # The same network without its previous action and reward weights.
    alone = replace(net, wa=np.zeros_like(net.wa), wr=np.zeros_like(net.wr))
    _episode(runtime, alone)


def test_onnx_with_roles_in_schema_steps_as_by_hand(tmp_path: Path, cache_dir: Path) -> None:
    net = cell()
    onnx_recurrent_policy(tmp_path, net)
    runtime = _load(tmp_path, cache_dir)
    assert runtime.name == "onnx" and runtime.recurrence is not None
    _episode(runtime, net)


def test_onnx_without_roles_says_which_to_name(tmp_path: Path, cache_dir: Path) -> None:
    onnx_recurrent_policy(tmp_path, cell(), roles=False)
    with pytest.raises(PolicyLoadError, match=r"parameters\.model"):
        _load(tmp_path, cache_dir)


def test_an_input_of_no_known_role_is_refused_in_one_line(tmp_path: Path, cache_dir: Path) -> None:
    onnx_recurrent_policy(tmp_path, cell(), extra_input=True)
    with pytest.raises(PolicyLoadError) as refused:
        _load(tmp_path, cache_dir)
    message = str(refused.value)
    assert "\n" not in message
    assert "'default_policy/mystery:0'" in message and "model:" in message


def test_keras_export_serves_without_a_hint(tmp_path: Path, cache_dir: Path) -> None:
    model = keras_policy(tmp_path)
    runtime = _load(tmp_path, cache_dir)
    assert runtime.recurrence is None
    assert runtime.action_space.describe() == {"type": "Discrete", "n": 3}
    obs = np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32)
    expected = model(obs)  # type: ignore[operator]
    got = runtime.forward(obs)
    np.testing.assert_allclose(got.logits, np.asarray(expected["fc_out"]), atol=1e-5)
    assert got.value is not None
    np.testing.assert_allclose(got.value, np.asarray(expected["value_out"]).reshape(-1), atol=1e-5)
