"""Run a policy's forward pass (observations -> logits, value) with ONNX Runtime."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.errors import PolicyLoadError
from policy_server.extras import missing_extra
from policy_server.policy.spaces import ActionSpace, space_from_dict
from policy_server.runtime.base import (
    InputRoles,
    ModelOutputs,
    Recurrence,
    StepInputs,
    TensorInfo,
    model_prev_actions,
)

LAYOUT_KEY = "policy_server.layout"


@dataclass(frozen=True)
class OnnxLayout:
    """What the server needs to know about an ONNX policy; stored in the model's metadata."""

    observation_width: int
    action_space: ActionSpace
    logits_output: str
    value_output: str | None
    # The roles of the inputs when there are several (a recurrent policy), and its state.
    roles: InputRoles | None = None
    recurrence: Recurrence | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "observation_width": self.observation_width,
                "action_space": self.action_space.describe(),
                "logits_output": self.logits_output,
                "value_output": self.value_output,
                "roles": None if self.roles is None else asdict(self.roles),
                "recurrence": None if self.recurrence is None else self.recurrence.describe(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> OnnxLayout:
        data = json.loads(text)
        roles, recurrence = data.get("roles"), data.get("recurrence")
        return cls(
            observation_width=int(data["observation_width"]),
            action_space=space_from_dict(data["action_space"]),
            logits_output=data["logits_output"],
            value_output=data.get("value_output"),
            roles=None
            if roles is None
            else InputRoles(
                observations=roles["observations"],
                state_in=tuple(roles["state_in"]),
                state_out=tuple(roles["state_out"]),
                seq_lens=roles["seq_lens"],
                prev_actions=roles["prev_actions"],
                prev_rewards=roles["prev_rewards"],
                fixed=tuple((name, int(value)) for name, value in roles["fixed"]),
            ),
            recurrence=None if recurrence is None else Recurrence.from_dict(recurrence),
        )


_ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
    "tensor(float16)": "float16",
}


def tensor_infos(values: Any) -> dict[str, TensorInfo]:
    """ONNX Runtime's inputs or outputs as the signature reader sees them: named dims and
    unknown ones are the batch (None)."""
    return {
        v.name: TensorInfo(
            shape=tuple(d if isinstance(d, int) else None for d in v.shape),
            dtype=_ONNX_TYPES.get(v.type, v.type),
        )
        for v in values
    }


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
        self.recurrence = layout.recurrence
        infos = tensor_infos(session.get_inputs())
        roles = layout.roles
        if roles is None:
            if len(infos) != 1:
                raise PolicyLoadError(
                    f"{source}: an ONNX policy takes one input (the observations), this one "
                    f"takes {sorted(infos)}; name their roles in schema.yaml's parameters.model"
                )
            roles = InputRoles(observations=next(iter(infos)))
        self._input = roles.observations
        self._roles = roles
        self._constant = {
            name: np.full(
                [1 if d is None else d for d in infos[name].shape], value, infos[name].dtype
            )
            for name, value in roles.fixed
        }
        self._prev_actions = None if roles.prev_actions is None else infos[roles.prev_actions]
        self._seq_lens_dtype = None if roles.seq_lens is None else infos[roles.seq_lens].dtype
        outputs = [o.name for o in session.get_outputs()]
        for name in (layout.logits_output, layout.value_output, *roles.state_out):
            if name is not None and name not in outputs:
                raise PolicyLoadError(f"{source}: no output {name!r}; it has {outputs}")
        self._outputs = (
            [layout.logits_output]
            + ([layout.value_output] if layout.value_output else [])
            + list(roles.state_out)
        )
        self._heads = 2 if layout.value_output else 1

    def forward(
        self, observations: npt.NDArray[np.float32], step: StepInputs | None = None
    ) -> ModelOutputs:
        large = len(observations) >= self.LARGE_BATCH
        session = self._large_session if large else self._session
        feeds: dict[str, Any] = {self._input: observations}
        if self._constant:
            feeds.update(self._constant)
        if self.recurrence is not None:
            feeds.update(self._step_feeds(step or self.recurrence.initial(len(observations))))
        results = session.run(self._outputs, feeds)
        value = results[1].reshape(-1) if self._heads > 1 else None
        state = tuple(results[self._heads :]) if self._roles.state_out else None
        return ModelOutputs(logits=results[0], value=value, state=state)

    def _step_feeds(self, step: StepInputs) -> dict[str, Any]:
        roles = self._roles
        feeds: dict[str, Any] = dict(zip(roles.state_in, step.state, strict=True))
        if roles.seq_lens is not None and self._seq_lens_dtype is not None:
            feeds[roles.seq_lens] = np.ones(len(step.prev_rewards), self._seq_lens_dtype)
        if roles.prev_actions is not None and self._prev_actions is not None:
            info = self._prev_actions
            feeds[roles.prev_actions] = model_prev_actions(
                step.prev_actions, info.shape, info.dtype
            )
        if roles.prev_rewards is not None:
            feeds[roles.prev_rewards] = step.prev_rewards
        return feeds
