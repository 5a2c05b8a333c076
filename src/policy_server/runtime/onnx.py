"""Run a policy's forward pass (observations -> logits, value) with ONNX Runtime."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.errors import PolicyLoadError
from policy_server.runtime.base import ModelOutputs
from policy_server.spaces import ActionSpace, space_from_dict

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
    except ImportError:
        raise PolicyLoadError(
            "the ONNX runtime needs onnxruntime: pip install 'policy-server[onnx]'"
        ) from None
    return onnxruntime


def open_session(path: Path) -> Any:
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    # Policies are small: threads cost more than they give, and the HTTP side needs a core.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own, unexported exception types
        raise PolicyLoadError(f"{path}: ONNX Runtime cannot load it ({error})") from None


def stored_layout(session: Any) -> OnnxLayout | None:
    text = session.get_modelmeta().custom_metadata_map.get(LAYOUT_KEY)
    return None if text is None else OnnxLayout.from_json(text)


class OnnxRuntime:
    name = "onnx"

    def __init__(self, session: Any, layout: OnnxLayout, source: Path) -> None:
        self._session = session
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
        results = self._session.run(self._outputs, {self._input: observations})
        value = results[1].reshape(-1) if len(results) > 1 else None
        return ModelOutputs(logits=results[0], value=value)
