"""Parse and check `schema.yaml`: the ordered observation fields and the policy's parameters."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from policy_server.errors import PolicyLoadError
from policy_server.policy.spaces import ActionSpace, space_from_dict


class FieldType(StrEnum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    LIST_INT = "List[int]"
    LIST_FLOAT = "List[float]"
    LIST_BOOL = "List[bool]"

    @property
    def is_list(self) -> bool:
        return self.value.startswith("List[")

    @property
    def scalar(self) -> FieldType:
        return FieldType(self.value[5:-1]) if self.is_list else self


_TYPE_ALIASES = {t.value.lower().replace(" ", ""): t for t in FieldType} | {
    "list[integer]": FieldType.LIST_INT,
    "integer": FieldType.INT,
    "boolean": FieldType.BOOL,
}
_VALID_TYPES = ", ".join(t.value for t in FieldType)
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIELD_KEYS = {"type", "description", "minimum", "maximum", "min_items", "max_items"}
_PARAMETER_KEYS = {
    "discrete",
    "tuple",
    "api_key",
    "url_path",
    "action_space",
    "logits_output",
    "value_output",
    "model",
}
# Roles of a model's inputs and outputs, by tensor name, where the names do not say them.
_MODEL_KEYS = {
    "observations": str,
    "logits": str,
    "value": str,
    "state_in": list,
    "state_out": list,
    "seq_lens": str,
    "prev_actions": str,
    "prev_rewards": str,
}


@dataclass(frozen=True)
class ObservationField:
    """One named observation value (or list of values) in the order the model expects."""

    name: str
    type: FieldType
    description: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_items: int | None = None
    max_items: int | None = None

    @property
    def width(self) -> int | None:
        """How many model inputs this field fills; None for a list of unknown length."""
        if not self.type.is_list:
            return 1
        return self.max_items


@dataclass(frozen=True)
class ModelRoles:
    """`parameters.model`: which input or output of the model plays which role, for exports
    whose tensor names do not say it (RLlib's `export_model(onnx=...)` names them by graph
    tensor). Every entry is optional; the names the model uses win where they say it."""

    observations: str | None = None
    logits: str | None = None
    value: str | None = None
    state_in: tuple[str, ...] = ()
    state_out: tuple[str, ...] = ()
    seq_lens: str | None = None
    prev_actions: str | None = None
    prev_rewards: str | None = None

    def named_inputs(self) -> set[str]:
        names = {self.observations, self.seq_lens, self.prev_actions, self.prev_rewards}
        return {n for n in names if n is not None} | set(self.state_in)


@dataclass(frozen=True)
class Parameters:
    discrete: bool = True
    tuple: bool = False
    api_key: str | None = None
    url_path: str = ""
    # Only for a model.onnx policy, whose graph does not say how to read its outputs.
    action_space: ActionSpace | None = None
    logits_output: str | None = None
    value_output: str | None = None
    model: ModelRoles = ModelRoles()

    @property
    def logits_name(self) -> str | None:
        """`model.logits`, or its alias `logits_output`."""
        return self.model.logits or self.logits_output

    @property
    def value_name(self) -> str | None:
        return self.model.value or self.value_output


@dataclass(frozen=True)
class PolicySchema:
    observations: tuple[ObservationField, ...]
    parameters: Parameters

    @property
    def has_observations(self) -> bool:
        return bool(self.observations)

    @functools.cached_property
    def list_fields(self) -> tuple[bool, ...]:
        """Per observation field, whether it holds a list (read on every request)."""
        return tuple(f.type.is_list for f in self.observations)

    @property
    def width(self) -> int | None:
        """Total model inputs the observations fill; None if a list has no `max_items`."""
        widths = [f.width for f in self.observations]
        return None if None in widths else sum(w for w in widths if w is not None)


# A schema is a few dozen lines; anything near this size is not one.
MAX_SCHEMA_BYTES = 1 << 20


class _AliasRefused(yaml.YAMLError):
    pass


class _PlainLoader(yaml.SafeLoader):
    """safe_load without aliases: nine lines of `&a`/`*a` can stand for a billion values,
    and a schema never needs them. Tags that construct objects are refused by SafeLoader."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.get_mark()
            raise _AliasRefused(f"line {mark.line + 1}")
        return super().compose_node(parent, index)


def load_schema(path: Path) -> PolicySchema:
    """Read and validate a schema.yaml file; raise PolicyLoadError naming the bad field."""
    return parse_schema(_read_yaml(path), source=str(path))


def _read_yaml(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SCHEMA_BYTES + 1)
    except FileNotFoundError:
        raise PolicyLoadError(f"{path}: no schema.yaml found") from None
    if len(data) > MAX_SCHEMA_BYTES:
        raise PolicyLoadError(
            f"{path}: larger than {MAX_SCHEMA_BYTES} bytes; a schema.yaml lists the "
            "observation fields and parameters only"
        )
    try:
        return yaml.load(data.decode("utf-8"), Loader=_PlainLoader)
    except UnicodeDecodeError as error:
        raise PolicyLoadError(f"{path}: not UTF-8 text ({error})") from None
    except _AliasRefused as error:
        raise PolicyLoadError(
            f"{path}: uses a YAML alias (*name) at {error}; write the values out, "
            "schema.yaml does not accept anchors and aliases"
        ) from None
    except yaml.constructor.ConstructorError as error:
        raise PolicyLoadError(
            f"{path}: uses a YAML tag that is not plain data ({error.problem}); remove it: "
            "schema.yaml holds mappings, lists, strings, numbers and booleans only"
        ) from None
    except yaml.YAMLError as error:
        raise PolicyLoadError(f"{path}: not valid YAML: {error}") from None
    except RecursionError:
        raise PolicyLoadError(f"{path}: nests too deeply to be a schema.yaml") from None


def parse_schema(document: Any, source: str = "schema.yaml") -> PolicySchema:
    if not isinstance(document, dict):
        raise PolicyLoadError(
            f"{source}: must be a mapping with the keys 'parameters' and (optionally) "
            f"'observations', got {type(document).__name__}"
        )
    unknown = set(document) - {"observations", "parameters"}
    if unknown:
        raise PolicyLoadError(
            f"{source}: unknown top-level key(s) {sorted(unknown)}; "
            "valid keys are 'observations' and 'parameters'"
        )
    if "parameters" not in document:
        raise PolicyLoadError(
            f"{source}: 'parameters' is missing; it needs at least 'discrete' and 'tuple', "
            "e.g. parameters: {discrete: true, tuple: false, api_key: ...}"
        )
    parameters = _parse_parameters(document["parameters"], source)
    observations = _parse_observations(document.get("observations") or {}, source)
    return PolicySchema(observations=observations, parameters=parameters)


def _parse_parameters(raw: Any, source: str) -> Parameters:
    if not isinstance(raw, dict):
        raise PolicyLoadError(f"{source}: 'parameters' must be a mapping")
    unknown = set(raw) - _PARAMETER_KEYS
    if unknown:
        raise PolicyLoadError(
            f"{source}: unknown key(s) {sorted(unknown)} in 'parameters'; "
            f"valid keys are {sorted(_PARAMETER_KEYS)}"
        )
    for key in ("discrete", "tuple"):
        if key in raw and not isinstance(raw[key], bool):
            raise PolicyLoadError(f"{source}: parameters.{key} must be true or false")
    api_key = raw.get("api_key")
    if api_key is not None and not isinstance(api_key, str | int):
        raise PolicyLoadError(f"{source}: parameters.api_key must be a string")
    return Parameters(
        discrete=raw.get("discrete", True),
        tuple=raw.get("tuple", False),
        api_key=str(api_key) if api_key not in (None, "") else None,
        url_path=_parse_url_path(raw.get("url_path"), source),
        action_space=_parse_action_space(raw.get("action_space"), source),
        logits_output=_optional_name(raw, "logits_output", source),
        value_output=_optional_name(raw, "value_output", source),
        model=_parse_model(raw.get("model"), source),
    )


def _parse_model(raw: Any, source: str) -> ModelRoles:
    if raw is None:
        return ModelRoles()
    if not isinstance(raw, dict):
        raise PolicyLoadError(
            f"{source}: parameters.model must be a mapping of roles to tensor names, e.g. "
            "{logits: 'default_policy/Reshape_3:0', state_in: [...], state_out: [...]}"
        )
    unknown = set(raw) - set(_MODEL_KEYS)
    if unknown:
        raise PolicyLoadError(
            f"{source}: unknown key(s) {sorted(unknown)} in parameters.model; "
            f"valid keys are {sorted(_MODEL_KEYS)}"
        )
    values: dict[str, Any] = {}
    for key, kind in _MODEL_KEYS.items():
        value = raw.get(key)
        if value is None:
            continue
        if kind is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PolicyLoadError(
                    f"{source}: parameters.model.{key} must be a list of tensor names"
                )
            values[key] = tuple(value)
        elif not isinstance(value, str):
            raise PolicyLoadError(f"{source}: parameters.model.{key} must be a tensor name")
        else:
            values[key] = value
    roles = ModelRoles(**values)
    if len(roles.state_in) != len(roles.state_out):
        raise PolicyLoadError(
            f"{source}: parameters.model names {len(roles.state_in)} state_in and "
            f"{len(roles.state_out)} state_out tensors; they pair in order, one each"
        )
    return roles


def _parse_action_space(raw: Any, source: str) -> ActionSpace | None:
    if raw is None:
        return None
    try:
        return space_from_dict(raw if isinstance(raw, dict) else {})
    except (KeyError, TypeError, ValueError) as error:
        raise PolicyLoadError(f"{source}: parameters.action_space: {error}") from None


def _optional_name(raw: dict[str, Any], key: str, source: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise PolicyLoadError(f"{source}: parameters.{key} must be an output name")
    return value


def _parse_url_path(raw: Any, source: str) -> str:
    if raw in (None, "", "/"):
        return ""
    if not isinstance(raw, str) or not re.fullmatch(r"/?[A-Za-z0-9_\-./]+", raw) or ".." in raw:
        raise PolicyLoadError(
            f"{source}: parameters.url_path must be a path such as '/api/v1', got {raw!r}"
        )
    return "/" + raw.strip("/")


def _parse_observations(raw: Any, source: str) -> tuple[ObservationField, ...]:
    if not isinstance(raw, dict):
        raise PolicyLoadError(f"{source}: 'observations' must be a mapping of field names")
    return tuple(_parse_field(name, spec, source) for name, spec in raw.items())


def _parse_field(name: Any, spec: Any, source: str) -> ObservationField:
    where = f"{source}: observations.{name}"
    if not isinstance(name, str) or not _FIELD_NAME.match(name):
        raise PolicyLoadError(f"{where}: a field name must be a Python identifier")
    if not isinstance(spec, dict) or "type" not in spec:
        raise PolicyLoadError(f"{where}: needs a 'type', one of {_VALID_TYPES}")
    unknown = set(spec) - _FIELD_KEYS
    if unknown:
        raise PolicyLoadError(
            f"{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(_FIELD_KEYS)}"
        )
    type_name = str(spec["type"]).lower().replace(" ", "")
    if type_name not in _TYPE_ALIASES:
        raise PolicyLoadError(
            f"{where}.type: unknown type {spec['type']!r}; valid types are {_VALID_TYPES}"
        )
    field_type = _TYPE_ALIASES[type_name]
    field = ObservationField(
        name=name,
        type=field_type,
        description=_optional(spec, "description", str, where),
        minimum=_optional(spec, "minimum", float, where),
        maximum=_optional(spec, "maximum", float, where),
        min_items=_optional(spec, "min_items", int, where),
        max_items=_optional(spec, "max_items", int, where),
    )
    _check_field(field, where)
    return field


def _optional(spec: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = spec.get(key)
    if value is None:
        return None
    if kind is str:
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyLoadError(f"{where}.{key}: must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise PolicyLoadError(f"{where}.{key}: must be a whole number, got {value!r}")
    return kind(value)


def _check_field(field: ObservationField, where: str) -> None:
    if not field.type.is_list and (field.min_items is not None or field.max_items is not None):
        raise PolicyLoadError(f"{where}: min_items/max_items apply only to List types")
    for key in ("min_items", "max_items"):
        value = getattr(field, key)
        if value is not None and value < 1:
            raise PolicyLoadError(f"{where}.{key}: must be at least 1, got {value}")
    if field.min_items and field.max_items and field.min_items > field.max_items:
        raise PolicyLoadError(f"{where}: min_items ({field.min_items}) > max_items")
    if field.minimum is not None and field.maximum is not None and field.minimum > field.maximum:
        raise PolicyLoadError(f"{where}: minimum ({field.minimum}) > maximum ({field.maximum})")
    if field.type.scalar is FieldType.BOOL and (
        field.minimum is not None or field.maximum is not None
    ):
        raise PolicyLoadError(f"{where}: minimum/maximum do not apply to bool values")
