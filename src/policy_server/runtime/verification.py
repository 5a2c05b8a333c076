"""Check a converted model against TensorFlow on observations that schema.yaml allows."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from policy_server.errors import PolicyLoadError
from policy_server.policy.distribution import distribution_for
from policy_server.policy.schema import FieldType, ObservationField, PolicySchema
from policy_server.policy.spaces import ActionSpace, Box, categorical_sizes
from policy_server.runtime.base import ModelOutputs, PolicyRuntime, StepInputs

if TYPE_CHECKING:
    from policy_server.runtime.tensorflow import TensorFlowRuntime

VERIFY_ROWS = 256
LOGITS_ATOL = 1e-4
# Without declared bounds a value is drawn from this range.
_SPAN = 10.0


def verify(
    reference: TensorFlowRuntime, candidate: PolicyRuntime, schema: PolicySchema | None = None
) -> None:
    """Both runtimes on the same observations: logits within 1e-4, same most likely action.

    TensorFlow's logits are the truth. A failure of either runtime is reported, not raised
    as the framework's own exception, so no start-up ends in a traceback.
    """
    source = reference.source
    observations = verification_observations(
        reference.observation_width, reference.action_space, schema
    )
    step = _random_step(reference, len(observations))
    expected = _run(reference, observations, f"{source}: TensorFlow", step)
    got = _run(candidate, observations, f"{source}: the ONNX model", step)
    if expected.state is not None and (
        got.state is None
        or not all(
            np.allclose(a, b, rtol=1e-5, atol=LOGITS_ATOL)
            for a, b in zip(got.state, expected.state, strict=True)
        )
    ):
        raise PolicyLoadError(f"{source}: the ONNX model's state differs from TensorFlow's")
    if not np.allclose(got.logits, expected.logits, rtol=1e-5, atol=LOGITS_ATOL, equal_nan=True):
        worst = float(np.nanmax(np.abs(got.logits - expected.logits)))
        raise PolicyLoadError(
            f"{source}: the ONNX model's logits differ from TensorFlow's by up to {worst:.3g}"
        )
    distribution = distribution_for(reference.action_space)
    rows = distribution.valid_rows(expected.logits)
    got_mode = distribution.mode(got.logits[rows]).values
    expected_mode = distribution.mode(expected.logits[rows]).values
    # A continuous mode is the mean: within the logits' tolerance, as the means are.
    same = (
        np.allclose(got_mode, expected_mode, rtol=1e-5, atol=LOGITS_ATOL)
        if isinstance(reference.action_space, Box)
        else np.array_equal(got_mode, expected_mode)
    )
    if not same:
        raise PolicyLoadError(f"{source}: ONNX and TensorFlow disagree on the most likely action")
    if (expected.value is None) != (got.value is None) or (
        expected.value is not None
        and got.value is not None
        and not np.allclose(got.value, expected.value, rtol=1e-3, atol=1e-3, equal_nan=True)
    ):
        raise PolicyLoadError(
            f"{source}: the ONNX model's value estimates differ from TensorFlow's"
        )


def _random_step(reference: TensorFlowRuntime, rows: int, seed: int = 1) -> StepInputs | None:
    """A recurrent policy is checked mid-episode: random states, previous actions the
    action space allows, and rewards."""
    recurrence = reference.recurrence
    if recurrence is None:
        return None
    rng = np.random.default_rng(seed)
    space = reference.action_space
    if isinstance(space, Box):
        prev = rng.normal(size=(rows, recurrence.action_width))
    else:
        sizes = categorical_sizes(space)
        prev = np.stack([rng.integers(0, n, rows) for n in sizes], axis=1)
    return StepInputs(
        tuple(rng.normal(size=(rows, size)).astype(np.float32) for size in recurrence.state_sizes),
        prev.astype(np.float32),
        rng.normal(size=rows).astype(np.float32),
    )


def _run(
    runtime: PolicyRuntime,
    observations: npt.NDArray[np.float32],
    who: str,
    step: StepInputs | None = None,
) -> ModelOutputs:
    try:
        return (
            runtime.forward(observations) if step is None else runtime.forward(observations, step)
        )
    except Exception as error:  # TensorFlow and ONNX Runtime raise their own kinds
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise PolicyLoadError(f"{who} fails on the verification observations ({first})") from None


def verification_observations(
    width: int,
    space: ActionSpace,
    schema: PolicySchema | None,
    rows: int = VERIFY_ROWS,
    seed: int = 0,
) -> npt.NDArray[np.float32]:
    """Rows the schema allows: booleans as 0/1, ints and floats within their bounds, lists at
    their declared length, and every mask (a List[bool]) leaving at least one legal action
    per component. Without a schema that fits the model, normal and wide uniform values."""
    rng = np.random.default_rng(seed)
    if schema is None or not schema.has_observations or schema.width != width:
        return np.concatenate(
            [rng.normal(size=(rows // 2, width)), rng.uniform(-_SPAN, _SPAN, (rows // 2, width))]
        ).astype(np.float32)
    columns = [_field_values(field, space, rows, rng) for field in schema.observations]
    return np.concatenate(columns, axis=1).astype(np.float32)


def _field_values(
    field: ObservationField, space: ActionSpace, rows: int, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    count = field.width or 1
    kind = field.type.scalar
    if kind is FieldType.BOOL:
        values = rng.integers(0, 2, (rows, count)).astype(np.float64)
        if field.type.is_list:
            _leave_a_legal_action(values, _mask_blocks(count, space), rng)
        return values
    low, high = _bounds(field)
    if kind is FieldType.INT:
        # Drawn as floats: declared bounds may lie beyond what int64 holds.
        low, high = float(np.ceil(low)), float(max(np.ceil(low), np.floor(high)))
        return np.minimum(np.floor(rng.uniform(low, high + 1, (rows, count))), high)
    values = rng.uniform(low, high, (rows, count))
    if field.minimum is None and field.maximum is None:
        values[: rows // 2] = rng.normal(size=(rows // 2, count))
    return values


def _bounds(field: ObservationField) -> tuple[float, float]:
    low, high = field.minimum, field.maximum
    if low is not None and high is not None:
        return low, high
    if low is not None:
        return low, low + 2 * _SPAN
    if high is not None:
        return high - 2 * _SPAN, high
    return -_SPAN, _SPAN


def _mask_blocks(count: int, space: ActionSpace) -> list[tuple[int, int]]:
    """A list as long as the logits masks each action component apart; any other list of
    booleans is kept from being all false as a whole."""
    if isinstance(space, Box) or count != space.logits_width:
        return [(0, count)]
    bounds = np.concatenate([[0], np.cumsum(categorical_sizes(space))])
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def _leave_a_legal_action(
    values: npt.NDArray[np.float64], blocks: list[tuple[int, int]], rng: np.random.Generator
) -> None:
    for start, stop in blocks:
        empty = np.flatnonzero(values[:, start:stop].sum(axis=1) == 0)
        values[empty, start + rng.integers(0, stop - start, len(empty))] = 1.0
