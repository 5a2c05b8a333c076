"""Request bodies of the prediction routes, built per policy version from its schema.

Every route takes the original flat body (a typed observation, or `{"obs": [...]}`) or the
envelope `{"observation": <that body>, "episode_id": ..., "step": ..., "action_mask": ...}`.
The envelope is told apart by `observation` holding a JSON object: no schema field can hold
one, so a schema with a field named `observation` keeps its flat body.

Validation uses the unions of both (`BodyTypes`, cached per version). The OpenAPI document
gives each route one named model instead (`PublishedBodies`, named per policy so that each
policy's components and SDK classes are its own): a union body makes OpenAPI Generator's SDKs
wrap every observation, and name models after the union's members. The envelope is the same
model in both (`_envelope`): a field added there is validated and published at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    with_config,
)
from pydantic.config import JsonDict
from typing_extensions import TypedDict

from policy_server.policy.loaded import LoadedPolicy
from policy_server.policy.observation import (
    JSON_INT_MAX,
    dict_rows,
    observation_dict,
    observation_model,
    raw_number,
    raw_observation_model,
    whole_number,
)
from policy_server.policy.spaces import Box, categorical_sizes
from policy_server.serving.service import Episode

# Union tags in angle brackets, which no field name has: api/errors.py drops them from paths.
TYPED, RAW, FLAT, ENVELOPE = "<typed>", "<raw>", "<flat>", "<envelope>"
# One type, not a union: an error names the value, not a union member.
MaskValue = Literal[0, 1, True, False]
# A mask row that forbids every action is refused.
_ALLOWED: JsonDict = {"contains": {"enum": [1, True]}}


def _is_envelope(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("observation"), dict)


def _flat_or_envelope(flat: Any, envelope: Any, title: str | None = None) -> Any:
    def kind(body: Any) -> str:
        if isinstance(body, BaseModel):
            return ENVELOPE if "action_mask" in type(body).model_fields else FLAT
        return ENVELOPE if _is_envelope(body) else FLAT

    union = Annotated[flat, Tag(FLAT)] | Annotated[envelope, Tag(ENVELOPE)]
    extra = [] if title is None else [Field(title=title)]
    return Annotated[union, Discriminator(kind), *extra]


def _typed_or_raw(typed: type[BaseModel], raw: type[BaseModel]) -> Any:
    typed_names = set(typed.model_fields)

    def kind(body: Any) -> str:
        if isinstance(body, BaseModel):
            return RAW if isinstance(body, raw) else TYPED
        if isinstance(body, dict) and set(body) == {"obs"} and typed_names != {"obs"}:
            return RAW
        return TYPED

    union = Annotated[typed, Tag(TYPED)] | Annotated[raw, Tag(RAW)]  # type: ignore[valid-type]
    return Annotated[union, Discriminator(kind)]


def _recurrent_fields(policy: LoadedPolicy) -> dict[str, Any]:
    """The envelope's fields of a recurrent policy's step, besides `reward`."""
    recurrence = policy.runtime.recurrence
    if recurrence is None:
        return {}
    width = recurrence.action_width
    return {
        "prev_action": (
            Annotated[list[raw_number()], Field(min_length=width, max_length=width)] | None,  # type: ignore[misc]
            Field(
                default=None,
                description="The action taken at the episode's previous step, as `actions` "
                "gives it; default: the action the server answered then (zeros at the first "
                "step).",
            ),
        ),
        "state": (
            str | None,
            Field(
                default=None,
                min_length=1,
                max_length=_state_chars(recurrence.state_width + width),
                description="A state string from an earlier answer (`return_state`): this "
                "step continues from it instead of the state the server holds.",
            ),
        ),
        "return_state": (
            bool,
            Field(
                default=False,
                strict=True,
                description="Answer with `state`, an opaque string holding the state after "
                "this step, for clients that keep the state themselves.",
            ),
        ),
    }


def _envelope(
    name: str,
    observation: Any,
    sizes: tuple[int, ...],
    recurrent: dict[str, Any],
    published: bool = False,
) -> type[BaseModel]:
    mask = _published_mask_type(sizes) if published else _mask_type(sizes)
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid"),
        __doc__="An observation with what the server should know of its episode.",
        observation=(observation, Field(description="The observation, as the flat body.")),
        episode_id=(
            str | None,
            Field(
                default=None,
                min_length=1,
                max_length=128,
                description="The episode this decision belongs to: every decision of an "
                "episode is answered by the same policy version.",
            ),
        ),
        step=(
            Annotated[int, Field(ge=0, le=JSON_INT_MAX), BeforeValidator(whole_number)] | None,
            Field(
                default=None,
                strict=True,
                description="The step within the episode; counted by the server when absent.",
            ),
        ),
        action_mask=(
            mask,
            Field(
                default=None,
                description="Per action component, one boolean (or 0/1) per action: false "
                "forbids that action (discrete action spaces only).",
            ),
        ),
        reward=(
            float | None,
            Field(
                default=None,
                allow_inf_nan=False,
                description="The reward that followed the episode's previous decision: "
                "logged as that decision's reward and, for a recurrent policy, fed to the "
                "model as the previous reward (0 at the first step).",
            ),
        ),
        **recurrent,
    )


@dataclass(frozen=True)
class BodyTypes:
    """The body type of each kind of prediction route, for one policy version."""

    typed: Any | None  # /predict
    raw: Any  # /predict_raw
    either: Any  # /predict_deterministic, /distribution
    typed_batch: type[BaseModel] | None  # /predict_batch
    raw_batch: type[BaseModel]  # /predict_raw_batch


def body_types(policy: LoadedPolicy, max_batch: int) -> BodyTypes:
    """The body types the routes of `policy` accept, on the version's own models, which its
    vectorizer recognises."""
    width = policy.runtime.observation_width
    sizes = _mask_sizes(policy)
    recurrent = _recurrent_fields(policy)
    typed_model, raw_model = policy.observation_model, policy.raw_model
    raw = _flat_or_envelope(
        raw_model, _envelope("RawObservationEnvelope", raw_model, sizes, recurrent)
    )
    vector = Annotated[list[raw_number()], Field(min_length=width, max_length=width)]  # type: ignore[misc,valid-type]
    raw_item = _flat_or_envelope(
        vector, _envelope("RawVectorEnvelope", raw_model, sizes, recurrent)
    )
    raw_batch = _batch("RawObservationBatch", raw_item, max_batch, width)
    if typed_model is None:
        return BodyTypes(None, raw, raw, None, raw_batch)
    typed = _flat_or_envelope(
        typed_model, _envelope("ObservationEnvelope", typed_model, sizes, recurrent)
    )
    either_flat = _typed_or_raw(typed_model, raw_model)
    either = _flat_or_envelope(
        either_flat, _envelope("ObservationOrRawEnvelope", either_flat, sizes, recurrent)
    )
    typed_batch = _batch("ObservationBatch", typed, max_batch, None)
    return BodyTypes(typed, raw, either, typed_batch, raw_batch)


@dataclass(frozen=True)
class PublishedBodies:
    """What the OpenAPI document says each route takes: one named model per operation, never
    a union, so that OpenAPI Generator's SDKs take it as it is (`predict(observation)`) and
    name no model after a union member (`Observation1`). The routes accept more than they
    publish (see BodyTypes): every flat route also takes the envelope, which the document
    gives routes of its own, `.../step*`, whose body is `Step`."""

    observation: type[BaseModel]  # Observation, or RawObservation without schema fields
    raw: type[BaseModel]
    batch: type[BaseModel]
    raw_batch: type[BaseModel]
    step: type[BaseModel]
    step_batch: type[BaseModel]


def published_bodies(policy: LoadedPolicy, prefix: str, max_batch: int) -> PublishedBodies:
    """The bodies of `policy`'s routes as the document names them: `<prefix>Observation`,
    `<prefix>Step`, ..., the same names whatever else is served."""
    width = policy.runtime.observation_width
    raw = raw_observation_model(width, f"{prefix}RawObservation")
    typed = observation_model(policy.schema, f"{prefix}Observation")
    observation = raw if typed is None else typed
    vector = Annotated[list[raw_number()], Field(min_length=width, max_length=width)]  # type: ignore[misc,valid-type]
    recurrent = _recurrent_fields(policy)
    step = _envelope(f"{prefix}Step", observation, _mask_sizes(policy), recurrent, published=True)
    return PublishedBodies(
        observation=observation,
        raw=raw,
        batch=_batch(f"{prefix}ObservationBatch", observation, max_batch, None),
        raw_batch=_batch(f"{prefix}RawObservationBatch", vector, max_batch, width),
        step=step,
        step_batch=_batch(f"{prefix}StepBatch", step, max_batch, None),
    )


def _mask_type(sizes: tuple[int, ...]) -> Any:
    """One list of exactly `n` values per action component of `n` actions, or null; only
    null for a continuous action space."""
    if not sizes:
        return None
    rows = tuple(
        Annotated[list[MaskValue], Field(min_length=n, max_length=n, json_schema_extra=_ALLOWED)]
        for n in sizes
    )
    return tuple[rows] | None  # type: ignore[valid-type]


def _published_mask_type(sizes: tuple[int, ...]) -> Any:
    """The mask as the document gives it: where every component has as many actions, a list
    of booleans per component, which SDKs type as such; OpenAPI Generator types a tuple
    (`prefixItems`, for components of several sizes) as a list of anything. The routes take
    0/1 too (`_mask_type`)."""
    if len(set(sizes)) != 1:
        return _mask_type(sizes)
    [size] = set(sizes)
    row = Annotated[list[bool], Field(min_length=size, max_length=size, json_schema_extra=_ALLOWED)]
    return Annotated[list[row], Field(min_length=len(sizes), max_length=len(sizes))] | None


def _mask_sizes(policy: LoadedPolicy) -> tuple[int, ...]:
    space = policy.runtime.action_space
    return () if isinstance(space, Box) else categorical_sizes(space)


# The most bytes one JSON number of a body takes, with its separator and a space: a float's
# shortest repr is at most 24 characters, an integer as large as float32's maximum 39 digits.
NUMBER_BYTES = 48
# An envelope's own fields at their longest: an episode id of 128 characters, each escaped
# as a surrogate pair (12 bytes), a 19-digit step, and the keys.
ENVELOPE_BYTES = 128 * 12 + 100


def _state_chars(values: int) -> int:
    """The length of a state string of `values` float32 values (see carried.py)."""
    return 3 + -(-(16 + 4 * values) * 4 // 3)


def item_bytes(policy: LoadedPolicy) -> int:
    """The most bytes one batch item can take as JSON without padding: every number at its
    longest, in an envelope with a full action mask."""
    names = sum(len(f.name) + 8 for f in policy.schema.observations)
    mask = 7 * sum(_mask_sizes(policy)) + 4 * len(_mask_sizes(policy))
    recurrence = policy.runtime.recurrence
    carried = 0
    if recurrence is not None:  # a state string of the policy's size, and a previous action
        width = recurrence.state_width + recurrence.action_width
        carried = (16 + 4 * width) * 4 // 3 + 64 + NUMBER_BYTES * recurrence.action_width
    return (
        NUMBER_BYTES * (policy.runtime.observation_width + 1)
        + names
        + ENVELOPE_BYTES
        + mask
        + carried
    )


def batch_limit(policy: LoadedPolicy, max_observations: int, max_body_bytes: int) -> int:
    """The most observations a batch may hold: the configured limit, or fewer where that
    many of the longest observations would not fit the body limit, so that every batch
    the published limit allows can be sent."""
    return max(1, min(max_observations, (max_body_bytes - 64) // item_bytes(policy)))


def _batch(name: str, item: Any, max_batch: int, width: int | None) -> type[BaseModel]:
    what = "typed observations" if width is None else f"raw vectors of {width} values"
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"A list of {what} (or envelopes of them), answered in order.",
        observations=(list[item], Field(min_length=1, max_length=max_batch)),
    )


@dataclass(frozen=True)
class Validators:
    """The body types of one version as validators of raw request bytes."""

    types: BodyTypes
    adapters: dict[str, TypeAdapter[Any]]
    # Bodies without envelopes (a flat observation, a batch of them), validated into plain
    # dicts and lists and read straight into model rows: the common case, at a fraction of
    # the cost. A body they refuse goes through `adapters`, which decide what it is (an
    # envelope, say), and whose errors are the ones answered.
    flat: dict[str, tuple[TypeAdapter[Any], bool]]
    policy: LoadedPolicy

    def validate(self, kind: str, body: bytes) -> Any:
        return self.adapters[kind].validate_json(body)

    def flat_rows(self, kind: str, body: bytes) -> npt.NDArray[np.float32] | None:
        """Model rows of a body without envelopes, None for any other body."""
        found = self.flat.get(kind)
        if found is None:
            return None
        adapter, batch = found
        try:
            value = adapter.validate_json(body)
        except ValidationError:
            return None
        items: list[Any] = value["observations"] if batch else [value]
        if kind.startswith("raw"):
            return np.asarray([item if batch else item["obs"] for item in items], np.float32)
        return dict_rows(self.policy.schema, items)


def validators(policy: LoadedPolicy, max_observations: int, max_body_bytes: int) -> Validators:
    """Cached on the version: built once, used on every request. Its batches hold at most
    `batch_limit` observations."""
    key = f"api.validators.{max_observations}.{max_body_bytes}"
    found: Validators | None = policy.derived.get(key)
    if found is None:
        max_batch = batch_limit(policy, max_observations, max_body_bytes)
        types = body_types(policy, max_batch)
        adapters: dict[str, TypeAdapter[Any]] = {
            kind: TypeAdapter(getattr(types, kind))
            for kind in ("typed", "raw", "either", "typed_batch", "raw_batch")
            if getattr(types, kind) is not None
        }
        # /step_batch: the typed batch, whose items may be envelopes; raw without schema fields.
        adapters["step_batch"] = adapters.get("typed_batch") or adapters["raw_batch"]
        found = Validators(types, adapters, _flat(policy, max_batch), policy)
        policy.derived[key] = found
    return found


def _flat(policy: LoadedPolicy, max_batch: int) -> dict[str, tuple[TypeAdapter[Any], bool]]:
    width = policy.runtime.observation_width
    vector = Annotated[list[raw_number()], Field(min_length=width, max_length=width)]  # type: ignore[misc,valid-type]
    raw = with_config(ConfigDict(extra="forbid"))(TypedDict("RawDict", {"obs": vector}))  # type: ignore[operator]
    typed = observation_dict(policy.schema)
    flat: dict[str, tuple[TypeAdapter[Any], bool]] = {
        "raw": (TypeAdapter(raw), False),
        "raw_batch": (TypeAdapter(_batch_dict(vector, max_batch)), True),
    }
    if typed is not None:
        flat["typed"] = (TypeAdapter(typed), False)
        flat["typed_batch"] = (TypeAdapter(_batch_dict(typed, max_batch)), True)
    return flat


def _batch_dict(item: Any, max_batch: int) -> Any:
    # Built from values, not annotations: this module's annotations are strings, which
    # pydantic would resolve in whatever frame builds the adapter.
    observations = Annotated[list[item], Field(min_length=1, max_length=max_batch)]
    return with_config(ConfigDict(extra="forbid"))(
        TypedDict("FlatBatch", {"observations": observations})  # type: ignore[operator]
    )


@dataclass
class Parsed:
    """A validated body, unwrapped: the observations and what the envelopes said."""

    observations: list[Any]
    episodes: list[Episode] | None
    masks: list[list[list[Any]] | None] | None
    # The raw body's class in the version that validated it: versions with the same layout
    # read each other's bodies, but each has classes of its own.
    raw_model: type[BaseModel] | None = None
    # Model input rows, when the body was a flat batch read straight into them.
    rows: npt.NDArray[np.float32] | None = None

    @property
    def count(self) -> int:
        return len(self.observations) if self.rows is None else len(self.rows)

    @property
    def episode_id(self) -> str | None:
        return self.episodes[0].episode_id if self.episodes else None


def unwrap(items: Sequence[Any], raw_model: type[BaseModel] | None = None) -> Parsed:
    observations, episodes, masks = [], [], []
    enveloped = False
    for item in items:
        if isinstance(item, BaseModel) and "action_mask" in type(item).model_fields:
            enveloped = True
            observations.append(item.observation)  # type: ignore[attr-defined]
            episodes.append(
                Episode(
                    item.episode_id,  # type: ignore[attr-defined]
                    item.step,  # type: ignore[attr-defined]
                    item.reward,  # type: ignore[attr-defined]
                    getattr(item, "prev_action", None),
                    getattr(item, "state", None),
                    getattr(item, "return_state", False),
                )
            )
            masks.append(item.action_mask)  # type: ignore[attr-defined]
        else:
            observations.append(item)
            episodes.append(Episode())
            masks.append(None)
    if not enveloped:
        return Parsed(observations, None, None, raw_model)
    return Parsed(observations, episodes, masks, raw_model)


def rows_of(
    policy: LoadedPolicy, observations: Sequence[Any], raw_model: type[BaseModel] | None = None
) -> npt.NDArray[np.float32]:
    """Model input rows: typed observations, `{"obs": [...]}` bodies or plain vectors."""
    if any(isinstance(o, list) for o in observations):  # a raw batch: vectors, envelopes
        vectors = [o if isinstance(o, list) else o.obs for o in observations]
        return np.asarray(vectors, dtype=np.float32)
    rows = policy.vectorizer.rows(observations, raw_model or policy.raw_model)
    return np.asarray(rows, dtype=np.float32)


def same_layout(a: LoadedPolicy, b: LoadedPolicy) -> bool:
    """Whether a body validated for `a` is valid, and means the same, for `b`."""
    return a is b or (
        a.schema.observations == b.schema.observations
        and (a.runtime.observation_width == b.runtime.observation_width)
    )
