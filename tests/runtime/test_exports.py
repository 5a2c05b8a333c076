"""Kinds of real export that are easy to refuse at start-up, built small by the suite itself:
an action-masking model, a TF1 graph whose sampling reads an unfed `timestep`, and a zip
holding its SavedModel one folder down. TensorFlow's own logits are the truth."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from policy_server.errors import PolicyLoadError
from policy_server.loading.archive import extract_cached
from policy_server.policy.distribution import distribution_for
from policy_server.policy.schema import PolicySchema, load_schema
from policy_server.policy.spaces import ActionSpace, Discrete
from policy_server.runtime.base import ModelOutputs, Recurrence
from policy_server.runtime.convert import convert
from policy_server.runtime.onnx import OnnxRuntime
from policy_server.runtime.tensorflow import TensorFlowRuntime
from policy_server.runtime.verification import verification_observations, verify
from tests.exports import (
    Linear,
    masked_policy,
    prev_action_policy,
    tf1_timestep_policy,
    unnamed_signature_policy,
)
from tests.reference import load_signature, reference_outputs, softmax

FLOAT32_MIN = float(np.finfo(np.float32).min)


@dataclass
class Served:
    folder: Path
    linear: Linear
    schema: PolicySchema
    tensorflow: TensorFlowRuntime
    onnx: OnnxRuntime


def serve(folder: Path, linear: Linear) -> Served:
    schema = load_schema(folder / "schema.yaml")
    model = extract_cached(folder / "saved_model.zip", folder / "cache", 10**8)
    tensorflow = TensorFlowRuntime(model, schema.parameters, source=str(folder))
    onnx = convert(tensorflow, folder / "policy.onnx", schema)
    return Served(folder, linear, schema, tensorflow, onnx)


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> Served:
    folder = tmp_path_factory.mktemp("masked")
    return serve(folder, masked_policy(folder))


@pytest.fixture(scope="module")
def tf1(tmp_path_factory: pytest.TempPathFactory) -> Served:
    folder = tmp_path_factory.mktemp("tf1")
    return serve(folder, tf1_timestep_policy(folder))


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory) -> Served:
    folder = tmp_path_factory.mktemp("nested")
    return serve(folder, tf1_timestep_policy(folder, nested=True))


def masked_rows() -> np.ndarray:
    # distance, hungry, steps, then the mask of the 3 actions.
    return np.array(
        [
            [1.5, 1, 10, 1, 0, 1],
            [9.0, 0, 99, 0, 1, 0],
            [0.0, 1, 0, 1, 1, 1],
            [4.2, 0, 50, 0, 0, 1],
        ],
        dtype=np.float32,
    )


def test_masked_export_serves_tensorflows_own_logits(masked: Served, tmp_path: Path) -> None:
    rows = masked_rows()
    signature = load_signature(masked.folder / "saved_model.zip", tmp_path)
    truth = reference_outputs(signature, rows)["action_dist_inputs"]
    for runtime in (masked.tensorflow, masked.onnx):
        outputs = runtime.forward(rows)
        np.testing.assert_allclose(outputs.logits, truth, rtol=1e-5, atol=1e-4)
    mask = rows[:, 3:].astype(bool)
    np.testing.assert_allclose(truth[mask], masked.linear.logits(rows)[mask], rtol=1e-6)
    assert (truth[~mask] < -3e38).all(), "RLlib's masked logits are about float32's minimum"


@pytest.mark.parametrize("runtime", ["tensorflow", "onnx"])
def test_masked_export_gives_masked_actions_no_probability(masked: Served, runtime: str) -> None:
    rows = masked_rows()
    mask = rows[:, 3:].astype(bool)
    logits = getattr(masked, runtime).forward(rows).logits
    distribution = distribution_for(masked.onnx.action_space)
    probabilities = distribution.distribution(logits).probabilities
    assert probabilities is not None
    expected = np.where(mask, softmax(np.where(mask, masked.linear.logits(rows), -np.inf)), 0.0)
    np.testing.assert_allclose(probabilities[0], expected, atol=1e-6)
    assert (probabilities[0][~mask] == 0.0).all()
    sampled = distribution.sample(np.repeat(logits, 200, axis=0), np.random.default_rng(0))
    assert mask.repeat(200, axis=0)[np.arange(800), sampled.values[:, 0]].all()


def test_a_mask_leaving_no_legal_action_does_not_break_the_forward_pass(masked: Served) -> None:
    """The graph's own sampling fails on such rows; the served forward pass never runs it."""
    rows = np.array([[1.0, 0, 3, 0, 0, 0], [1.0, 0, 3, 0.5, -1, 2]], dtype=np.float32)
    for runtime in (masked.tensorflow, masked.onnx):
        assert runtime.forward(rows).logits.shape == (2, 3)


def test_verification_observations_respect_the_schema(masked: Served) -> None:
    rows = verification_observations(6, Discrete(3), masked.schema, rows=500)
    distance, hungry, steps, mask = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3:]
    assert ((distance >= 0) & (distance <= 10)).all()
    assert set(np.unique(hungry)) == {0.0, 1.0}
    assert ((steps >= 0) & (steps <= 100)).all() and (steps == np.round(steps)).all()
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert (mask.sum(axis=1) >= 1).all(), "every row leaves at least one legal action"
    assert (mask.sum(axis=1) == 1).any() and (mask.sum(axis=1) == 3).any()


def test_verification_observations_stay_within_bounds_beyond_int64() -> None:
    from policy_server.policy.schema import parse_schema

    schema = parse_schema(
        {
            "observations": {
                "big": {"type": "int", "minimum": -1e30, "maximum": 1e30},
                "tight": {"type": "int", "minimum": 2.5, "maximum": 3.5},
            },
            "parameters": {},
        }
    )
    rows = verification_observations(2, Discrete(2), schema, rows=100)
    assert (np.abs(rows[:, 0]) <= 1e30).all() and (rows[:, 1] == 3).all()


def test_masks_of_a_multi_discrete_policy_leave_an_action_per_component() -> None:
    from policy_server.policy.schema import parse_schema
    from policy_server.policy.spaces import MultiDiscrete

    schema = parse_schema(
        {
            "observations": {
                "x": {"type": "float"},
                "mask": {"type": "List[bool]", "min_items": 5, "max_items": 5},
            },
            "parameters": {"tuple": True},
        }
    )
    rows = verification_observations(6, MultiDiscrete((2, 3)), schema, rows=400)
    assert (rows[:, 1:3].sum(axis=1) >= 1).all() and (rows[:, 3:6].sum(axis=1) >= 1).all()


def test_tf1_export_with_an_unfed_timestep_placeholder_loads(tf1: Served, tmp_path: Path) -> None:
    import tensorflow as tf

    bundle = tmp_path / "bundle"
    with zipfile.ZipFile(tf1.folder / "saved_model.zip") as archive:
        archive.extractall(bundle)
    with pytest.raises(Exception, match="timestep"):
        tf.saved_model.load(str(bundle))  # what a plain load would do, and fail
    rows = np.random.default_rng(3).uniform(-5, 5, (9, 4)).astype(np.float32)
    truth = tf1_session_outputs(bundle, rows)
    np.testing.assert_allclose(tf1.tensorflow.forward(rows).logits, truth, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tf1.onnx.forward(rows).logits, truth, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(truth, tf1.linear.logits(rows), rtol=1e-5, atol=1e-5)
    value = tf1.onnx.forward(rows).value
    assert value is not None
    np.testing.assert_allclose(value, rows.sum(axis=1), rtol=1e-5, atol=1e-5)


def tf1_session_outputs(bundle: Path, rows: np.ndarray) -> np.ndarray:
    """An independent reference: a v1 session on the MetaGraph, `timestep` fed 0."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with v1.Session(graph=tf.Graph()) as session:
        meta = v1.saved_model.loader.load(session, ["serve"], str(bundle))
        signature = meta.signature_def["serving_default"]
        logits = session.run(
            signature.outputs["action_dist_inputs"].name,
            {signature.inputs["observations"].name: rows, "timestep:0": 0},
        )
    return np.asarray(logits)


def test_zip_with_the_saved_model_one_folder_down_loads(nested: Served) -> None:
    with zipfile.ZipFile(nested.folder / "saved_model.zip") as archive:
        names = archive.namelist()
    assert "saved_model/saved_model.pb" in names
    assert any("tfevents" in name for name in names)
    rows = np.random.default_rng(4).normal(size=(5, 4)).astype(np.float32)
    for runtime in (nested.tensorflow, nested.onnx):
        np.testing.assert_allclose(
            runtime.forward(rows).logits, nested.linear.logits(rows), rtol=1e-5, atol=1e-5
        )


def test_saved_model_without_serving_default_is_refused(tmp_path: Path) -> None:
    unnamed_signature_policy(tmp_path)
    model = extract_cached(tmp_path / "saved_model.zip", tmp_path / "cache", 10**8)
    with pytest.raises(PolicyLoadError) as error:
        TensorFlowRuntime(model, load_schema(tmp_path / "schema.yaml").parameters, "my-policy")
    message = str(error.value)
    assert message.startswith("my-policy: ")
    assert "no 'serving_default' signature (it has ['predict'])" in message


def test_damaged_saved_model_is_refused_with_the_cause(tmp_path: Path) -> None:
    (tmp_path / "saved_model.pb").write_bytes(b"\x08\x01garbage that is no protobuf")
    with pytest.raises(PolicyLoadError, match="TensorFlow cannot load the SavedModel"):
        TensorFlowRuntime(tmp_path, load_schema_text(tmp_path).parameters, "broken")


def load_schema_text(folder: Path) -> PolicySchema:
    (folder / "schema.yaml").write_text("parameters: {api_key: k}\n")
    return load_schema(folder / "schema.yaml")


class Failing:
    """A runtime made in the test: ONNX Runtime failing, or disagreeing, during verification."""

    name = "onnx"
    observation_width = 4
    action_space: ActionSpace = Discrete(2)
    recurrence: Recurrence | None = None

    def __init__(self, shift: float | None) -> None:
        self.shift = shift

    def forward(self, observations: np.ndarray, step: object = None) -> ModelOutputs:
        if self.shift is None:
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad input")
        logits = observations[:, :2] + self.shift
        return ModelOutputs(logits.astype(np.float32), None)


@pytest.mark.parametrize(
    ("shift", "message"),
    [
        (None, "the ONNX model fails on the verification observations ([ONNXRuntimeError]"),
        (1.0, "the ONNX model's logits differ from TensorFlow's by up to"),
    ],
)
def test_failed_verification_is_a_load_error_naming_the_policy(
    tf1: Served, shift: float | None, message: str
) -> None:
    with pytest.raises(PolicyLoadError) as error:
        verify(tf1.tensorflow, Failing(shift), tf1.schema)
    assert str(error.value).startswith(f"{tf1.folder}: {message}")


def test_logits_reading_a_batch_input_are_served_by_tensorflow_only(tmp_path: Path) -> None:
    linear = prev_action_policy(tmp_path)
    schema = load_schema(tmp_path / "schema.yaml")
    model = extract_cached(tmp_path / "saved_model.zip", tmp_path / "cache", 10**8)
    tensorflow = TensorFlowRuntime(model, schema.parameters, source="prev-action")
    rows = np.random.default_rng(6).normal(size=(3, 4)).astype(np.float32)
    truth = reference_outputs(load_signature(tmp_path / "saved_model.zip", tmp_path / "ref"), rows)
    np.testing.assert_allclose(tensorflow.forward(rows).logits, truth["action_dist_inputs"])
    previous_is_action_0 = np.array([0.5, 0.0], dtype=np.float32)
    np.testing.assert_allclose(
        tensorflow.forward(rows).logits, linear.logits(rows) + previous_is_action_0, rtol=1e-5
    )
    assert tensorflow.forward(rows).value is None
    with pytest.raises(PolicyLoadError, match=r"^prev-action: its logits read \['prev_action:0'\]"):
        convert(tensorflow, tmp_path / "policy.onnx", schema)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".onnx-*"))
