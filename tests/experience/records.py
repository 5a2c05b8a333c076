"""Decision records built exactly as the server's contract says, from a real distribution."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from policy_server.experience.records import Decision
from policy_server.serving.service import DecisionIds

new_ids = DecisionIds()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True))


def decision(
    obs: np.ndarray,
    logits: np.ndarray,
    rng: np.random.Generator,
    *,
    policy: str = "bandit",
    version: str = "v1",
    episode_id: str | None = None,
    step: int | None = None,
    sampled: bool = True,
    value: float | None = None,
    mask: list[int] | None = None,
) -> Decision:
    """One Discrete decision: the action sampled (or the mode) from softmax(logits)."""
    masked = logits if mask is None else np.where(np.array(mask) > 0, logits, -np.inf)
    probabilities = softmax(masked)
    action = (
        int(rng.choice(len(probabilities), p=probabilities))
        if sampled
        else int(probabilities.argmax())
    )
    probability = float(probabilities[action])
    return {
        "type": "decision",
        "time": time.time(),
        "decision_id": new_ids.take(1)[0],
        "policy": policy,
        "version": version,
        "episode_id": episode_id,
        "step": step,
        "obs": [float(x) for x in obs],
        "action_mask": None if mask is None else [list(mask)],
        "actions": [action],
        "probability": probability,
        "log_probability": float(np.log(probability)),
        "sampled": sampled,
        "distribution": {"probabilities": [probabilities.tolist()]},
        "logits": [float(x) for x in logits],
        "value": value,
        "shadow": None,
        "worker": "0",
        "allocation": None,
    }


def simple(index: int = 0, **overrides: Any) -> Decision:
    """A decision whose content does not matter, only that it is well-formed."""
    rng = np.random.default_rng(index)
    record = decision(rng.normal(size=3), rng.normal(size=4), rng)
    record.update(overrides)  # type: ignore[typeddict-item]
    return record
