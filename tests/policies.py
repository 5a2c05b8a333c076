"""The policies the tests serve: the bundled example, the real Pathmind policies in
../shared (the tests that need them skip without them), and small ones built by the tests
themselves, in the exports' formats."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "pathmind-models"
EXAMPLE = ROOT / "examples" / "cartpole"
EXAMPLE_KEY = "cartpole-demo-key"
PATHMIND_KEY = "1234567asdfgh"


def shared_model(name: str) -> Path:
    """A real Pathmind policy folder; skips the test with the reason when it is absent."""
    folder = SHARED_MODELS / name
    if not (folder / "saved_model.zip").is_file():
        pytest.skip(f"needs the real Pathmind policies: {folder} is absent")
    return folder


def linear_box_policy(folder: Path, weights: np.ndarray, log_std: np.ndarray, schema: str) -> None:
    """A SavedModel with RLlib's DiagGaussian layout: logits = [obs @ W, log_std]."""
    import tensorflow as tf

    width, dims = weights.shape
    w, s = tf.constant(weights, tf.float32), tf.constant(log_std, tf.float32)

    class Policy(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, width], tf.float32, name="observations"),
                tf.TensorSpec([None, dims], tf.float32, name="prev_action"),
                tf.TensorSpec([], tf.bool, name="is_training"),
            ]
        )
        def serve(self, observations: Any, prev_action: Any, is_training: Any) -> Any:
            mean = tf.matmul(observations, w)
            std_logits = tf.zeros_like(mean) + s
            return {
                "actions_0": mean + tf.exp(std_logits) * tf.random.normal(tf.shape(mean)),
                "action_dist_inputs": tf.concat([mean, std_logits], axis=1),
                "vf_preds": tf.reduce_sum(observations, axis=1),
            }

    module = Policy()
    model = folder / "export"
    tf.saved_model.save(module, str(model), signatures={"serving_default": module.serve})
    with zipfile.ZipFile(folder / "saved_model.zip", "w") as archive:
        for path in model.rglob("*"):
            archive.write(path, path.relative_to(model).as_posix())
    (folder / "schema.yaml").write_text(schema)


def linear_onnx_policy(path: Path, weights: np.ndarray, bias: np.ndarray) -> None:
    """A model.onnx as a PyTorch or SB3 export would give: obs -> (logits, value)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width, n = weights.shape
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["obs", "W", "b"], ["logits"]),
            helper.make_node("ReduceSum", ["obs", "axes"], ["value"], keepdims=0),
        ],
        "policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", width])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n]),
            helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def slow_onnx_policy(
    path: Path, width: int, actions: int, layers: int = 160, hidden: int = 1024
) -> None:
    """A model.onnx that takes milliseconds per call: `layers` products with one shared
    hidden x hidden matrix, for a shadow version much slower than the policy it shadows."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["obs", "W_in"], ["h0"])]
    for index in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{index}", "W"], [f"m{index}"]))
        nodes.append(helper.make_node("Tanh", [f"m{index}"], [f"h{index + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "W_out"], ["logits"]))
    nodes.append(helper.make_node("ReduceSum", ["obs", "axes"], ["value"], keepdims=0))
    weights = {
        "W_in": rng.normal(0, 0.5, (width, hidden)),
        "W": rng.normal(0, 1 / np.sqrt(hidden), (hidden, hidden)),
        "W_out": rng.normal(0, 0.1, (hidden, actions)),
    }
    graph = helper.make_graph(
        nodes,
        "slow-policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", width])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", actions]),
            helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[
            *(numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
