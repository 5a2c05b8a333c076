"""Run an RLlib SavedModel's forward pass (observations -> logits, value) with TensorFlow.

The `serving_default` signature says where the logits and the value estimate are; only the
subgraph computing them is kept, with the variables folded into constants. The graph's own
action sampling therefore never runs (a mask leaving no legal action makes it fail), TF1
exports whose sampling reads a placeholder the signature does not take (RLlib's `timestep`)
still load, and tf2onnx converts exactly the graph that TensorFlow runs.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.errors import PolicyLoadError
from policy_server.extras import missing_extra
from policy_server.policy.schema import Parameters
from policy_server.runtime.base import (
    InputRoles,
    ModelOutputs,
    Recurrence,
    SignatureLayout,
    StepInputs,
    TensorInfo,
    model_prev_actions,
    read_layout,
)
from policy_server.runtime.quiet import (
    native_notices_dropped,
    quiet_framework_loggers,
    quiet_frameworks,
)
from policy_server.runtime.saved_model import find_saved_model

logger = logging.getLogger(__name__)

SIGNATURE = "serving_default"
_SAMPLING_OUTPUT = re.compile(r"^(?:actions(?:_\d+)?|action_prob|action_logp)$")
_MAX_CACHED_BATCHES = 256


def import_tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:
        try:
            with native_notices_dropped():
                importlib.import_module("tensorflow")
        except ImportError as error:
            what = "serving a SavedModel"
            raise missing_extra("tensorflow", what, PolicyLoadError, cause=error) from None
    quiet_framework_loggers()
    return sys.modules["tensorflow"]


@dataclass(frozen=True)
class Feed:
    """A placeholder besides the observations that the forward pass reads, with its shape
    (None for the batch) and the value RLlib feeds at inference."""

    tensor: str
    shape: tuple[int | None, ...]
    dtype: str
    fill: int


@dataclass(frozen=True)
class FrozenForward:
    """The forward pass alone, variables folded into constants: what runs and what converts.

    `outputs` names the logits tensor, then the value tensor if the model has one;
    `state_outputs` the state after the step of a recurrent policy, fetched after them.
    """

    graph_def: Any
    observations: str
    outputs: tuple[str, ...]
    feeds: tuple[Feed, ...]
    state_outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class _StepTensors:
    """The graph tensors a recurrent policy's step feeds, by role."""

    state: tuple[str, ...]
    seq_lens: str | None
    prev_actions: Feed | None
    prev_rewards: str | None


@dataclass(frozen=True)
class _Signature:
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    input_tensors: dict[str, str]
    output_tensors: dict[str, str]
    graph_def: Any
    split_sizes: tuple[int, ...] | None


class TensorFlowRuntime:
    """`model_dir` is the SavedModel or a folder holding it one or two levels down; `source`
    names the policy in messages (default: the SavedModel's folder)."""

    name = "tensorflow"

    def __init__(self, model_dir: Path, parameters: Parameters, source: str | None = None) -> None:
        tf = import_tensorflow()
        root = find_saved_model(model_dir, source)
        self.source = source or str(root)
        with quiet_frameworks():
            signature = _load_signature(tf, root, self.source)
            self.layout: SignatureLayout = read_layout(
                signature.inputs,
                signature.outputs,
                signature.split_sizes,
                parameters,
                self.source,
                signature.input_tensors,
                signature.output_tensors,
            )
            try:
                self.frozen = _forward_graph(tf, signature, self.layout, self.source)
                self._session = _session(tf, self.frozen)
            except PolicyLoadError:
                raise
            except Exception as error:  # TensorFlow's graph tools raise many kinds
                raise PolicyLoadError(
                    f"{self.source}: cannot isolate the logits and value subgraph "
                    f"({_first_line(error)}); serve it from a re-exported SavedModel"
                ) from None
        self.observation_width = self.layout.observation_width
        self.action_space = self.layout.action_space
        self.recurrence: Recurrence | None = self.layout.recurrence
        self._step = _step_tensors(signature, self.layout, self.frozen)
        self._fetches = list(self.frozen.outputs + self.frozen.state_outputs)
        self._feeds_by_batch: dict[int, dict[str, npt.NDArray[Any]]] = {}

    def forward(
        self, observations: npt.NDArray[np.float32], step: StepInputs | None = None
    ) -> ModelOutputs:
        batch = observations.shape[0]
        feeds = dict(self._extra_feeds(batch))
        feeds[self.frozen.observations] = observations
        if self.recurrence is not None:
            feeds.update(self._step_feeds(step or self.recurrence.initial(batch)))
        results = self._session.run(self._fetches, feeds)
        count = len(self.frozen.outputs)
        value = results[1].reshape(-1) if count > 1 else None
        state = tuple(results[count:]) if self.frozen.state_outputs else None
        return ModelOutputs(logits=results[0], value=value, state=state)

    def onnx_roles(self) -> InputRoles:
        """The roles of the inputs and outputs by graph tensor name: the names the ONNX
        model converted from this graph has."""
        step = self._step
        return InputRoles(
            observations=self.frozen.observations,
            state_in=step.state,
            state_out=self.frozen.state_outputs,
            seq_lens=step.seq_lens,
            prev_actions=None if step.prev_actions is None else step.prev_actions.tensor,
            prev_rewards=step.prev_rewards,
        )

    def _step_feeds(self, step: StepInputs) -> dict[str, npt.NDArray[Any]]:
        tensors = self._step
        feeds: dict[str, npt.NDArray[Any]] = dict(zip(tensors.state, step.state, strict=True))
        if tensors.seq_lens is not None:
            # Each row is its own sequence of one step: RLlib's compute_single_action.
            feeds[tensors.seq_lens] = np.ones(len(step.prev_rewards), np.int32)
        if tensors.prev_actions is not None:
            feed = tensors.prev_actions
            feeds[feed.tensor] = model_prev_actions(step.prev_actions, feed.shape, feed.dtype)
        if tensors.prev_rewards is not None:
            feeds[tensors.prev_rewards] = step.prev_rewards
        return feeds

    def _extra_feeds(self, batch: int) -> dict[str, npt.NDArray[Any]]:
        feeds = self._feeds_by_batch.get(batch)
        if feeds is None:
            feeds = {
                feed.tensor: np.full(
                    [batch if dim is None else dim for dim in feed.shape], feed.fill, feed.dtype
                )
                for feed in self.frozen.feeds
            }
            if len(self._feeds_by_batch) < _MAX_CACHED_BATCHES:
                self._feeds_by_batch[batch] = feeds
        return feeds


def _load_signature(tf: Any, root: Path, source: str) -> _Signature:
    """Through TensorFlow 2 first; a TF1 graph it cannot lift goes through a v1 session."""
    try:
        return _load_v2(tf, root, source)
    except PolicyLoadError:
        raise
    except Exception as v2_error:  # TensorFlow raises many kinds; each means "try v1"
        try:
            return _load_v1(tf, root, source)
        except PolicyLoadError:
            raise
        except Exception as v1_error:
            raise PolicyLoadError(
                f"{source}: TensorFlow cannot load the SavedModel ({_first_line(v2_error)}; "
                f"as a TF1 graph: {_first_line(v1_error)}); re-export the policy"
            ) from None


def _load_v2(tf: Any, root: Path, source: str) -> _Signature:
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    loaded = tf.saved_model.load(str(root))
    if SIGNATURE not in loaded.signatures:
        raise _no_serving_default(source, list(loaded.signatures))
    function = loaded.signatures[SIGNATURE]
    frozen = convert_variables_to_constants_v2(function)
    _, input_specs = function.structured_input_signature
    output_specs = function.structured_outputs
    return _Signature(
        inputs={name: _info(spec) for name, spec in input_specs.items()},
        outputs={name: _info(spec) for name, spec in output_specs.items()},
        # A signature's tensors are flattened in sorted key order, inputs and outputs alike.
        input_tensors={
            name: tensor.name
            for name, tensor in zip(sorted(input_specs), frozen.inputs, strict=False)
        },
        output_tensors={
            name: tensor.name
            for name, tensor in zip(sorted(output_specs), frozen.outputs, strict=True)
        },
        graph_def=frozen.graph.as_graph_def(),
        split_sizes=_split_sizes(function.graph, tf),
    )


def _load_v1(tf: Any, root: Path, source: str) -> _Signature:
    v1 = tf.compat.v1
    graph = tf.Graph()
    with v1.Session(graph=graph) as session:
        meta = v1.saved_model.loader.load(
            session, [v1.saved_model.tag_constants.SERVING], str(root)
        )
        if SIGNATURE not in meta.signature_def:
            raise _no_serving_default(source, list(meta.signature_def))
        signature = meta.signature_def[SIGNATURE]
        # Only what the server runs: an export's sampling may read variables its saver
        # left out (RLlib's exploration timestep), and the server samples by itself.
        output_nodes = [
            _node(info.name)
            for key, info in signature.outputs.items()
            if not _SAMPLING_OUTPUT.match(key)
        ]
        graph_def = v1.graph_util.convert_variables_to_constants(
            session, graph.as_graph_def(), output_nodes
        )
    return _Signature(
        inputs={name: _proto_info(tf, info) for name, info in signature.inputs.items()},
        outputs={name: _proto_info(tf, info) for name, info in signature.outputs.items()},
        input_tensors={name: info.name for name, info in signature.inputs.items()},
        output_tensors={name: info.name for name, info in signature.outputs.items()},
        graph_def=graph_def,
        split_sizes=_split_sizes(graph, tf),
    )


def _no_serving_default(source: str, names: list[str]) -> PolicyLoadError:
    return PolicyLoadError(
        f"{source}: the SavedModel has no '{SIGNATURE}' signature (it has "
        f"{sorted(names) or 'none'}); export it with a '{SIGNATURE}' signature, as RLlib's "
        "export_policy_model does"
    )


def _forward_graph(
    tf: Any, signature: _Signature, layout: SignatureLayout, source: str
) -> FrozenForward:
    outputs = [signature.output_tensors[layout.logits_output]]
    if layout.value_output:
        outputs.append(signature.output_tensors[layout.value_output])
    state = [signature.output_tensors[name] for name in layout.roles.state_out]
    observations = signature.input_tensors.get(layout.roles.observations)
    if observations is None:
        raise PolicyLoadError(f"{source}: the signature's 'observations' input is not in its graph")
    graph_def = tf.compat.v1.graph_util.extract_sub_graph(
        signature.graph_def, [_node(name) for name in outputs + state]
    )
    feeds = _bake_fixed_placeholders(tf, graph_def, _node(observations))
    return FrozenForward(graph_def, observations, tuple(outputs), feeds, tuple(state))


def _step_tensors(
    signature: _Signature, layout: SignatureLayout, frozen: FrozenForward
) -> _StepTensors:
    roles = layout.roles
    tensors = signature.input_tensors
    feeds = {feed.tensor: feed for feed in frozen.feeds}

    def fed(role: str | None) -> str | None:
        # An input the logits, value and state do not read was pruned: nothing to feed.
        tensor = None if role is None else tensors.get(role)
        return tensor if tensor in feeds else None

    prev = fed(roles.prev_actions)
    return _StepTensors(
        state=tuple(tensors[name] for name in roles.state_in),
        seq_lens=fed(roles.seq_lens),
        prev_actions=None if prev is None else feeds[prev],
        prev_rewards=fed(roles.prev_rewards),
    )


def _bake_fixed_placeholders(tf: Any, graph_def: Any, observations: str) -> tuple[Feed, ...]:
    """Placeholders of a fixed shape (is_training, timestep) become constants holding RLlib's
    inference value, so the converted model takes the observations alone; those sized by the
    batch (prev_action, seq_lens) stay inputs of the TensorFlow forward pass."""
    feeds = []
    for node in graph_def.node:
        if node.op != "Placeholder" or node.name == observations:
            continue
        dtype = tf.as_dtype(node.attr["dtype"].type)
        shape = tf.TensorShape(node.attr["shape"].shape)
        fill = 1 if node.name.rsplit("/", 1)[-1] == "seq_lens" else 0
        if shape.is_fully_defined():
            value = tf.compat.v1.make_tensor_proto(
                np.full(shape.as_list(), fill, dtype.as_numpy_dtype), dtype
            )
            node.op = "Const"
            node.ClearField("attr")
            node.attr["dtype"].type = dtype.as_datatype_enum
            node.attr["value"].tensor.CopyFrom(value)
        else:
            dims = tuple(shape.as_list()) if shape.rank is not None else (None,)
            feeds.append(Feed(node.name + ":0", dims, dtype.name, fill))
    return tuple(feeds)


def _session(tf: Any, forward: FrozenForward) -> Any:
    """A v1 session over the frozen graph: `run` computes only what the fetches need, and
    runs small batches several times faster than a pruned tf.function."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(forward.graph_def, name="")
    return tf.compat.v1.Session(graph=graph)


def _node(tensor_name: str) -> str:
    return tensor_name.split(":", 1)[0]


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _info(spec: Any) -> TensorInfo:
    return TensorInfo(shape=tuple(spec.shape.as_list()), dtype=spec.dtype.name)


def _proto_info(tf: Any, info: Any) -> TensorInfo:
    shape = info.tensor_shape
    dims = () if shape.unknown_rank else tuple(d.size if d.size >= 0 else None for d in shape.dim)
    return TensorInfo(shape=dims, dtype=tf.as_dtype(info.dtype).name)


def _split_sizes(graph: Any, tf: Any) -> tuple[int, ...] | None:
    """RLlib's MultiCategorical splits its logits with a constant SplitV; read its sizes."""
    for operation in graph.get_operations():
        if operation.type != "SplitV":
            continue
        sizes = operation.inputs[1]
        if sizes.op.type == "Const":
            values = tf.make_ndarray(sizes.op.get_attr("value"))
            return tuple(int(v) for v in np.atleast_1d(values))
    return None
