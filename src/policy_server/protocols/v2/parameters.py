"""The request parameters the Open Inference Protocol data plane reads.

Values arrive as JSON values (REST) or as one field of gRPC's `InferParameter`; the real
clients differ (`tritonclient.grpc` sends every integer as `int64_param`, the KServe gRPC
client cannot send a float at all), so an id may be a string or any integer and `reward`
a double or an integer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from policy_server.protocols.v2.tensors import InvalidTensor

SEED_MAX = 2**63 - 1
MAX_EPISODE_ID = 128
# Parameters the clients send on their own, which mean nothing here.
_IGNORED = {"binary_data_output", "priority", "timeout", "headers"}


@dataclass(frozen=True)
class Options:
    deterministic: bool = False
    seed: int | None = None
    episode_id: str | None = None
    step: int | None = None
    sequence_start: bool = False
    sequence_end: bool = False
    reward: float | None = None


def read_options(parameters: dict[str, Any]) -> Options:
    known = {
        "deterministic",
        "seed",
        "episode_id",
        "sequence_id",
        "step",
        "sequence_start",
        "sequence_end",
        "reward",
    }
    unknown = sorted(set(parameters) - known - _IGNORED)
    if unknown:
        raise InvalidTensor(f"unknown parameter(s) {unknown}; this server reads {sorted(known)}")
    if "episode_id" in parameters and "sequence_id" in parameters:
        raise InvalidTensor("give 'episode_id' or 'sequence_id', not both")
    return Options(
        deterministic=_bool(parameters, "deterministic"),
        seed=_integer(parameters, "seed", 0, SEED_MAX),
        episode_id=_episode_id(parameters),
        step=_integer(parameters, "step", 0, 2**53 - 1),
        sequence_start=_bool(parameters, "sequence_start"),
        sequence_end=_bool(parameters, "sequence_end"),
        reward=_reward(parameters),
    )


def _bool(parameters: dict[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidTensor(f"parameter '{name}' must be a bool, got {value!r}")
    return value


def _integer(parameters: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = parameters.get(name)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise InvalidTensor(f"parameter '{name}' must be an integer from {low} to {high}")
    return value


def _episode_id(parameters: dict[str, Any]) -> str | None:
    name = "episode_id" if "episode_id" in parameters else "sequence_id"
    value = parameters.get(name)
    if value is None:
        return None
    if type(value) is int:
        if value < 0 or value >= 2**64:
            raise InvalidTensor(f"parameter '{name}' must be an unsigned 64-bit integer")
        # Triton's convention: sequence id 0 is no sequence.
        return None if value == 0 else str(value)
    if not isinstance(value, str) or len(value) > MAX_EPISODE_ID:
        raise InvalidTensor(
            f"parameter '{name}' must be a string of at most {MAX_EPISODE_ID} characters "
            "or an integer"
        )
    return value or None


def _reward(parameters: dict[str, Any]) -> float | None:
    value = parameters.get("reward")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidTensor("parameter 'reward' must be a finite number")
    if abs(value) == float("inf"):
        raise InvalidTensor("parameter 'reward' must be a finite number")
    return float(value)
