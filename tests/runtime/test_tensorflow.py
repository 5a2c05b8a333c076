"""The TensorFlow runtime on the real Pathmind exports and on the bundled example."""

from pathlib import Path

import numpy as np
import pytest

from policy_server.loading.archive import extract_cached
from policy_server.policy.schema import Parameters
from policy_server.policy.spaces import Discrete, MultiDiscrete
from policy_server.runtime.tensorflow import TensorFlowRuntime
from tests.policies import EXAMPLE, shared_model
from tests.reference import load_signature, reference_outputs

EXPECTED = {
    "mouse_and_cheese": (6, Discrete(4), "action_dist_inputs"),
    "simple_scheduling": (6, MultiDiscrete((6, 6, 6)), "action_dist_inputs"),
    "stock": (3, Discrete(2), "action_dist_inputs"),
    "deployment_test": (5, Discrete(24), "behaviour_logits"),
    "lpoc": (14, Discrete(5), "action_dist_inputs"),
}


def runtime_for(folder: Path, cache: Path) -> TensorFlowRuntime:
    model = extract_cached(folder / "saved_model.zip", cache, 10**9)
    return TensorFlowRuntime(model, Parameters())


@pytest.mark.models
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reads_layout_and_matches_tensorflow(name: str, tmp_path: Path) -> None:
    folder = shared_model(name)
    width, space, logits_name = EXPECTED[name]
    runtime = runtime_for(folder, tmp_path / "cache")
    assert runtime.observation_width == width
    assert runtime.action_space == space
    assert runtime.layout.logits_output == logits_name
    observations = np.random.default_rng(0).normal(size=(7, width)).astype(np.float32)
    outputs = runtime.forward(observations)
    reference = reference_outputs(
        load_signature(folder / "saved_model.zip", tmp_path / "ref"), observations
    )
    np.testing.assert_allclose(outputs.logits, reference[logits_name], rtol=1e-6, atol=1e-6)
    assert outputs.value is not None
    np.testing.assert_allclose(outputs.value, reference["vf_preds"], rtol=1e-6, atol=1e-6)


def test_bundled_example_is_a_discrete_policy(tmp_path: Path) -> None:
    runtime = runtime_for(EXAMPLE, tmp_path)
    assert runtime.observation_width == 4
    assert runtime.action_space == Discrete(2)
    upright_falling_right = np.array([[0.0, 0.0, 0.1, 0.5]], dtype=np.float32)
    logits = runtime.forward(upright_falling_right).logits
    assert logits[0].argmax() == 1, "a trained CartPole policy pushes towards the fall"
