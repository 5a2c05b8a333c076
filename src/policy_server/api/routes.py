"""Routes of one policy. Handlers only translate between HTTP and the policy service.

No `from __future__ import annotations` here: FastAPI must see the per-policy request models,
which are built at run time, as real objects in the handlers' signatures.
"""

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, Discriminator, Tag
from starlette.responses import Response

from policy_server.api.models import FieldInfo, PolicyInfo, distribution_model, prediction_model
from policy_server.registry import LoadedPolicy
from policy_server.service import PolicyService

SeedQuery = Annotated[
    int | None,
    Query(ge=0, le=2**63 - 1, description="Seed for a reproducible sample of the action."),
]


def json_response(content: Any) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def policy_router(service: PolicyService, policy: LoadedPolicy) -> APIRouter:
    """The prediction routes of `policy`, under its `url_path` prefix."""
    router = APIRouter(prefix=policy.schema.parameters.url_path)
    space = policy.runtime.action_space
    prediction = prediction_model(space)
    distribution = distribution_model(space)
    Raw = policy.raw_model
    Typed = policy.observation_model
    Either = _typed_or_raw(Typed, Raw) if Typed is not None else Raw

    if Typed is not None:

        @router.post(
            "/predict",
            operation_id="predict",
            tags=["predictions"],
            response_model=prediction,
            summary="Sample the policy's action for a typed observation",
        )
        async def predict(observation: Typed, seed: SeedQuery = None) -> Response:  # type: ignore[valid-type]
            result = await service.predict(policy, [observation], seed=seed)
            return json_response(result[0])

    @router.post(
        "/predict_raw",
        operation_id="predictRaw",
        tags=["predictions"],
        response_model=prediction,
        summary="Sample the policy's action for a raw observation vector",
    )
    async def predict_raw(observation: Raw, seed: SeedQuery = None) -> Response:  # type: ignore[valid-type]
        result = await service.predict(policy, [observation], seed=seed)
        return json_response(result[0])

    @router.post(
        "/predict_deterministic",
        operation_id="predictDeterministic",
        tags=["predictions"],
        response_model=prediction,
        summary="The most likely action (argmax per component, the mean if continuous)",
    )
    async def predict_deterministic(observation: Either) -> Response:  # type: ignore[valid-type]
        result = await service.predict(policy, [observation], deterministic=True)
        return json_response(result[0])

    @router.post(
        "/distribution",
        operation_id="distribution",
        tags=["predictions"],
        response_model=distribution,
        summary="The exact action distribution, computed from the policy's logits",
    )
    async def get_distribution(observation: Either) -> Response:  # type: ignore[valid-type]
        return json_response(await service.distribution(policy, observation))

    @router.get(
        "/schema",
        operation_id="getSchema",
        tags=["policy"],
        response_model=PolicyInfo,
        summary="The observation fields and the action space of the policy",
    )
    async def get_schema() -> PolicyInfo:
        return policy_info(policy)

    return router


def _typed_or_raw(typed: type[BaseModel], raw: type[BaseModel]) -> Any:
    """A body that is either the typed Observation or the raw `{"obs": [...]}` form."""
    typed_names = set(typed.model_fields)

    def kind(body: Any) -> str:
        if isinstance(body, dict) and set(body) == {"obs"} and typed_names != {"obs"}:
            return "raw"
        return "raw" if isinstance(body, raw) else "typed"

    union = Annotated[typed, Tag("typed")] | Annotated[raw, Tag("raw")]  # type: ignore[valid-type]
    return Annotated[union, Discriminator(kind), Body()]


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
    )
