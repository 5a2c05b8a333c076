"""What every runtime provides, and how an RLlib export's signature maps to an action space."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from policy_server.errors import PolicyLoadError
from policy_server.policy.schema import ModelRoles, Parameters
from policy_server.policy.spaces import ActionSpace, Box, Discrete, MultiDiscrete, action_width

logger = logging.getLogger(__name__)

LOGITS_OUTPUTS = ("action_dist_inputs", "behaviour_logits", "fc_out")
VALUE_OUTPUTS = ("vf_preds", "value_out")
# Outputs a recurrent export has besides its state: never a state output.
KNOWN_OUTPUTS = {*LOGITS_OUTPUTS, *VALUE_OUTPUTS, "action_prob", "action_logp"}
_ACTION_OUTPUT = re.compile(r"^actions(?:_(\d+))?$")
# RLlib's state inputs, and the unnamed placeholders older exports have instead (nativerl#266).
_STATE_INPUT = re.compile(r"^(?:state_in_\d+|Placeholder(?:_\d+)?)$")
# Inputs fed RLlib's inference value: not learned from, constant for serving.
FIXED_INPUTS = {"is_training": 0, "timestep": 0, "is_exploring": 0}


@dataclass(frozen=True)
class StepInputs:
    """What a recurrent policy reads besides the observations, one row per observation:
    each state tensor (batch, size), the previous actions (batch, action width) as the
    answers give them, and the previous rewards (batch,)."""

    state: tuple[npt.NDArray[np.float32], ...]
    prev_actions: npt.NDArray[np.float32]
    prev_rewards: npt.NDArray[np.float32]

    @staticmethod
    def concatenate(parts: list[StepInputs]) -> StepInputs:
        if len(parts) == 1:
            return parts[0]
        return StepInputs(
            tuple(np.concatenate(states) for states in zip(*(p.state for p in parts), strict=True)),
            np.concatenate([p.prev_actions for p in parts]),
            np.concatenate([p.prev_rewards for p in parts]),
        )


@dataclass(frozen=True)
class ModelOutputs:
    """One forward pass over a batch: logits (batch, width), value estimates (batch,) and,
    for a recurrent policy, the state after this step (one (batch, size) array each)."""

    logits: npt.NDArray[np.float32]
    value: npt.NDArray[np.float32] | None
    state: tuple[npt.NDArray[np.float32], ...] | None = None

    def rows(self, start: int, end: int) -> ModelOutputs:
        return ModelOutputs(
            self.logits[start:end],
            None if self.value is None else self.value[start:end],
            None if self.state is None else tuple(s[start:end] for s in self.state),
        )


@dataclass(frozen=True)
class Recurrence:
    """What a recurrent policy carries from one step to the next: its state tensors (their
    sizes, in the order the outputs feed the inputs) and whether it reads the previous
    action and reward."""

    state_sizes: tuple[int, ...]
    action_width: int
    reads_prev_action: bool
    reads_prev_reward: bool

    @property
    def state_width(self) -> int:
        return sum(self.state_sizes)

    def initial(self, batch: int) -> StepInputs:
        """RLlib's first step: zero state, previous action and reward."""
        return StepInputs(
            tuple(np.zeros((batch, size), np.float32) for size in self.state_sizes),
            np.zeros((batch, self.action_width), np.float32),
            np.zeros(batch, np.float32),
        )

    def describe(self) -> dict[str, object]:
        return {
            "state_sizes": list(self.state_sizes),
            "action_width": self.action_width,
            "reads_prev_action": self.reads_prev_action,
            "reads_prev_reward": self.reads_prev_reward,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Recurrence:
        sizes = data["state_sizes"]
        assert isinstance(sizes, list)
        return cls(
            tuple(int(size) for size in sizes),
            int(str(data["action_width"])),
            bool(data["reads_prev_action"]),
            bool(data["reads_prev_reward"]),
        )


class PolicyRuntime(Protocol):
    """A loaded network. `forward` takes float32 observations of shape (batch, width) and,
    for a recurrent policy (`recurrence` not None), what it reads besides them."""

    name: str
    observation_width: int
    action_space: ActionSpace
    recurrence: Recurrence | None

    def forward(
        self, observations: npt.NDArray[np.float32], step: StepInputs | None = None
    ) -> ModelOutputs: ...


@dataclass(frozen=True)
class InputRoles:
    """Which of a model's inputs and outputs plays which role, by the model's own names
    (signature keys for a SavedModel, input and output names for ONNX)."""

    observations: str
    state_in: tuple[str, ...] = ()
    state_out: tuple[str, ...] = ()
    seq_lens: str | None = None
    prev_actions: str | None = None
    prev_rewards: str | None = None
    # Inputs fed a constant (is_training, timestep), with it.
    fixed: tuple[tuple[str, int], ...] = ()

    @property
    def recurrent(self) -> bool:
        return bool(self.state_in)


def _base_name(name: str) -> str:
    """`default_policy/state_in_0:0` -> `state_in_0`."""
    return name.split(":", 1)[0].rsplit("/", 1)[-1]


def read_roles(
    inputs: Mapping[str, TensorInfo],
    outputs: Mapping[str, TensorInfo],
    roles: ModelRoles,
    source: str,
    tensors: Mapping[str, str] | None = None,
    output_tensors: Mapping[str, str] | None = None,
) -> InputRoles:
    """Every input's role, from `parameters.model` (by input name or, for a SavedModel, its
    tensor name) or from RLlib's names; an input of no known role is refused in one line
    that shows the `model:` entry to add. The state outputs pair with the state inputs in
    order: the ones `model.state_out` names, else those of no other known role."""
    tensors = tensors or {}
    found: dict[str, str] = {}  # role -> input name
    state_in: list[str] = []
    fixed: list[tuple[str, int]] = []
    named = {
        role: getattr(roles, role)
        for role in ("observations", "seq_lens", "prev_actions", "prev_rewards")
        if getattr(roles, role)
    }
    for name in sorted(inputs, key=_natural):
        aliases = {name, tensors.get(name, name)}
        role = next((r for r, n in named.items() if n in aliases), None)
        if role is None and aliases & set(roles.state_in):
            continue  # ordered below, as model.state_in lists them
        base = _base_name(tensors.get(name, name))
        key = _base_name(name)
        if role is None:
            role = _role_by_name(key) or _role_by_name(base)
        if role == "state_in":
            state_in.append(name)
        elif role == "fixed":
            fixed.append((name, FIXED_INPUTS.get(key, FIXED_INPUTS.get(base, 0))))
        elif role is not None:
            found.setdefault(role, name)
        elif len(inputs) == 1:
            found["observations"] = name  # a single input can only be the observations
        else:
            raise PolicyLoadError(_unknown_input(source, name, tensors.get(name, name)))
    if roles.state_in:
        by_alias = {alias: n for n in inputs for alias in (n, tensors.get(n, n))}
        missing = [n for n in roles.state_in if n not in by_alias]
        if missing:
            raise PolicyLoadError(
                f"{source}: parameters.model.state_in names {missing}, which the model "
                f"does not take; its inputs are {sorted(inputs)}"
            )
        state_in = [by_alias[n] for n in roles.state_in]
    if "observations" not in found:
        raise PolicyLoadError(
            f"{source}: no observations input; it has inputs {sorted(inputs)}; name it in "
            "schema.yaml as parameters.model.observations"
        )
    state_out = _state_outputs(outputs, roles, state_in, inputs, source, output_tensors or {})
    return InputRoles(
        observations=found["observations"],
        state_in=tuple(state_in),
        state_out=state_out,
        seq_lens=found.get("seq_lens"),
        prev_actions=found.get("prev_actions"),
        prev_rewards=found.get("prev_rewards"),
        fixed=tuple(fixed),
    )


def _role_by_name(name: str) -> str | None:
    if name in ("observations", "obs"):
        return "observations"
    if name in ("prev_action", "prev_actions"):
        return "prev_actions"
    if name in ("prev_reward", "prev_rewards"):
        return "prev_rewards"
    if name == "seq_lens":
        return "seq_lens"
    if name in FIXED_INPUTS:
        return "fixed"
    if _STATE_INPUT.match(name):
        return "state_in"
    return None


def _unknown_input(source: str, name: str, tensor: str) -> str:
    return (
        f"{source}: the model's input {name!r} has no known role (observations, state_in, "
        "seq_lens, prev_actions, prev_rewards, is_training, timestep); name it in "
        f"schema.yaml, e.g. parameters: {{model: {{state_in: [{tensor!r}, ...], "
        "state_out: [...]}}}} or model: {prev_actions: ...}"
    )


def _state_outputs(
    outputs: Mapping[str, TensorInfo],
    roles: ModelRoles,
    state_in: list[str],
    inputs: Mapping[str, TensorInfo],
    source: str,
    output_tensors: Mapping[str, str],
) -> tuple[str, ...]:
    if not state_in:
        return ()
    if roles.state_out:
        by_alias = {alias: n for n in outputs for alias in (n, output_tensors.get(n, n))}
        missing = [n for n in roles.state_out if n not in by_alias]
        if missing:
            raise PolicyLoadError(
                f"{source}: parameters.model.state_out names {missing}, which the model "
                f"does not give; its outputs are {sorted(outputs)}"
            )
        chosen = [by_alias[n] for n in roles.state_out]
    else:
        named = {roles.logits, roles.value}
        chosen = sorted(
            (
                n
                for n, info in outputs.items()
                if n not in KNOWN_OUTPUTS
                and not _ACTION_OUTPUT.match(n)
                and n not in named
                and output_tensors.get(n, n) not in named
                and len(info.shape) == 2
                and info.dtype.startswith("float")
            ),
            key=_natural,
        )
    sizes_in = [inputs[n].shape[-1] for n in state_in]
    sizes_out = [outputs[n].shape[-1] for n in chosen]
    if len(chosen) != len(state_in) or any(
        a is not None and b is not None and a != b
        for a, b in zip(sizes_in, sizes_out, strict=False)
    ):
        raise PolicyLoadError(
            f"{source}: the state inputs {state_in} (sizes {sizes_in}) do not pair with the "
            f"state outputs {chosen} (sizes {sizes_out}); name them in schema.yaml as "
            "parameters.model.state_in and state_out, in the order the outputs feed the inputs"
        )
    return tuple(chosen)


def recurrence_of(
    roles: InputRoles, inputs: Mapping[str, TensorInfo], space: ActionSpace, source: str
) -> Recurrence | None:
    if not roles.recurrent:
        return None
    sizes = []
    for name in roles.state_in:
        shape = inputs[name].shape
        if len(shape) != 2 or shape[1] is None:
            raise PolicyLoadError(
                f"{source}: the state input {name!r} has shape {shape}; a state input is "
                "(batch, size)"
            )
        sizes.append(shape[1])
    return Recurrence(
        tuple(sizes),
        action_width(space),
        roles.prev_actions is not None,
        roles.prev_rewards is not None,
    )


def model_prev_actions(
    prev: npt.NDArray[np.float32], shape: tuple[int | None, ...], dtype: str
) -> npt.NDArray[Any]:
    """The previous actions (batch, action width) as the model's input takes them: (batch,)
    for one component, else (batch, width), in the input's dtype."""
    values = prev[:, 0] if len(shape) == 1 else prev
    return values.astype(dtype)


def _natural(name: str) -> tuple[object, ...]:
    """Exit_3 before Exit_10, state_in_2 before state_in_10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


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
    roles: InputRoles
    recurrence: Recurrence | None = None


def read_layout(
    inputs: Mapping[str, TensorInfo],
    outputs: Mapping[str, TensorInfo],
    split_sizes: tuple[int, ...] | None,
    parameters: Parameters,
    source: str,
    tensors: Mapping[str, str] | None = None,
    output_tensors: Mapping[str, str] | None = None,
) -> SignatureLayout:
    """Derive the observation width and action space from the model, not from schema.yaml."""
    roles = read_roles(inputs, outputs, parameters.model, source, tensors, output_tensors)
    observations = inputs[roles.observations]
    if len(observations.shape) != 2 or observations.shape[1] is None:
        raise PolicyLoadError(
            f"{source}: the serving_default signature needs an input 'observations' of shape "
            f"(batch, width); it has inputs {sorted(inputs)}"
        )
    logits_name = _named_output(outputs, parameters.logits_name, output_tensors) or next(
        (name for name in LOGITS_OUTPUTS if name in outputs), None
    )
    if logits_name is None:
        raise PolicyLoadError(
            f"{source}: no logits output; expected one of {list(LOGITS_OUTPUTS)}, "
            f"the signature has {sorted(outputs)}; name it in schema.yaml as "
            "parameters.model.logits"
        )
    width = outputs[logits_name].shape[-1]
    if width is None:
        raise PolicyLoadError(f"{source}: the logits output {logits_name!r} has no fixed width")
    value_name = _named_output(outputs, parameters.value_name, output_tensors) or next(
        (name for name in VALUE_OUTPUTS if name in outputs), None
    )
    if any(_ACTION_OUTPUT.match(name) for name in outputs):
        action_names = _action_outputs(outputs, source)
        space = _action_space([outputs[name] for name in action_names], width, split_sizes, source)
        _compare_with_parameters(space, parameters, source)
    else:
        # A Keras model (TF2 `export_model`: fc_out, value_out) samples nothing itself.
        action_names = ()
        space = _space_without_actions(parameters, width, split_sizes, source)
    return SignatureLayout(
        observation_width=observations.shape[1],
        logits_output=logits_name,
        value_output=value_name,
        action_outputs=action_names,
        action_space=space,
        roles=roles,
        recurrence=recurrence_of(roles, inputs, space, source),
    )


def _named_output(
    outputs: Mapping[str, TensorInfo], name: str | None, tensors: Mapping[str, str] | None
) -> str | None:
    if name is None:
        return None
    for key in outputs:
        if name in (key, (tensors or {}).get(key)):
            return key
    raise PolicyLoadError(f"no output {name!r} (named in schema.yaml); it has {sorted(outputs)}")


def _space_without_actions(
    parameters: Parameters, width: int, split_sizes: tuple[int, ...] | None, source: str
) -> ActionSpace:
    """The action space of a model without action outputs: schema.yaml's `action_space`,
    else read from the logits as its `discrete` and `tuple` say (Discrete by default)."""
    if parameters.action_space is not None:
        if parameters.action_space.logits_width != width:
            raise PolicyLoadError(
                f"{source}: parameters.action_space {parameters.action_space.describe()} "
                f"needs {parameters.action_space.logits_width} logits; the model has {width}"
            )
        return parameters.action_space
    if not parameters.discrete:
        if width % 2:
            raise PolicyLoadError(
                f"{source}: continuous actions need an even logits width, got {width}"
            )
        return Box(width // 2)
    if parameters.tuple and split_sizes and sum(split_sizes) == width:
        return MultiDiscrete(split_sizes)
    return Discrete(width)


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
