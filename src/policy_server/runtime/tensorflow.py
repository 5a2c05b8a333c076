"""Run an RLlib SavedModel's `serving_default` signature with TensorFlow."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.errors import PolicyLoadError
from policy_server.runtime.base import ModelOutputs, SignatureLayout, TensorInfo, read_layout
from policy_server.schema import Parameters

logger = logging.getLogger(__name__)


def import_tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise PolicyLoadError(
            "serving a SavedModel needs TensorFlow: pip install 'policy-server[tensorflow]'"
        ) from None
    return tf


class TensorFlowRuntime:
    name = "tensorflow"

    def __init__(self, model_dir: Path, parameters: Parameters) -> None:
        tf = import_tensorflow()
        self._tf = tf
        try:
            loaded = tf.saved_model.load(str(model_dir))
            function = loaded.signatures["serving_default"]
        except (OSError, ValueError, KeyError) as error:
            raise PolicyLoadError(
                f"{model_dir}: not a SavedModel with a serving_default signature ({error})"
            ) from None
        self._loaded = loaded  # keeps the variables the signature reads alive
        self.function = function
        _, input_specs = function.structured_input_signature
        inputs = {name: _info(spec) for name, spec in input_specs.items()}
        outputs = {name: _info(spec) for name, spec in function.structured_outputs.items()}
        self.layout: SignatureLayout = read_layout(
            inputs, outputs, _split_sizes(function.graph, tf), parameters, str(model_dir)
        )
        self.observation_width = self.layout.observation_width
        self.action_space = self.layout.action_space
        self._extra_specs = {
            name: spec for name, spec in input_specs.items() if name != "observations"
        }
        self._feeds_by_batch: dict[int, dict[str, Any]] = {}

    def forward(self, observations: npt.NDArray[np.float32]) -> ModelOutputs:
        feeds = self._extra_feeds(observations.shape[0])
        result = self.function(observations=self._tf.constant(observations), **feeds)
        value = result.get(self.layout.value_output) if self.layout.value_output else None
        return ModelOutputs(
            logits=result[self.layout.logits_output].numpy(),
            value=None if value is None else value.numpy().reshape(-1),
        )

    def _extra_feeds(self, batch: int) -> dict[str, Any]:
        feeds = self._feeds_by_batch.get(batch)
        if feeds is None:
            feeds = {
                name: self._neutral(name, spec, batch) for name, spec in self._extra_specs.items()
            }
            if len(self._feeds_by_batch) < 256:
                self._feeds_by_batch[batch] = feeds
        return feeds

    def _neutral(self, name: str, spec: Any, batch: int) -> Any:
        """The value RLlib feeds at inference: zeros, one step per sequence, no training."""
        shape = [batch if dim is None else dim for dim in spec.shape.as_list()]
        if name == "seq_lens":
            return self._tf.ones(shape, dtype=spec.dtype)
        return self._tf.zeros(shape, dtype=spec.dtype)


def _info(spec: Any) -> TensorInfo:
    return TensorInfo(shape=tuple(spec.shape.as_list()), dtype=spec.dtype.name)


def _split_sizes(graph: Any, tf: Any) -> tuple[int, ...] | None:
    """RLlib's MultiCategorical splits its logits with a constant SplitV; read its sizes."""
    for operation in graph.get_operations():
        if operation.type != "SplitV":
            continue
        sizes = operation.inputs[1]
        if sizes.op.type == "Const":
            values = tf.make_ndarray(sizes.op.get_attr("value"))
            return tuple(int(v) for v in np.atleast_1d(values))
    return None
