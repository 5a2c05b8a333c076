"""Run a policy's forward pass (observations -> logits, value) with ONNX Runtime."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.errors import PolicyLoadError
from policy_server.extras import missing_extra
from policy_server.policy.spaces import ActionSpace, space_from_dict
from policy_server.runtime.base import ModelOutputs

LAYOUT_KEY = "policy_server.layout"


@dataclass(frozen=True)
class OnnxLayout:
    """What the server needs to know about an ONNX policy; stored in the model's metadata."""

    observation_width: int
    action_space: ActionSpace
    logits_output: str
    value_output: str | None

    def to_json(self) -> str:
        return json.dumps(
            {
                "observation_width": self.observation_width,
                "action_space": self.action_space.describe(),
                "logits_output": self.logits_output,
                "value_output": self.value_output,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> OnnxLayout:
        data = json.loads(text)
        return cls(
            observation_width=int(data["observation_width"]),
            action_space=space_from_dict(data["action_space"]),
            logits_output=data["logits_output"],
            value_output=data.get("value_output"),
        )


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise missing_extra("onnx", "the ONNX runtime", PolicyLoadError, cause=error) from None
    return onnxruntime


def open_session(path: Path, threads: int = 1) -> Any:
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle pool threads must not spin: the event loop shares the cores with them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own, unexported exception types
        raise PolicyLoadError(f"{path}: ONNX Runtime cannot load it ({error})") from None


def stored_layout(session: Any) -> OnnxLayout | None:
    text = session.get_modelmeta().custom_metadata_map.get(LAYOUT_KEY)
    return None if text is None else OnnxLayout.from_json(text)


class OnnxRuntime:
    """Small batches (single requests, micro-batches) run on one thread, where a thread pool
    costs more than it gives; large ones (batch requests) on `large_batch_threads`: every
    core for a single process, one for a worker of `serve --workers`."""

    name = "onnx"
    LARGE_BATCH = 256

    def __init__(
        self, session: Any, layout: OnnxLayout, source: Path, large_batch_threads: int = 1
    ) -> None:
        self._session = session
        self._large_session = (
            session
            if large_batch_threads == 1
            else open_session(source, threads=large_batch_threads)
        )
        self.layout = layout
        self.source = source
        self.observation_width = layout.observation_width
        self.action_space = layout.action_space
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise PolicyLoadError(
                f"{source}: an ONNX policy takes one input (the observations), this one takes "
                f"{[i.name for i in inputs]}"
            )
        self._input = inputs[0].name
        outputs = [o.name for o in session.get_outputs()]
        for name in (layout.logits_output, layout.value_output):
            if name is not None and name not in outputs:
                raise PolicyLoadError(f"{source}: no output {name!r}; it has {outputs}")
        self._outputs = [layout.logits_output] + (
            [layout.value_output] if layout.value_output else []
        )

    def forward(self, observations: npt.NDArray[np.float32]) -> ModelOutputs:
        large = len(observations) >= self.LARGE_BATCH
        session = self._large_session if large else self._session
        results = session.run(self._outputs, {self._input: observations})
        value = results[1].reshape(-1) if len(results) > 1 else None
        return ModelOutputs(logits=results[0], value=value)
