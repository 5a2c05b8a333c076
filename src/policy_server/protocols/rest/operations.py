"""The prediction routes' operation table, and the FastAPI routes and OpenAPI description
generated from it per policy and rebuilt on reloads. FastAPI only describes the routes from
the declared endpoint signatures, which never run: `handlers` answers the requests.

Per policy `P` the routes are `/policies/P/<route>` and `/policies/P/versions/{version}/<route>`;
the default policy's also stand at the top level (under its `url_path`, if any), as the
original server's did.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Body, Path, Query, Security

from policy_server.policy.loaded import LoadedPolicy
from policy_server.protocols.auth import KeyRing, header_scheme
from policy_server.protocols.rest.bodies import (
    published_bodies,
)
from policy_server.protocols.rest.errors import (
    ERROR_RESPONSES,
    POLICY_RESPONSES,
    TIMEOUT_RESPONSES,
    body_limit_responses,
)
from policy_server.protocols.rest.handlers import (
    SEED_MAX,
    BatchLimit,
    PredictionHandler,
    SchemaHandler,
)
from policy_server.protocols.rest.models import (
    PolicyInfo,
    distribution_model,
    prediction_batch_model,
    prediction_model,
)
from policy_server.protocols.routes import DirectRoute
from policy_server.serving.registry import PolicyEntry, PolicyRegistry
from policy_server.serving.service import PolicyService

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


class PolicyRoute(DirectRoute):
    """A native prediction or schema route."""


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
