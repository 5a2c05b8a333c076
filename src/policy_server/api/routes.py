"""Routes of one policy. Handlers only translate between HTTP and the policy service.

No `from __future__ import annotations` here: FastAPI must see the per-policy request models,
which are built at run time, as real objects in the handlers' signatures.
"""

import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Body, Query
from fastapi.routing import APIRoute
from pydantic import BaseModel, Discriminator, Field, Tag, create_model
from starlette.requests import Request
from starlette.responses import Response

from policy_server.api.errors import ERROR_RESPONSES
from policy_server.api.models import (
    FieldInfo,
    PolicyInfo,
    distribution_model,
    prediction_batch_model,
    prediction_model,
)
from policy_server.observation import FLOAT32_MAX
from policy_server.registry import LoadedPolicy
from policy_server.service import PolicyService

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
SeedQuery = Annotated[
    int | None,
    Query(ge=0, le=2**63 - 1, description="Seed for a reproducible sample of the action."),
]


def json_response(content: Any) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


class FastJSONRequest(Request):
    """Parses bodies with orjson; strict JSON that orjson refuses (NaN, Infinity) falls back
    to the standard parser, so that validation names the offending field as before."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError:
                self._json = json.loads(body)
        return self._json


class FastJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(FastJSONRequest(request.scope, request.receive))

        return route


def add_policy_routes(
    router: APIRouter,
    service: PolicyService,
    policy: LoadedPolicy,
    max_batch_observations: int,
    dependencies: Sequence[Any],
) -> None:
    """Add the prediction routes of `policy`, under its `url_path` prefix, to `router`.

    Routes go straight onto the app's router: FastAPI's include_router adds a matching layer
    that costs a measurable share of a prediction's time (see bench/RESULTS.md).
    """
    prefix = policy.schema.parameters.url_path

    def post(path: str, operation_id: str, response_model: Any, summary: str) -> Decorator:
        return router.post(
            prefix + path,
            operation_id=operation_id,
            tags=["predictions"],
            response_model=response_model,
            summary=summary,
            dependencies=list(dependencies),
            responses=ERROR_RESPONSES,
        )

    space = policy.runtime.action_space
    prediction = prediction_model(space)
    batch = prediction_batch_model(prediction)
    distribution = distribution_model(space)
    Raw = policy.raw_model
    Typed = policy.observation_model
    Either = _typed_or_raw(Typed, Raw) if Typed is not None else Raw
    RawBatch = _raw_batch_model(policy.runtime.observation_width, max_batch_observations)

    if Typed is not None:

        @post(
            "/predict", "predict", prediction, "Sample the policy's action for a typed observation"
        )
        async def predict(observation: Typed, seed: SeedQuery = None) -> Response:  # type: ignore[valid-type]
            result = await service.predict(policy, [observation], seed=seed)
            return json_response(result[0])

        TypedBatch = _typed_batch_model(Typed, max_batch_observations)

        @post(
            "/predict_batch",
            "predictBatch",
            batch,
            "Sample the policy's actions for a list of typed observations",
        )
        async def predict_batch(body: TypedBatch, seed: SeedQuery = None) -> Response:  # type: ignore[valid-type]
            observations = body.observations  # type: ignore[attr-defined]
            result = await service.predict(policy, observations, seed=seed)
            return json_response({"predictions": result})

    @post(
        "/predict_raw_batch",
        "predictRawBatch",
        batch,
        "Sample the policy's actions for a list of raw observation vectors",
    )
    async def predict_raw_batch(body: RawBatch, seed: SeedQuery = None) -> Response:  # type: ignore[valid-type]
        rows = np.asarray(body.observations, dtype=np.float32)  # type: ignore[attr-defined]
        result = await service.predict_rows(policy, rows, seed=seed)
        return json_response({"predictions": result})

    @post(
        "/predict_raw",
        "predictRaw",
        prediction,
        "Sample the policy's action for a raw observation vector",
    )
    async def predict_raw(observation: Raw, seed: SeedQuery = None) -> Response:  # type: ignore[valid-type]
        result = await service.predict(policy, [observation], seed=seed)
        return json_response(result[0])

    @post(
        "/predict_deterministic",
        "predictDeterministic",
        prediction,
        "The most likely action (argmax per component, the mean if continuous)",
    )
    async def predict_deterministic(observation: Either) -> Response:  # type: ignore[valid-type]
        result = await service.predict(policy, [observation], deterministic=True)
        return json_response(result[0])

    @post(
        "/distribution",
        "distribution",
        distribution,
        "The exact action distribution, computed from the policy's logits",
    )
    async def get_distribution(observation: Either) -> Response:  # type: ignore[valid-type]
        return json_response(await service.distribution(policy, observation))

    @router.get(
        prefix + "/schema",
        operation_id="getSchema",
        tags=["policy"],
        response_model=PolicyInfo,
        summary="The observation fields and the action space of the policy",
        dependencies=list(dependencies),
        responses=ERROR_RESPONSES,
    )
    async def get_schema() -> PolicyInfo:
        return policy_info(policy)


def _typed_batch_model(typed: type[BaseModel], max_count: int) -> type[BaseModel]:
    return create_model(
        "ObservationBatch",
        __doc__="Typed observations, answered in order.",
        observations=(list[typed], Field(min_length=1, max_length=max_count)),  # type: ignore[valid-type]
    )


def _raw_batch_model(width: int, max_count: int) -> type[BaseModel]:
    number = Annotated[
        float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)
    ]
    vector = Annotated[list[number], Field(min_length=width, max_length=width)]
    return create_model(
        "RawObservationBatch",
        __doc__=f"Raw observation vectors of {width} values each, answered in order.",
        observations=(list[vector], Field(min_length=1, max_length=max_count)),
    )


def _typed_or_raw(typed: type[BaseModel], raw: type[BaseModel]) -> Any:
    """A body that is either the typed Observation or the raw `{"obs": [...]}` form."""
    typed_names = set(typed.model_fields)

    def kind(body: Any) -> str:
        if isinstance(body, dict) and set(body) == {"obs"} and typed_names != {"obs"}:
            return "raw"
        return "raw" if isinstance(body, raw) else "typed"

    union = Annotated[typed, Tag("typed")] | Annotated[raw, Tag("raw")]  # type: ignore[valid-type]
    # Its own title, so that SDK generators name it apart from the typed Observation.
    return Annotated[union, Discriminator(kind), Body(title="ObservationOrRaw")]


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
