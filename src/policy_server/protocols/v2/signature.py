"""A policy version as a model of the Open Inference Protocol: its input and output tensors,
read from its schema and its action space, and the conversion of tensors to model rows and
of decisions to tensors.

Inputs are either one `observations` tensor, FP32 `[-1, width]` (the model's row, as
`/predict_raw` takes it), or one tensor per schema field, named as the field: FP32 for
float, INT64 for int, BOOL for bool, `[-1]` for a scalar, `[-1, n]` for a list of `n`
values. Both are checked as the JSON routes check bodies (finite float32 values, the
schema's bounds, list lengths). `action_mask` (BOOL, `[-1, logits]`: each component's
actions side by side) is optional.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.policy.distribution import Categorical
from policy_server.policy.loaded import LoadedPolicy
from policy_server.policy.observation import FLOAT32_MAX
from policy_server.policy.schema import FieldType
from policy_server.policy.spaces import Box, Discrete, categorical_sizes
from policy_server.protocols.v2.tensors import InvalidTensor, Tensor
from policy_server.serving.service import Decisions

OBSERVATIONS = "observations"
ACTION_MASK = "action_mask"
_DATATYPES = {FieldType.FLOAT: "FP32", FieldType.INT: "INT64", FieldType.BOOL: "BOOL"}
_PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorflow": "tensorflow_savedmodel"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class FieldSlot:
    """Where a schema field's tensor goes in the model's row, and what it may hold."""

    spec: TensorSpec
    start: int
    width: int
    minimum: float | None
    maximum: float | None


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]  # published: the typed fields, else `observations`
    outputs: tuple[TensorSpec, ...]
    fields: tuple[FieldSlot, ...]
    width: int
    mask_sizes: tuple[int, ...] | None  # actions per component; None: continuous actions
    platform: str
    # Per column of the row, the bounds of its float field (none for int and bool fields,
    # checked exactly field by field): one comparison checks every float field at once.
    lows: npt.NDArray[np.float32]
    highs: npt.NDArray[np.float32]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)


def signature_of(policy: LoadedPolicy) -> Signature:
    """Cached on the version: built once."""
    found: Signature | None = policy.derived.get("v2.signature")
    if found is None:
        found = policy.derived["v2.signature"] = _build(policy)
    return found


def _build(policy: LoadedPolicy) -> Signature:
    width = policy.runtime.observation_width
    space = policy.runtime.action_space
    fields = _slots(policy, width)
    observations = TensorSpec(OBSERVATIONS, "FP32", (-1, width))
    inputs = tuple(slot.spec for slot in fields) or (observations,)
    if isinstance(space, Box):
        actions = TensorSpec("actions", "FP32", (-1, space.dim))
        probabilities: tuple[TensorSpec, ...] = ()
    else:
        sizes = categorical_sizes(space)
        actions = TensorSpec("actions", "INT64", (-1, len(sizes)))
        if isinstance(space, Discrete):
            probabilities = (TensorSpec("probabilities", "FP32", (-1, space.n)),)
        else:
            probabilities = tuple(
                TensorSpec(f"probabilities_{i}", "FP32", (-1, n)) for i, n in enumerate(sizes)
            )
    value = (TensorSpec("value", "FP32", (-1,)),) if _has_value(policy) else ()
    outputs = (
        actions,
        TensorSpec("probability", "FP32", (-1,)),
        TensorSpec("log_probability", "FP32", (-1,)),
        *value,
        *probabilities,
        TensorSpec("decision_id", "BYTES", (-1,)),
    )
    mask_sizes = None if isinstance(space, Box) else categorical_sizes(space)
    platform = _PLATFORMS.get(policy.runtime.name, policy.runtime.name)
    lows, highs = _bounds(fields, width)
    return Signature(inputs, outputs, fields, width, mask_sizes, platform, lows, highs)


def _bounds(
    fields: tuple[FieldSlot, ...], width: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    lows = np.full(width, -np.inf, dtype=np.float32)
    highs = np.full(width, np.inf, dtype=np.float32)
    for slot in fields:
        if slot.spec.datatype == "FP32":
            where = slice(slot.start, slot.start + slot.width)
            lows[where] = slot.minimum if slot.minimum is not None else -FLOAT32_MAX
            highs[where] = slot.maximum if slot.maximum is not None else FLOAT32_MAX
    return lows, highs


def _slots(policy: LoadedPolicy, width: int) -> tuple[FieldSlot, ...]:
    schema_fields = policy.schema.observations
    known = sum(f.width or 0 for f in schema_fields)
    slots, start = [], 0
    for field in schema_fields:
        # A list without max_items takes what the other fields leave of the model's row.
        size = field.width if field.width is not None else width - known
        shape = (-1, size) if field.type.is_list else (-1,)
        spec = TensorSpec(field.name, _DATATYPES[field.type.scalar], shape)
        slots.append(FieldSlot(spec, start, size, field.minimum, field.maximum))
        start += size
    return tuple(slots)


def _has_value(policy: LoadedPolicy) -> bool:
    """Whether the model has a value output; read once from a forward pass of zeros."""
    outputs = policy.runtime.forward(np.zeros((1, policy.runtime.observation_width), np.float32))
    return outputs.value is not None


# --- tensors in ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    rows: npt.NDArray[np.float32]
    masks: list[list[list[bool]] | None] | None


def read_inputs(signature: Signature, inputs: list[Tensor]) -> Rows:
    """The model rows (and action masks) that a request's input tensors hold."""
    by_name: dict[str, Tensor] = {}
    for tensor in inputs:
        if tensor.name in by_name:
            raise InvalidTensor(f"input '{tensor.name}' is given twice")
        by_name[tensor.name] = tensor
    mask = by_name.pop(ACTION_MASK, None)
    if OBSERVATIONS in by_name and not any(s.spec.name == OBSERVATIONS for s in signature.fields):
        observations = by_name.pop(OBSERVATIONS)
        _refuse_unknown(signature, by_name, "beside 'observations'")
        rows = _observation_rows(signature, observations)
    else:
        rows = _field_rows(signature, by_name)
    return Rows(rows, None if mask is None else _masks(signature, mask, len(rows)))


def _refuse_unknown(signature: Signature, left: dict[str, Tensor], where: str) -> None:
    if left:
        names = ", ".join(f"'{name}'" for name in left)
        expected = [spec.name for spec in signature.inputs]
        raise InvalidTensor(
            f"unexpected input {names} {where}; the model takes {expected} or "
            f"'{OBSERVATIONS}', and optionally '{ACTION_MASK}'"
        )


def _expect(tensor: Tensor, spec: TensorSpec, batch: int | None = None) -> int:
    """The tensor's batch size, once its datatype and shape match `spec`."""
    if tensor.datatype != spec.datatype:
        raise InvalidTensor(
            f"input '{tensor.name}': datatype {tensor.datatype}, expected {spec.datatype}"
        )
    shape = tensor.shape
    fits = len(shape) == len(spec.shape) and all(
        want in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    )
    if not fits:
        raise InvalidTensor(
            f"input '{tensor.name}': shape {list(shape)}, expected {list(spec.shape)}"
        )
    if shape[0] == 0:
        raise InvalidTensor(f"input '{tensor.name}': holds no observation")
    if batch is not None and shape[0] != batch:
        raise InvalidTensor(
            f"input '{tensor.name}': {shape[0]} observations, the other inputs {batch}"
        )
    return shape[0]


def _observation_rows(signature: Signature, tensor: Tensor) -> npt.NDArray[np.float32]:
    spec = TensorSpec(OBSERVATIONS, "FP32", (-1, signature.width))
    _expect(tensor, spec)
    rows = np.ascontiguousarray(tensor.data, dtype=np.float32)
    _finite(tensor.name, rows)
    return rows


def _field_rows(signature: Signature, given: dict[str, Tensor]) -> npt.NDArray[np.float32]:
    if not signature.fields:
        raise InvalidTensor(f"missing input '{OBSERVATIONS}'")
    missing = [slot.spec.name for slot in signature.fields if slot.spec.name not in given]
    if missing:
        raise InvalidTensor(
            f"missing input(s) {missing}: send every field's tensor, or '{OBSERVATIONS}'"
        )
    left = dict(given)
    batch: int | None = None
    for slot in signature.fields:
        batch = _expect(left.pop(slot.spec.name), slot.spec, batch)
    _refuse_unknown(signature, left, "")
    assert batch is not None
    rows = np.empty((batch, signature.width), dtype=np.float32)
    for slot in signature.fields:
        tensor = given[slot.spec.name]
        values = tensor.data.reshape(batch, slot.width)
        if tensor.datatype == "INT64":
            _bounded(slot, values)
        rows[:, slot.start : slot.start + slot.width] = values
    # NaN fails both comparisons; only then is each float field looked at, to say which.
    if not ((rows >= signature.lows).all() and (rows <= signature.highs).all()):
        for slot in signature.fields:
            if slot.spec.datatype == "FP32":
                _bounded(slot, given[slot.spec.name].data.reshape(batch, slot.width))
    return rows


def _finite(name: str, values: npt.NDArray[Any]) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise InvalidTensor(f"input '{name}': observation {row} holds NaN or an infinity")


def _bounded(slot: FieldSlot, values: npt.NDArray[Any]) -> None:
    name = slot.spec.name
    if values.dtype.kind == "f":
        _finite(name, values)
    low = slot.minimum if slot.minimum is not None else -FLOAT32_MAX
    high = slot.maximum if slot.maximum is not None else FLOAT32_MAX
    for bound, bad, word in (
        (low, values < low, "below the minimum"),
        (high, values > high, "above the maximum"),
    ):
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            value = values[row][bad[row]][0].item()
            raise InvalidTensor(
                f"input '{name}': observation {row} holds {value}, {word} {bound:g}"
            )


def _masks(signature: Signature, tensor: Tensor, batch: int) -> list[list[list[bool]] | None]:
    """The mask tensor as the service takes masks: per row, per component, per action."""
    sizes = signature.mask_sizes
    if sizes is None:
        raise InvalidTensor(f"input '{ACTION_MASK}': the action space is continuous")
    _expect(tensor, TensorSpec(ACTION_MASK, "BOOL", (-1, sum(sizes))), batch)
    bounds = np.cumsum((0, *sizes)).tolist()
    return [
        [row[start:end] for start, end in itertools.pairwise(bounds)]
        for row in tensor.data.tolist()
    ]


# --- tensors out -----------------------------------------------------------------------------


def output_tensors(
    signature: Signature, policy: LoadedPolicy, decisions: Decisions, names: list[str]
) -> list[Tensor]:
    """The requested outputs, in the order asked."""
    specs = {spec.name: spec for spec in signature.outputs}
    chosen = decisions.chosen
    batch = len(decisions.predictions)
    exact = None
    tensors = []
    for name in names:
        spec = specs[name]
        data: npt.NDArray[Any]
        if name == "actions":
            data = chosen.values
        elif name == "probability":
            data = np.exp(chosen.log_prob)
        elif name == "log_probability":
            data = chosen.log_prob
        elif name == "value":
            data = decisions.outputs.value  # type: ignore[assignment]
        elif name == "decision_id":
            data = np.empty(batch, dtype=object)
            data[:] = [p["decision_id"].encode() for p in decisions.predictions]
        else:
            if exact is None:
                assert isinstance(policy.distribution, Categorical)
                exact = policy.distribution.distribution(decisions.logits).probabilities
                assert exact is not None
            component = 0 if name == "probabilities" else int(name.rsplit("_", 1)[1])
            data = exact[component]
        dtype = (
            None
            if spec.datatype == "BYTES"
            else np.float32
            if spec.datatype == "FP32"
            else np.int64
        )
        array = data if dtype is None else np.asarray(data, dtype=dtype)
        shape = (batch, *spec.shape[1:])
        tensors.append(Tensor(name, spec.datatype, shape, array.reshape(shape)))
    return tensors
