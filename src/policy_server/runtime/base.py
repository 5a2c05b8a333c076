"""What every runtime provides, and how an RLlib export's signature maps to an action space."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from policy_server.errors import PolicyLoadError
from policy_server.policy.schema import Parameters
from policy_server.policy.spaces import ActionSpace, Box, Discrete, MultiDiscrete

logger = logging.getLogger(__name__)

LOGITS_OUTPUTS = ("action_dist_inputs", "behaviour_logits")
VALUE_OUTPUT = "vf_preds"
_ACTION_OUTPUT = re.compile(r"^actions(?:_(\d+))?$")


@dataclass(frozen=True)
class ModelOutputs:
    """One forward pass over a batch: logits (batch, width) and value estimates (batch,)."""

    logits: npt.NDArray[np.float32]
    value: npt.NDArray[np.float32] | None


class PolicyRuntime(Protocol):
    """A loaded network. `forward` takes float32 observations of shape (batch, width)."""

    name: str
    observation_width: int
    action_space: ActionSpace

    def forward(self, observations: npt.NDArray[np.float32]) -> ModelOutputs: ...


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True)
class SignatureLayout:
    """Where an RLlib export keeps what we need, read from its `serving_default` signature."""

    observation_width: int
    logits_output: str
    value_output: str | None
    action_outputs: tuple[str, ...]
    action_space: ActionSpace


def read_layout(
    inputs: Mapping[str, TensorInfo],
    outputs: Mapping[str, TensorInfo],
    split_sizes: tuple[int, ...] | None,
    parameters: Parameters,
    source: str,
) -> SignatureLayout:
    """Derive the observation width and action space from the model, not from schema.yaml."""
    observations = inputs.get("observations")
    if observations is None or len(observations.shape) != 2 or observations.shape[1] is None:
        raise PolicyLoadError(
            f"{source}: the serving_default signature needs an input 'observations' of shape "
            f"(batch, width); it has inputs {sorted(inputs)}"
        )
    logits_name = next((name for name in LOGITS_OUTPUTS if name in outputs), None)
    if logits_name is None:
        raise PolicyLoadError(
            f"{source}: no logits output; expected one of {list(LOGITS_OUTPUTS)}, "
            f"the signature has {sorted(outputs)}"
        )
    width = outputs[logits_name].shape[-1]
    if width is None:
        raise PolicyLoadError(f"{source}: the logits output {logits_name!r} has no fixed width")
    action_names = _action_outputs(outputs, source)
    space = _action_space([outputs[name] for name in action_names], width, split_sizes, source)
    _compare_with_parameters(space, parameters, source)
    return SignatureLayout(
        observation_width=observations.shape[1],
        logits_output=logits_name,
        value_output=VALUE_OUTPUT if VALUE_OUTPUT in outputs else None,
        action_outputs=action_names,
        action_space=space,
    )


def _action_outputs(outputs: Mapping[str, TensorInfo], source: str) -> tuple[str, ...]:
    found = []
    for name in outputs:
        match = _ACTION_OUTPUT.match(name)
        if match:
            found.append((int(match.group(1) or 0), name))
    if not found:
        raise PolicyLoadError(
            f"{source}: no action output ('actions' or 'actions_0..N'); "
            f"the signature has {sorted(outputs)}"
        )
    return tuple(name for _, name in sorted(found))


def _action_space(
    actions: list[TensorInfo], width: int, split_sizes: tuple[int, ...] | None, source: str
) -> ActionSpace:
    if any(info.dtype.startswith("float") for info in actions):
        if width % 2:
            raise PolicyLoadError(
                f"{source}: continuous actions need an even logits width (means and "
                f"log-stds), got {width}"
            )
        return Box(width // 2)
    components = len(actions)
    if components == 1 and len(actions[0].shape) == 2 and (actions[0].shape[1] or 1) > 1:
        components = actions[0].shape[1] or 1
    if components == 1:
        return Discrete(width)
    if split_sizes and len(split_sizes) == components and sum(split_sizes) == width:
        return MultiDiscrete(split_sizes)
    if width % components == 0:
        logger.warning(
            "%s: no split of the logits found in the graph; assuming %d equal components of %d",
            source,
            components,
            width // components,
        )
        return MultiDiscrete((width // components,) * components)
    raise PolicyLoadError(
        f"{source}: cannot split {width} logits into {components} action components"
    )


def _compare_with_parameters(space: ActionSpace, parameters: Parameters, source: str) -> None:
    discrete = not isinstance(space, Box)
    is_tuple = isinstance(space, MultiDiscrete)
    if parameters.discrete != discrete or parameters.tuple != is_tuple:
        logger.warning(
            "%s: schema.yaml says discrete=%s, tuple=%s but the model has %s; trusting the model",
            source,
            parameters.discrete,
            parameters.tuple,
            space.describe(),
        )
