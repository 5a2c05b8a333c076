"""Convert a SavedModel's forward pass to ONNX with tf2onnx, verified against TensorFlow."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from policy_server.distribution import distribution_for
from policy_server.errors import PolicyLoadError
from policy_server.runtime.onnx import LAYOUT_KEY, OnnxLayout, OnnxRuntime, open_session
from policy_server.runtime.tensorflow import TensorFlowRuntime

logger = logging.getLogger(__name__)

OPSET = 17
VERIFY_ROWS = 256
LOGITS_ATOL = 1e-4


def convert(runtime: TensorFlowRuntime, target: Path) -> OnnxRuntime:
    """Write `target` (atomically) and return it loaded; PolicyLoadError if it disagrees."""
    try:
        import tf2onnx
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )
    except ImportError:
        raise PolicyLoadError(
            "converting to ONNX needs tf2onnx: pip install 'policy-server[onnx]'"
        ) from None
    function = runtime.function
    frozen = convert_variables_to_constants_v2(function)
    _, input_specs = function.structured_input_signature
    # A signature's tensors are flattened in sorted key order, inputs and outputs alike.
    inputs = dict(zip(sorted(input_specs), frozen.inputs, strict=False))
    outputs = dict(zip(sorted(function.structured_outputs), frozen.outputs, strict=True))
    layout = runtime.layout
    wanted = [outputs[layout.logits_output].name]
    if layout.value_output:
        wanted.append(outputs[layout.value_output].name)
    try:
        model, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(),
            input_names=[inputs["observations"].name],
            output_names=wanted,
            opset=OPSET,
        )
    except Exception as error:  # tf2onnx raises many kinds; any of them means "keep TF"
        raise PolicyLoadError(f"tf2onnx could not convert the model: {error}") from error
    onnx_layout = OnnxLayout(
        observation_width=layout.observation_width,
        action_space=layout.action_space,
        logits_output=wanted[0],
        value_output=wanted[1] if len(wanted) > 1 else None,
    )
    entry = model.metadata_props.add()
    entry.key, entry.value = LAYOUT_KEY, onnx_layout.to_json()
    staging = _write_staging(model.SerializeToString(), target)
    try:
        verify(runtime, OnnxRuntime(open_session(staging), onnx_layout, staging))
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return OnnxRuntime(open_session(target), onnx_layout, target)


def _write_staging(data: bytes, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".onnx-", dir=target.parent)
    with os.fdopen(handle, "wb") as sink:
        sink.write(data)
    return Path(name)


def verify(reference: TensorFlowRuntime, candidate: OnnxRuntime) -> None:
    """Both runtimes on the same random observations: logits within 1e-4, same argmax."""
    rng = np.random.default_rng(0)
    width = reference.observation_width
    observations = np.concatenate(
        [
            rng.normal(size=(VERIFY_ROWS // 2, width)),
            rng.uniform(-10, 10, (VERIFY_ROWS // 2, width)),
        ]
    ).astype(np.float32)
    expected, got = reference.forward(observations), candidate.forward(observations)
    if not np.allclose(got.logits, expected.logits, rtol=1e-5, atol=LOGITS_ATOL):
        worst = float(np.abs(got.logits - expected.logits).max())
        raise PolicyLoadError(f"ONNX logits differ from TensorFlow's by up to {worst:.3g}")
    distribution = distribution_for(reference.action_space)
    if not np.array_equal(
        distribution.mode(got.logits).values, distribution.mode(expected.logits).values
    ):
        raise PolicyLoadError("ONNX and TensorFlow disagree on the most likely action")
    if (expected.value is None) != (got.value is None) or (
        expected.value is not None
        and got.value is not None
        and not np.allclose(got.value, expected.value, rtol=1e-3, atol=1e-3)
    ):
        raise PolicyLoadError("ONNX value estimates differ from TensorFlow's")
