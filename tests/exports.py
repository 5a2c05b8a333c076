"""Small RLlib-style exports built by the tests, in the shapes real Pathmind exports take.

Each builder writes `saved_model.zip` and `schema.yaml` into a policy folder and returns the
weights, so a test can compute the exact logits the export must serve.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MASKED_SCHEMA = """\
observations:
  distance: {type: float, minimum: 0, maximum: 10}
  hungry: {type: bool}
  steps: {type: int, minimum: 0, maximum: 100}
  action_mask: {type: "List[bool]", min_items: 3, max_items: 3}
parameters: {discrete: true, tuple: false, api_key: k}
"""

TF1_SCHEMA = """\
observations:
  position: {type: "List[float]", min_items: 4, max_items: 4}
parameters: {discrete: true, tuple: false, api_key: k}
"""


@dataclass(frozen=True)
class Linear:
    """logits = observations[:, :features] @ weights + bias; value = sum of the observations."""

    weights: np.ndarray
    bias: np.ndarray

    def logits(self, observations: np.ndarray) -> np.ndarray:
        features = self.weights.shape[0]
        return np.asarray(observations[:, :features] @ self.weights + self.bias, np.float32)


def _linear(features: int, actions: int, seed: int) -> Linear:
    rng = np.random.default_rng(seed)
    return Linear(
        rng.normal(size=(features, actions)).astype(np.float32),
        rng.normal(size=actions).astype(np.float32),
    )


def zip_folder(model: Path, archive: Path, prefix: str = "") -> None:
    """Zip the export folder `model` (under `prefix` inside the zip), then remove it."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(model.rglob("*")):
            bundle.write(path, prefix + path.relative_to(model).as_posix())
    shutil.rmtree(model)


def masked_policy(folder: Path) -> Linear:
    """A TF2 export whose last 3 observation values mask its 3 actions, as RLlib's
    action-masking models do: masked logits become about -3.4e38 and the graph samples
    from them, so a mask that is not 0/1 makes the graph's own sampling fail."""
    import tensorflow as tf

    linear = _linear(3, 3, seed=7)
    w, b = tf.constant(linear.weights), tf.constant(linear.bias)

    class Policy(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 6], tf.float32, name="observations"),
                tf.TensorSpec([None], tf.int64, name="prev_action"),
                tf.TensorSpec([], tf.bool, name="is_training"),
            ]
        )
        def serve(self, observations: Any, prev_action: Any, is_training: Any) -> Any:
            mask = observations[:, 3:]
            logits = tf.matmul(observations[:, :3], w) + b
            masked = logits + tf.maximum(tf.math.log(mask), tf.float32.min)
            actions = tf.random.categorical(masked, 1)[:, 0]
            logp = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=actions, logits=masked)
            return {
                "actions_0": actions,
                "action_dist_inputs": masked,
                "action_logp": logp,
                "action_prob": tf.exp(logp),
                "vf_preds": tf.reduce_sum(observations, axis=1),
            }

    module = Policy()
    model = folder / "export"
    tf.saved_model.save(module, str(model), signatures={"serving_default": module.serve})
    zip_folder(model, folder / "saved_model.zip")
    (folder / "schema.yaml").write_text(MASKED_SCHEMA)
    return linear


def tf1_timestep_policy(folder: Path, nested: bool = False) -> Linear:
    """A TF1 graph-mode export (tf.compat.v1 Builder) whose sampled action depends on a
    `timestep` placeholder that is not a signature input, as RLlib's exploration does.

    With `nested`, the zip holds the SavedModel one folder down (`saved_model/...`) beside
    a TensorBoard events file, as some Pathmind exports do.
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    linear = _linear(4, 2, seed=11)
    model = folder / "export"
    graph = tf.Graph()
    with graph.as_default():
        observations = v1.placeholder(tf.float32, [None, 4], name="observations")
        timestep = v1.placeholder(tf.int64, [], name="timestep")
        is_training = v1.placeholder_with_default(False, [], name="is_training")
        weights = v1.get_variable("weights", initializer=linear.weights, use_resource=False)
        bias = v1.get_variable("bias", initializer=linear.bias, use_resource=False)
        logits = tf.add(tf.matmul(observations, weights), bias, name="logits")
        epsilon = 1.0 / (1.0 + tf.cast(timestep, tf.float32))
        explore = tf.random.uniform(tf.shape(logits)[:1]) < epsilon
        actions = tf.where(
            tf.logical_and(explore, tf.logical_not(is_training)),
            tf.random.categorical(logits, 1)[:, 0],
            tf.argmax(logits, axis=1),
        )
        value = tf.reduce_sum(observations, axis=1)
        signature = v1.saved_model.signature_def_utils.predict_signature_def(
            inputs={"observations": observations, "is_training": is_training},
            outputs={
                "actions_0": actions,
                "action_dist_inputs": logits,
                "vf_preds": value,
                "action_prob": tf.ones_like(value),
            },
        )
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(model))
            builder.add_meta_graph_and_variables(
                session, ["serve"], signature_def_map={"serving_default": signature}
            )
            builder.save()
    if nested:
        (model / "events.out.tfevents.1700000000.host").write_bytes(b"\x00" * 64)
        zip_folder(model, folder / "saved_model.zip", prefix="saved_model/")
    else:
        zip_folder(model, folder / "saved_model.zip")
    (folder / "schema.yaml").write_text(TF1_SCHEMA)
    return linear


def unnamed_signature_policy(folder: Path) -> None:
    """A SavedModel whose only signature is not called `serving_default`."""
    import tensorflow as tf

    class Policy(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="observations")])
        def serve(self, observations: Any) -> Any:
            return {"action_dist_inputs": observations, "actions_0": tf.argmax(observations, 1)}

    module = Policy()
    model = folder / "export"
    tf.saved_model.save(module, str(model), signatures={"predict": module.serve})
    zip_folder(model, folder / "saved_model.zip")
    (folder / "schema.yaml").write_text("parameters: {api_key: k}\n")


def prev_action_policy(folder: Path) -> Linear:
    """A TF2 export whose logits also read `prev_action`, a batch-sized input besides the
    observations: TensorFlow serves it (fed RLlib's zeros), ONNX cannot take it alone."""
    import tensorflow as tf

    linear = _linear(4, 2, seed=5)
    w, b = tf.constant(linear.weights), tf.constant(linear.bias)

    class Policy(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 4], tf.float32, name="observations"),
                tf.TensorSpec([None], tf.int64, name="prev_action"),
            ]
        )
        def serve(self, observations: Any, prev_action: Any) -> Any:
            previous = tf.one_hot(prev_action, 2)
            logits = tf.matmul(observations, w) + b + 0.5 * previous
            return {"actions_0": tf.argmax(logits, axis=1), "action_dist_inputs": logits}

    module = Policy()
    model = folder / "export"
    tf.saved_model.save(module, str(model), signatures={"serving_default": module.serve})
    zip_folder(model, folder / "saved_model.zip")
    (folder / "schema.yaml").write_text(TF1_SCHEMA)
    return linear
