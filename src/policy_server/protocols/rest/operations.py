"""Prediction routes. Each looks its policy up on every request and validates the body from
bytes in one call; FastAPI only builds the routes' OpenAPI description from the declared
endpoint signatures, which never run.

Per policy `P` the routes are `/policies/P/<route>` and `/policies/P/versions/{version}/<route>`;
the default policy's also stand at the top level (under its `url_path`, if any), as the
original server's did.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import orjson
from fastapi import Body, Path, Query, Security
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from policy_server.errors import FieldError, InvalidObservation, InvalidRows
from policy_server.policy.loaded import LoadedPolicy
from policy_server.protocols.auth import KeyRing, header_scheme
from policy_server.protocols.rest.bodies import (
    Parsed,
    batch_limit,
    flat_rows,
    published_bodies,
    rows_of,
    same_layout,
    unwrap,
    validators,
)
from policy_server.protocols.rest.errors import (
    ERROR_RESPONSES,
    POLICY_RESPONSES,
    TIMEOUT_RESPONSES,
    body_limit_responses,
)
from policy_server.protocols.rest.models import (
    FieldInfo,
    PolicyInfo,
    RecurrentInfo,
    distribution_model,
    prediction_batch_model,
    prediction_model,
)
from policy_server.serving.registry import PolicyEntry, PolicyRegistry, PolicyVersion
from policy_server.serving.service import Group, PolicyService, Prediction

SEED_MAX = 2**63 - 1
_DIGITS = re.compile(rb"^[0-9]{1,19}$")
Handler = Callable[[Request], Awaitable[Response]]
# Which body a route accepts (an attribute of BodyTypes).
BodyKind = Literal["typed", "raw", "either", "typed_batch", "raw_batch", "step_batch"]
Mode = Literal["sample", "mode", "distribution"]


@dataclass(frozen=True)
class Operation:
    path: str
    operation_id: str
    kind: BodyKind
    mode: Mode
    summary: str
    # The body the OpenAPI document names (an attribute of PublishedBodies), and the name of
    # the SDK methods' parameter for it.
    published: str
    parameter: str

    @property
    def batch(self) -> bool:
        return self.kind.endswith("_batch")

    @property
    def seeded(self) -> bool:
        return self.mode == "sample"

    @property
    def envelope(self) -> bool:
        return self.published.startswith("step")


OPERATIONS = (
    Operation(
        "/predict",
        "predict",
        "typed",
        "sample",
        "Sample the action for a typed observation",
        "observation",
        "observation",
    ),
    Operation(
        "/predict_batch",
        "predictBatch",
        "typed_batch",
        "sample",
        "Sample the actions for a list of typed observations",
        "batch",
        "batch",
    ),
    Operation(
        "/predict_raw",
        "predictRaw",
        "raw",
        "sample",
        "Sample the action for a raw observation",
        "raw",
        "observation",
    ),
    Operation(
        "/predict_raw_batch",
        "predictRawBatch",
        "raw_batch",
        "sample",
        "Sample the actions for a list of raw observation vectors",
        "raw_batch",
        "batch",
    ),
    Operation(
        "/predict_deterministic",
        "predictDeterministic",
        "either",
        "mode",
        "The most likely action (argmax per component, the mean if continuous)",
        "observation",
        "observation",
    ),
    Operation(
        "/distribution",
        "distribution",
        "either",
        "distribution",
        "The exact action distribution, computed from the policy's logits",
        "observation",
        "observation",
    ),
    # The envelope's own operations: the flat routes above take it too, but a body the
    # document gave as a union of the two would make SDKs wrap every observation.
    Operation(
        "/step",
        "step",
        "either",
        "sample",
        "Sample the action for one step of an episode (an observation with its episode "
        "and action mask)",
        "step",
        "step",
    ),
    Operation(
        "/step_batch",
        "stepBatch",
        "step_batch",
        "sample",
        "Sample the actions for a list of steps",
        "step_batch",
        "batch",
    ),
    Operation(
        "/step_deterministic",
        "stepDeterministic",
        "either",
        "mode",
        "The most likely action for one step of an episode",
        "step",
        "step",
    ),
    Operation(
        "/step_distribution",
        "stepDistribution",
        "either",
        "distribution",
        "The exact action distribution for one step of an episode",
        "step",
        "step",
    ),
)


_JSON_TYPE = (b"content-type", b"application/json")


class JSONBytes(Response):
    """A response of JSON bytes with its two headers built directly: Starlette's `__init__`
    renders, checks the media type and merges headers for every response."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int = 200) -> None:
        self.status_code = status_code
        self.body = body
        self.background = None
        self.raw_headers = [(b"content-length", b"%d" % len(body)), _JSON_TYPE]


def json_response(content: Any, status: int = 200) -> Response:
    return JSONBytes(orjson.dumps(content), status)


class PolicyRoute(APIRoute):
    """A route whose request handling is ours; FastAPI describes it from `endpoint`.

    It answers without FastAPI's per-request wrapping (two exit stacks for dependencies
    that never run here, and a second exception wrapper): an error goes on to the app's
    ExceptionMiddleware, which renders it with the same handlers."""

    def __init__(self, path: str, endpoint: Callable[..., Any], handler: Handler, **kw: Any):
        self._handler = handler
        super().__init__(path, endpoint, **kw)
        self.app = self._answer
        # The router tries every route in turn, and most are some other policy's or
        # operation's: a string test turns those away before the regular expression.
        self._exact = "{" not in path
        self._prefix = path.split("{", 1)[0]

    def get_route_handler(self) -> Handler:  # type: ignore[override]
        return self._handler

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # Under a root_path, Starlette's own matching (which strips it) decides.
        if scope["type"] == "http" and not scope.get("root_path"):
            path = scope["path"]
            if path != self.path if self._exact else not path.startswith(self._prefix):
                return Match.NONE, {}
        return super().matches(scope)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._handler(Request(scope, receive, send))
        await response(scope, receive, send)


@dataclass
class Context:
    service: PolicyService
    keys: KeyRing
    max_body_bytes: int = 8 * 1024**2
    # The route sets built last, by what they describe; see build_routes.
    built: dict[tuple[object, ...], tuple[list[PolicyRoute], list[PolicyRoute]]] = field(
        default_factory=dict
    )

    @property
    def registry(self) -> PolicyRegistry:
        return self.service.registry


@dataclass(frozen=True)
class BatchLimit:
    """A policy's configured batch limit, lowered where the body limit would not take it."""

    max_observations: int
    max_body_bytes: int

    def of(self, policy: LoadedPolicy) -> int:
        return batch_limit(policy, self.max_observations, self.max_body_bytes)


@dataclass(frozen=True)
class RouteSet:
    """Where a policy's routes stand and how their operations are named."""

    base: str  # path prefix
    name: str | None  # None: the default policy, looked up per request
    policy: str  # the policy whose schema describes the routes now
    prefix: str  # component name prefix ("" for the original names)
    op_prefix: str  # operation id prefix ("" for the original ids)
    tag: str


def pascal(name: str) -> str:
    parts = re.split(r"[^A-Za-z0-9]+", name)
    text = "".join(p[:1].upper() + p[1:] for p in parts if p)
    return text if text[:1].isalpha() else "P" + text


def camel(name: str) -> str:
    text = pascal(name)
    return text[:1].lower() + text[1:]


def routes_shape(registry: PolicyRegistry) -> tuple[object, ...]:
    """What the generated routes depend on: the default policy, and each policy's primary
    version (its schema describes the routes) and the keys that open it."""
    return (
        registry.default_name,
        *(
            (
                entry.name,
                None if entry.primary is None else (entry.primary.version, entry.primary.loaded_at),
                entry.settings.max_batch_observations,
                tuple(
                    v.policy.schema.parameters.api_key
                    for v in entry.versions.values()
                    if v.policy is not None
                ),
            )
            for entry in registry.entries()
        ),
    )


def build_routes(context: Context) -> list[PolicyRoute]:
    """Every policy's routes, described by each policy's primary version."""
    registry = context.registry
    routes: list[PolicyRoute] = []
    # The envelope's routes come after every other: routes are matched in order, so the
    # flat routes' requests never try them.
    steps: list[PolicyRoute] = []
    models: dict[tuple[str, str], Any] = {}
    built: dict[tuple[object, ...], tuple[list[PolicyRoute], list[PolicyRoute]]] = {}
    for entry in registry.entries():
        primary = entry.primary
        if primary is None:
            continue
        policy = primary.loaded
        url_path = policy.schema.parameters.url_path
        sets = [
            RouteSet(
                f"/policies/{entry.name}",
                entry.name,
                entry.name,
                pascal(entry.name),
                camel(entry.name),
                entry.name,
            )
        ]
        if entry.name == registry.default_name:
            sets.append(RouteSet(url_path, None, entry.name, "", "", "predictions"))
        elif url_path:
            sets.append(
                RouteSet(
                    url_path,
                    entry.name,
                    entry.name,
                    pascal(entry.name),
                    camel(entry.name) + "AtUrlPath",
                    entry.name,
                )
            )
        keyed = context.keys.policy_keys(entry) is not None
        for route_set in sets:
            # A route set whose policy did not change is reused: building FastAPI routes and
            # their models is the costly part of a reload, and it runs on the event loop.
            limit = entry.settings.max_batch_observations
            key = (route_set, primary.version, primary.loaded_at, keyed, limit)
            found = context.built.get(key)
            if found is None:
                found = _routes_of(context, entry, policy, route_set, models)
            built[key] = found
            routes += found[0]
            steps += found[1]
    context.built = built
    return routes + steps


def _routes_of(
    context: Context,
    entry: PolicyEntry,
    policy: LoadedPolicy,
    rs: RouteSet,
    models: dict[tuple[str, str], Any],
) -> tuple[list[PolicyRoute], list[PolicyRoute]]:
    """The route set's flat routes, and its envelope routes."""
    key = (rs.policy, rs.prefix)
    if key not in models:
        limit = BatchLimit(entry.settings.max_batch_observations, context.max_body_bytes)
        models[key] = _docs_models(policy, rs.prefix, limit.of(policy))
    published, responses = models[key]
    errors = body_limit_responses(context.max_body_bytes) | POLICY_RESPONSES | TIMEOUT_RESPONSES
    dependencies = [Security(header_scheme)] if context.keys.policy_keys(entry) is not None else []
    routes: list[PolicyRoute] = []
    steps: list[PolicyRoute] = []
    for pinned in (False, True):
        base = rs.base + ("/versions/{version}" if pinned else "")
        suffix = "Version" if pinned else ""
        for operation in OPERATIONS:
            if operation.kind in ("typed", "typed_batch") and not policy.schema.has_observations:
                continue
            op_id = _op_id(rs.op_prefix, operation.operation_id) + suffix
            body_type = getattr(published, operation.published)
            (steps if operation.envelope else routes).append(
                PolicyRoute(
                    base + operation.path,
                    _docs_endpoint(body_type, operation.seeded, pinned),
                    PredictionHandler(context, operation, rs.name, pinned),
                    methods=["POST"],
                    operation_id=op_id,
                    summary=operation.summary,
                    tags=[rs.tag],
                    response_model=responses[operation.mode if not operation.batch else "batch"],
                    responses=errors,
                    dependencies=dependencies,
                    # OpenAPI Generator names the SDK methods' body parameter after it.
                    openapi_extra={"x-codegen-request-body-name": operation.parameter},
                )
            )
        routes.append(
            PolicyRoute(
                base + "/schema",
                _docs_endpoint(None, False, pinned),
                SchemaHandler(context, rs.name, pinned),
                methods=["GET"],
                operation_id=_op_id(rs.op_prefix, "getSchema") + suffix,
                summary="The observation fields and the action space of the policy",
                tags=[rs.tag] if rs.prefix else ["policy"],
                response_model=PolicyInfo,
                responses={403: ERROR_RESPONSES[403]} | POLICY_RESPONSES,
                dependencies=dependencies,
            )
        )
    return routes, steps


def _op_id(prefix: str, operation: str) -> str:
    return prefix + operation[:1].upper() + operation[1:] if prefix else operation


def _docs_models(policy: LoadedPolicy, prefix: str, max_batch: int) -> tuple[Any, dict[str, Any]]:
    space = policy.runtime.action_space
    prediction = prediction_model(space, prefix)
    responses = {
        "sample": prediction,
        "mode": prediction,
        "batch": prediction_batch_model(prediction, prefix),
        "distribution": distribution_model(space, prefix),
    }
    return published_bodies(policy, prefix, max_batch), responses


def _docs_endpoint(body_type: Any, seeded: bool, pinned: bool) -> Callable[..., Any]:
    """A function whose signature tells FastAPI what the route takes; it is never called."""

    async def endpoint(**_: Any) -> None:  # pragma: no cover - never called
        raise NotImplementedError

    parameters = []
    if pinned:
        parameters.append(
            inspect.Parameter(
                "version",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[str, Path(description="The version that must answer.")],
            )
        )
    if body_type is not None:
        parameters.append(
            inspect.Parameter(
                "body",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[body_type, Body()],
            )
        )
    if seeded:
        seed = Query(ge=0, le=SEED_MAX, description="Seed for a reproducible sample.")
        parameters.append(
            inspect.Parameter(
                "seed",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[int | None, seed],
            )
        )
    endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return endpoint


class _Handler:
    def __init__(self, context: Context, name: str | None, pinned: bool) -> None:
        self.context = context
        self.name = name
        self.pinned = pinned

    def _entry(self, request: Request) -> PolicyEntry:
        entry = self.context.registry.entry(self.name)
        self.context.keys.check(request, entry)
        return entry

    def _pinned(self, request: Request, entry: PolicyEntry) -> PolicyVersion | None:
        """The version the path names. Looked up only once the body has arrived, and leased
        in the same step of the event loop: a reload meanwhile is seen, never half seen."""
        if not self.pinned:
            return None
        return self.context.registry.resolve(entry.name, request.path_params["version"])


class SchemaHandler(_Handler):
    async def __call__(self, request: Request) -> Response:
        entry = self._entry(request)
        target = self._pinned(request, entry) or entry.route(None)
        _label(request, target)
        return json_response(policy_info(target.loaded).model_dump())


class PredictionHandler(_Handler):
    def __init__(self, context: Context, operation: Operation, name: str | None, pinned: bool):
        super().__init__(context, name, pinned)
        self.operation = operation

    async def __call__(self, request: Request) -> Response:
        entry = self._entry(request)
        operation = self.operation
        seed = _seed(request) if operation.seeded else None
        body = await _json_body(request)
        # From here to the service's lease, nothing awaits: the versions chosen stay loaded.
        pinned = self._pinned(request, entry)
        reference = pinned or entry.primary or entry.route(None)
        limit = BatchLimit(entry.settings.max_batch_observations, self.context.max_body_bytes)
        parsed = _parse(reference.loaded, operation, body, limit)
        if operation.mode == "distribution":
            return await self._distribution(request, entry, pinned, parsed, body, limit)
        groups = [
            self._group(version, reference, parsed, body, limit, indices)
            for version, indices in self._groups(entry, pinned, parsed)
        ]
        try:
            answered = await self.context.service.predict_groups(
                groups, deterministic=operation.mode == "mode", seed=seed, pinned=self.pinned
            )
        except InvalidRows as error:
            raise _named(error, operation.batch, range(parsed.count)) from None
        _label(request, groups[0].version)
        answers: Sequence[Prediction | None] = answered[0]
        if len(groups) > 1:
            answers = [None] * parsed.count
            for group, predictions in zip(groups, answered, strict=True):
                for index, prediction in zip(group.positions or (), predictions, strict=True):
                    answers[index] = prediction
        if operation.batch:
            return json_response({"predictions": answers})
        return json_response(answers[0])

    def _groups(
        self, entry: PolicyEntry, pinned: PolicyVersion | None, parsed: Parsed
    ) -> list[tuple[PolicyVersion, list[int]]]:
        """Which version answers which observation: sticky per episode, else one draw per
        request from the traffic split."""
        count = parsed.count
        if pinned is not None:
            return [(pinned, list(range(count)))]
        episodes = parsed.episodes
        if episodes is None or all(e.episode_id is None for e in episodes):
            return [(entry.route(None), list(range(count)))]
        unpinned = entry.route(None)
        groups: dict[int, tuple[PolicyVersion, list[int]]] = {}
        for index, episode in enumerate(episodes):
            version = entry.route(episode.episode_id) if episode.episode_id else unpinned
            groups.setdefault(id(version), (version, []))[1].append(index)
        return list(groups.values())

    def _group(
        self,
        version: PolicyVersion,
        reference: PolicyVersion,
        parsed: Parsed,
        body: bytes,
        limit: BatchLimit,
        indices: list[int],
    ) -> Group:
        """The rows of the observations at `indices`, made for `version`'s layout."""
        if not same_layout(reference.loaded, version.loaded):
            parsed = _parse(version.loaded, self.operation, body, limit)
        whole = len(indices) == parsed.count
        episodes = _pick(parsed.episodes, indices, whole)
        masks = _pick(parsed.masks, indices, whole)
        if parsed.rows is not None:
            rows = parsed.rows if whole else parsed.rows[indices]
        else:
            observations = parsed.observations
            observations = observations if whole else [observations[i] for i in indices]
            rows = rows_of(version.loaded, observations, parsed.raw_model)
        return Group(version, rows, episodes, masks, None if whole else indices)

    async def _distribution(
        self,
        request: Request,
        entry: PolicyEntry,
        pinned: PolicyVersion | None,
        parsed: Parsed,
        body: bytes,
        limit: BatchLimit,
    ) -> Response:
        version = pinned or entry.route(parsed.episode_id)
        if not same_layout((pinned or entry.primary or version).loaded, version.loaded):
            parsed = _parse(version.loaded, self.operation, body, limit)
        rows = rows_of(version.loaded, parsed.observations, parsed.raw_model)
        try:
            result = await self.context.service.distribution(
                version, rows, parsed.masks, parsed.episodes
            )
        except InvalidRows as error:
            raise _named(error, False, [0]) from None
        answer = asdict(result)
        if parsed.episode_id is not None:
            answer["episode_id"] = parsed.episode_id
        _label(request, version)
        return json_response(answer)


def _pick(values: list[Any] | None, indices: list[int], whole: bool) -> list[Any] | None:
    if values is None or whole:
        return values
    return [values[i] for i in indices]


def _parse(policy: LoadedPolicy, operation: Operation, body: bytes, limit: BatchLimit) -> Parsed:
    checks = validators(policy, limit.of(policy))
    flat = checks.flat_batch(operation.kind, body)
    if flat is not None:
        return Parsed([], None, None, rows=flat_rows(policy, operation.kind, flat))
    try:
        value = checks.validate(operation.kind, body)
    except ValidationError as error:
        raise RequestValidationError(
            _refusal(checks.adapters[operation.kind], body, error)
        ) from None
    return unwrap(value.observations if operation.batch else [value], policy.raw_model)


def _refusal(adapter: TypeAdapter[Any], body: bytes, error: ValidationError) -> list[Any]:
    """The errors FastAPI's own body handling gives for a refused body: the standard
    library's parse (NaN and Infinity reach the field that holds them), then validation of
    the Python value, whose messages FastAPI's users know. Only refused bodies pay for it.
    A body that cannot be decoded at all (bad syntax, bad UTF-8, too deep, a number too
    long) is one kind of error, `json_invalid`, answered 422."""
    if not body:
        return [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as decode:
        message = getattr(decode, "msg", None) or str(decode) or type(decode).__name__
        where = ("body", getattr(decode, "pos", 0))
        return [
            {
                "type": "json_invalid",
                "loc": where,
                "msg": "JSON decode error",
                "ctx": {"error": message},
            }
        ]
    try:
        adapter.validate_python(value, from_attributes=True)  # as FastAPI validates bodies
    except ValidationError as python:
        error = python
    except RecursionError:
        pass
    return [e | {"loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]


async def _json_body(request: Request) -> bytes:
    content_type = request.headers.get("content-type")
    if content_type is not None and "json" not in content_type.lower():
        raise RequestValidationError(
            [{"type": "content_type", "loc": ("body",), "msg": "not a JSON body"}]
        )
    return await request.body()


def _seed(request: Request) -> int | None:
    values = request.query_params.getlist("seed")
    if not values:
        return None
    raw = values[-1].encode()
    if len(values) > 1 or not _DIGITS.match(raw) or int(raw) > SEED_MAX:
        message = f"Input should be one whole number from 0 to {SEED_MAX}"
        raise RequestValidationError(
            [{"type": "int_parsing", "loc": ("query", "seed"), "msg": message}]
        )
    return int(raw)


def _named(error: InvalidRows, batch: bool, indices: Sequence[int]) -> InvalidObservation:
    """The service's row errors, named by the request's own layout."""
    fields = []
    for row in error.rows:
        where = f"observations.{indices[row.row]}" if batch else ""
        name = ".".join(part for part in (where, row.field) if part) or "body"
        fields.append(FieldError(name, row.message))
    return InvalidObservation(error.message, fields)


def _label(request: Request, version: PolicyVersion) -> None:
    """Tell the request observer which policy and version answered."""
    request.scope["policy_server.answered"] = (version.name, version.version)


def policy_info(policy: LoadedPolicy) -> PolicyInfo:
    parameters = policy.schema.parameters
    return PolicyInfo(
        name=policy.name,
        version=policy.version,
        runtime=policy.runtime.name,
        observations=[
            FieldInfo(
                name=f.name,
                type=f.type.value,
                description=f.description,
                minimum=f.minimum,
                maximum=f.maximum,
                min_items=f.min_items,
                max_items=f.max_items,
            )
            for f in policy.schema.observations
        ],
        observation_width=policy.runtime.observation_width,
        action_space=policy.runtime.action_space.describe(),
        discrete=parameters.discrete,
        tuple=parameters.tuple,
        url_path=parameters.url_path,
        recurrent=RecurrentInfo.of(policy.runtime.recurrence),
    )
