"""An independent TensorFlow reference: run a SavedModel's signature directly, no policy_server."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np


def load_signature(archive: Path, into: Path) -> Any:
    import tensorflow as tf

    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(into)
    return tf.saved_model.load(str(into)).signatures["serving_default"]


def reference_outputs(signature: Any, observations: np.ndarray) -> dict[str, np.ndarray]:
    """Call the signature as RLlib does at inference and return every output as numpy."""
    import tensorflow as tf

    _, specs = signature.structured_input_signature
    batch = observations.shape[0]
    feeds = {}
    for name, spec in specs.items():
        shape = [batch if d is None else d for d in spec.shape.as_list()]
        if name == "observations":
            feeds[name] = tf.constant(observations, tf.float32)
        elif name == "seq_lens":
            feeds[name] = tf.ones(shape, spec.dtype)
        else:
            feeds[name] = tf.zeros(shape, spec.dtype)
    return {name: value.numpy() for name, value in signature(**feeds).items()}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True))
