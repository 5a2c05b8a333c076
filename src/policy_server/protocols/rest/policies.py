"""Routes about the policies themselves: the listing, readiness, and the admin routes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Security
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from policy_server.errors import NotAuthenticated, PolicyLoadError, PolicyNotFound
from policy_server.loading.rollout_spec import RolloutSpec
from policy_server.protocols.auth import KeyRing, header_scheme, key_first
from policy_server.protocols.rest.errors import ERROR_RESPONSES, POLICY_RESPONSES, ErrorResponse
from policy_server.protocols.rest.models import (
    PolicyList,
    PolicyListing,
    RecurrentInfo,
    VersionInfo,
)
from policy_server.protocols.rest.responses import json_response
from policy_server.serving.lifecycle import PolicyManager
from policy_server.serving.registry import PolicyEntry, PolicyRegistry
from policy_server.serving.rollout.controller import RolloutController

_CONFLICT = (
    "A rollout is already under way, the server has no decision log, or no version has all "
    "the traffic"
)


class TrafficChange(BaseModel):
    """New weights (and shadow) for a policy's versions; they hold until changed again."""

    model_config = ConfigDict(extra="forbid")

    traffic: dict[str, float] | None = Field(
        description="Weight per version; null: the newest ready version answers everything."
    )
    shadow: str | None = Field(default=None, description="A version to score as a shadow.")


def listing(registry: PolicyRegistry, entry: PolicyEntry) -> PolicyListing:
    versions = []
    for version in entry.ordered():
        policy = version.policy
        versions.append(
            VersionInfo(
                version=version.version,
                state=version.state.value,
                reason=version.reason,
                action_space=None if policy is None else policy.runtime.action_space.describe(),
                runtime=None if policy is None else policy.runtime.name,
                recurrent=None if policy is None else RecurrentInfo.of(policy.runtime.recurrence),
                traffic=round(entry.weight_of(version), 6),
                shadow=entry.shadow == version.version,
                loaded_at=version.loaded_at,
            )
        )
    return PolicyListing(
        name=entry.name,
        url=f"/policies/{entry.name}",
        default=entry.name == registry.default_name,
        traffic=entry.traffic,
        shadow=entry.shadow,
        versions=versions,
    )


def add_policy_routes(
    router: APIRouter,
    registry: PolicyRegistry,
    manager: PolicyManager,
    keys: KeyRing,
    rollouts: RolloutController | None = None,
) -> None:
    security = [Security(header_scheme)]
    rollout_responses = ERROR_RESPONSES | {
        404: POLICY_RESPONSES[404],
        409: {"model": ErrorResponse, "description": _CONFLICT},
    }

    if rollouts is not None:

        @router.get(
            "/policies/{name}/rollout",
            operation_id="getRollout",
            tags=["rollouts"],
            summary="A policy's rollout: its state, weight, evidence and history",
            responses=rollout_responses,
            dependencies=security,
        )
        async def get_rollout(name: str, request: Request) -> Response:
            entry = registry.entry(name)
            if not keys.opens(request, entry):
                try:
                    keys.check_admin(request)
                except NotAuthenticated:
                    keys.check(request, entry)  # says "missing" or "wrong" key
            return json_response(await rollouts.read(name))

    @router.get(
        "/policies",
        operation_id="listPolicies",
        tags=["policies"],
        summary="The policies your key opens, with their versions, states and traffic",
        response_model=PolicyList,
        responses={403: ERROR_RESPONSES[403]},
        dependencies=security,
    )
    async def list_policies(request: Request) -> Response:
        keys.check_any(request, registry.entries())
        opened = [e for e in registry.entries() if keys.opens(request, e)]
        body = PolicyList(
            default=registry.default_name, policies=[listing(registry, e) for e in opened]
        )
        return json_response(body.model_dump())

    @router.get(
        "/ready",
        operation_id="ready",
        tags=["health"],
        summary="Readiness: 200 when every policy has a ready version, else 503",
        responses={503: {"description": "Some policy has no ready version yet"}},
    )
    async def ready() -> Response:
        waiting = [e.name for e in registry.entries() if e.primary is None]
        if registry.all_ready():
            return json_response({"ready": True, "waiting": []})
        return json_response({"ready": False, "waiting": waiting}, 503)

    if keys.admin_key is None:
        return

    # The admin key is checked before the body is read (see `key_first`).
    admin_router = APIRouter(route_class=key_first(keys.check_admin))
    admin = security

    @admin_router.post(
        "/admin/reload",
        operation_id="adminReload",
        tags=["admin"],
        summary="Scan the policy folders now: load new versions, unload removed ones",
        responses={403: ERROR_RESPONSES[403]},
        dependencies=admin,
    )
    async def reload() -> Response:
        report = await manager.reload()
        return json_response(report.as_dict())

    @admin_router.put(
        "/admin/policies/{name}/traffic",
        operation_id="adminSetTraffic",
        tags=["admin"],
        summary="Set the traffic weights and the shadow version of a policy",
        response_model=PolicyListing,
        responses=ERROR_RESPONSES | {404: POLICY_RESPONSES[404]},
        dependencies=admin,
    )
    async def set_traffic(name: str, change: Annotated[TrafficChange, Body()]) -> Any:
        if rollouts is not None:
            await rollouts.take_over_traffic(name)
        try:
            entry = await manager.set_traffic(name, change.traffic, change.shadow)
        except PolicyLoadError as error:
            raise PolicyNotFound(str(error)) from None
        manager.changed()
        return json_response(listing(registry, entry).model_dump())

    if rollouts is not None:

        @admin_router.post(
            "/admin/policies/{name}/rollout",
            operation_id="adminStartRollout",
            tags=["admin", "rollouts"],
            summary="Start a rollout: the candidate earns its traffic step by step",
            status_code=201,
            responses=rollout_responses,
            dependencies=admin,
        )
        async def start_rollout(name: str, spec: Annotated[RolloutSpec, Body()]) -> Response:
            return json_response(await rollouts.begin(name, spec), 201)

        @admin_router.delete(
            "/admin/policies/{name}/rollout",
            operation_id="adminAbortRollout",
            tags=["admin", "rollouts"],
            summary="Abort a policy's rollout: the incumbent gets all the traffic",
            responses=rollout_responses,
            dependencies=admin,
        )
        async def abort_rollout(name: str) -> Response:
            return json_response(await rollouts.abort(name, "aborted by an admin"))

    router.include_router(admin_router)
