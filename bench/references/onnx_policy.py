"""The work the peers (LitServe, Ray Serve) do per request, the same as policy-server's
/predict: the typed observation validated by the same pydantic model, the `access-token`
compared in constant time, one ONNX Runtime forward pass of the model policy-server converted
(`<cache-dir>/<sha256>/policy.onnx`) and an action sampled from the logits.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from pydantic import BaseModel

from policy_server.policy.observation import observation_model
from policy_server.policy.schema import load_schema
from policy_server.runtime.onnx import LAYOUT_KEY


def authorized(token: str | None, key: str) -> bool:
    return token is not None and hmac.compare_digest(token.encode(), key.encode())


def api_key(folder: Path) -> str:
    key = load_schema(folder / "schema.yaml").parameters.api_key
    assert key is not None, "the peers need parameters.api_key"
    return key


class OnnxPolicy:
    """A Discrete or MultiDiscrete policy on a one-thread ONNX Runtime session."""

    def __init__(self, folder: Path, onnx: Path) -> None:
        schema = load_schema(folder / "schema.yaml")
        model = observation_model(schema)
        assert model is not None, "the peers need a schema with observations"
        self.observation: type[BaseModel] = model
        self.names = list(model.model_fields)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(
            str(onnx), options, providers=["CPUExecutionProvider"]
        )
        layout = json.loads(self._session.get_modelmeta().custom_metadata_map[LAYOUT_KEY])
        space = layout["action_space"]
        self._sizes = [space["n"]] if space["type"] == "Discrete" else space["nvec"]
        self._input = self._session.get_inputs()[0].name
        self._outputs = [layout["logits_output"]] + (
            [layout["value_output"]] if layout["value_output"] else []
        )
        self._rng = np.random.default_rng()

    def values(self, observation: BaseModel) -> list[float]:
        row: list[float] = []
        for name in self.names:
            value = getattr(observation, name)
            row.extend(map(float, value) if isinstance(value, list) else [float(value)])
        return row

    def act(self, row: list[float]) -> dict[str, Any]:
        results = self._session.run(self._outputs, {self._input: np.array([row], np.float32)})
        logits = results[0][0].astype(np.float64)
        actions, log_prob, start = [], 0.0, 0
        for size in self._sizes:
            block = logits[start : start + size]
            start += size
            shifted = block - block.max()
            log_probs = shifted - np.log(np.exp(shifted).sum())
            action = int(self._rng.choice(size, p=np.exp(log_probs)))
            actions.append(action)
            log_prob += float(log_probs[action])
        value = float(results[1].reshape(-1)[0]) if len(results) > 1 else None
        return {
            "actions": actions,
            "probability": float(np.exp(log_prob)),
            "log_probability": log_prob,
            "value": value,
        }
