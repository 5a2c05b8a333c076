"""Observation request models built from a schema, and their conversion to model inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, with_config
from typing_extensions import TypedDict

from policy_server.errors import FieldError, InvalidObservation
from policy_server.policy.schema import FieldType, ObservationField, PolicySchema

FLOAT32_MAX = float(np.finfo(np.float32).max)
# The largest integer every JSON parser reads exactly (RFC 7493, I-JSON): 2**53 - 1.
JSON_INT_MAX = 2**53 - 1


def observation_model(schema: PolicySchema, name: str = "Observation") -> type[BaseModel] | None:
    """The typed `Observation` body of /predict: one attribute per schema field, in order."""
    if not schema.has_observations:
        return None
    fields: dict[str, Any] = {f.name: (_annotation(f), _field_info(f)) for f in schema.observations}
    example = {f.name: _example(f) for f in schema.observations}
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [example]}),
        __doc__="One observation, with the fields of schema.yaml in the order the model reads.",
        **fields,
    )


def observation_dict(schema: PolicySchema) -> Any | None:
    """The typed observation as a TypedDict with the same constraints: validating many of
    them into plain dicts costs half of building models. None when a list field has no
    fixed length (its rows need the width check of `Vectorizer.row`)."""
    fields = schema.observations
    if not fields or any(f.type.is_list and f.min_items != f.max_items for f in fields):
        return None
    annotations = {f.name: Annotated[_annotation(f), _field_info(f)] for f in fields}
    return with_config(ConfigDict(extra="forbid"))(TypedDict("ObservationDict", annotations))  # type: ignore[operator]


def dict_rows(schema: PolicySchema, items: list[dict[str, Any]]) -> npt.NDArray[np.float32]:
    """Model input rows of validated `observation_dict` items, in schema order."""
    if not any(schema.list_fields):
        return np.array([tuple(item.values()) for item in items], dtype=np.float32)
    lists = [(f.name, f.type.is_list) for f in schema.observations]
    return np.array(
        [
            [v for name, is_list in lists for v in (item[name] if is_list else (item[name],))]
            for item in items
        ],
        dtype=np.float32,
    )


def whole_number(value: Any) -> Any:
    """JSON Schema's integers include `3.0`: a float without a fraction is that integer
    (`3.5`, `"3"` and `true` stay refused)."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def raw_number() -> Any:  # a type expression, built where pydantic needs it
    """One raw model input: a JSON number that stays finite as float32."""
    return Annotated[
        float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)
    ]


def raw_observation_model(width: int, name: str = "RawObservation") -> type[BaseModel]:
    """The `{"obs": [...]}` body of /predict_raw: exactly `width` numbers."""
    return create_model(
        name,
        __config__=ConfigDict(
            extra="forbid", json_schema_extra={"examples": [{"obs": [0.0] * width}]}
        ),
        __doc__=f"The model's {width} input values, concatenated in schema order.",
        obs=(list[raw_number()], Field(min_length=width, max_length=width)),  # type: ignore[misc,arg-type]
    )


def _scalar(field_type: FieldType, field: ObservationField) -> Any:
    if field_type is FieldType.BOOL:
        return Annotated[bool, Field(strict=True)]
    # Values become float32 model inputs: without bounds of its own a field is capped where
    # float32 stays finite, so no request can feed the model an infinity.
    low = field.minimum if field.minimum is not None else -FLOAT32_MAX
    high = field.maximum if field.maximum is not None else FLOAT32_MAX
    if field_type is FieldType.INT:
        # The bounds published are the ones accepted, within I-JSON's interoperable range.
        ge, le = max(int(np.ceil(low)), -JSON_INT_MAX), min(int(np.floor(high)), JSON_INT_MAX)
        return Annotated[int, Field(strict=True, ge=ge, le=le), BeforeValidator(whole_number)]
    return Annotated[float, Field(strict=True, allow_inf_nan=False, ge=low, le=high)]


def _annotation(field: ObservationField) -> Any:
    item = _scalar(field.type.scalar, field)
    return list[item] if field.type.is_list else item  # type: ignore[valid-type]


def _field_info(field: ObservationField) -> Any:
    extra: dict[str, Any] = {"description": field.description}
    if field.type.is_list:
        extra |= {"min_length": field.min_items, "max_length": field.max_items}
    return Field(**extra)


def _example(field: ObservationField) -> Any:
    scalar: Any
    if field.type.scalar is FieldType.BOOL:
        scalar = False
    else:
        low, high = field.minimum, field.maximum
        middle = (low + high) / 2 if low is not None and high is not None else low or high or 0
        scalar = int(middle) if field.type.scalar is FieldType.INT else float(middle)
    if not field.type.is_list:
        return scalar
    return [scalar] * (field.max_items or field.min_items or 1)


class Vectorizer:
    """Concatenates validated observations into the model's float32 input rows."""

    def __init__(self, schema: PolicySchema, width: int) -> None:
        self.fields = schema.observations
        self.width = width
        self._names = [f.name for f in self.fields]
        self._lists = [f.type.is_list for f in self.fields]
        self._scalars_only = not any(self._lists)

    def rows(
        self, observations: Sequence[BaseModel], raw_model: type[BaseModel]
    ) -> list[list[float]]:
        """Model input rows for typed observations or raw `{"obs": [...]}` bodies."""
        if self._scalars_only and not any(isinstance(o, raw_model) for o in observations):
            # A validated model holds its fields in declaration order: the schema's order.
            return [list(observation.__dict__.values()) for observation in observations]
        return [
            observation.obs if isinstance(observation, raw_model) else self.row(observation)  # type: ignore[attr-defined]
            for observation in observations
        ]

    def row(self, observation: BaseModel) -> list[float]:
        values: list[float] = []
        for name, is_list in zip(self._names, self._lists, strict=True):
            value = getattr(observation, name)
            if is_list:
                values.extend(value)
            else:
                values.append(value)
        if len(values) != self.width:
            raise self._width_error(len(values))
        return values

    def _width_error(self, got: int) -> InvalidObservation:
        lists = [f.name for f in self.fields if f.type.is_list]
        return InvalidObservation(
            f"the observation has {got} values in all, the model takes {self.width}",
            [
                FieldError(name, "list length does not fit the model's input width")
                for name in lists
            ],
        )
