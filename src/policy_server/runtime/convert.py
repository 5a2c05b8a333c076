"""Convert a SavedModel's forward pass to ONNX with tf2onnx, verified against TensorFlow."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from policy_server.errors import PolicyLoadError
from policy_server.extras import missing_extra
from policy_server.policy.schema import PolicySchema
from policy_server.runtime.onnx import LAYOUT_KEY, OnnxLayout, OnnxRuntime, open_session
from policy_server.runtime.quiet import quiet_frameworks
from policy_server.runtime.tensorflow import TensorFlowRuntime
from policy_server.runtime.verification import verify

logger = logging.getLogger(__name__)

OPSET = 17


def convert(
    runtime: TensorFlowRuntime,
    target: Path,
    schema: PolicySchema | None = None,
    large_batch_threads: int = 1,
) -> OnnxRuntime:
    """Write `target` (atomically) and return it loaded; PolicyLoadError if it disagrees.

    `schema` shapes the verification observations (masks, booleans, bounds); without it they
    are unconstrained random values, which a model reading an action mask cannot take.
    """
    frozen = runtime.frozen
    roles = runtime.onnx_roles()
    fed = {frozen.observations}
    if runtime.recurrence is not None:  # the model also takes its state, as TensorFlow does
        fed |= {*roles.state_in}
        fed |= {n for n in (roles.seq_lens, roles.prev_actions, roles.prev_rewards) if n}
    others = [feed.tensor for feed in frozen.feeds if feed.tensor not in fed]
    if others:
        raise PolicyLoadError(
            f"{runtime.source}: its logits read {others} besides the observations"
            + (" and its state" if runtime.recurrence else "")
            + "; an ONNX policy takes those alone"
        )
    model = _to_onnx(runtime, [frozen.observations, *sorted(fed - {frozen.observations})])
    layout = runtime.layout
    onnx_layout = OnnxLayout(
        observation_width=layout.observation_width,
        action_space=layout.action_space,
        logits_output=frozen.outputs[0],
        value_output=frozen.outputs[1] if len(frozen.outputs) > 1 else None,
        roles=roles if runtime.recurrence is not None else None,
        recurrence=runtime.recurrence,
    )
    entry = model.metadata_props.add()
    entry.key, entry.value = LAYOUT_KEY, onnx_layout.to_json()
    try:
        staging = _write_staging(model.SerializeToString(), target)
        try:
            verify(runtime, OnnxRuntime(open_session(staging), onnx_layout, staging), schema)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
    except OSError as error:
        raise PolicyLoadError(
            f"{runtime.source}: cannot write the ONNX model to {target} ({error}); "
            "check that --cache-dir is writable"
        ) from None
    return OnnxRuntime(open_session(target), onnx_layout, target, large_batch_threads)


def _to_onnx(runtime: TensorFlowRuntime, inputs: list[str]) -> Any:
    try:
        import tf2onnx
    except ImportError as error:
        raise missing_extra("onnx", "converting to ONNX", PolicyLoadError, cause=error) from None
    frozen = runtime.frozen
    with quiet_frameworks():
        try:
            model, _ = tf2onnx.convert.from_graph_def(
                frozen.graph_def,
                input_names=inputs,
                output_names=list(frozen.outputs + frozen.state_outputs),
                opset=OPSET,
            )
        except Exception as error:  # tf2onnx raises many kinds; any of them means "keep TF"
            raise PolicyLoadError(
                f"{runtime.source}: tf2onnx could not convert the model: {error}"
            ) from None
    return model


def _write_staging(data: bytes, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".onnx-", dir=target.parent)
    with os.fdopen(handle, "wb") as sink:
        sink.write(data)
    return Path(name)
