"""Rewards and episode ends, joined to the logged decisions later (hours later, if need be)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Security
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from policy_server.experience.log import DecisionLog
from policy_server.protocols.auth import KeyRing, header_scheme, key_first
from policy_server.protocols.rest.errors import ERROR_RESPONSES, _responses
from policy_server.serving.registry import PolicyRegistry
from policy_server.serving.service import PolicyService

MAX_REWARDS = 10_000


class RewardItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision_id: str = Field(min_length=1, max_length=64, description="From the prediction.")
    reward: float = Field(
        allow_inf_nan=False, description="Added to the decision's other rewards, if any."
    )
    terminated: bool | None = Field(default=None, description="The episode ended here.")
    truncated: bool | None = Field(default=None, description="The episode was cut off here.")


class RewardResult(BaseModel):
    decision_id: str
    status: str = Field(description="joined, or unknown_decision (never logged here).")


class RewardsAnswer(BaseModel):
    joined: int
    unknown: int
    results: list[RewardResult]


class EpisodeEnd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    terminated: bool = Field(default=True, description="The episode reached a terminal state.")
    truncated: bool = Field(default=False, description="The episode was cut off (time limit).")


# The body is optional: without one, the episode terminated.
_TERMINATED = EpisodeEnd()


class EpisodeAnswer(BaseModel):
    episode_id: str
    status: str = Field(
        description="closed, or unknown_episode (the decision log has no decision of it); "
        "either way the server holds nothing of it any more (its step count, its state)."
    )


def add_experience_routes(
    router: APIRouter,
    registry: PolicyRegistry,
    service: PolicyService,
    keys: KeyRing,
    log: DecisionLog | None,
) -> None:
    """POST /episodes/{id}/end always (it frees the episode's state); /rewards with a
    decision log only."""

    async def any_policy_key(request: Request) -> None:
        keys.check_any(request, registry.entries())

    # The key is checked before the body is read (see `key_first`).
    keyed = APIRouter(route_class=key_first(any_policy_key))
    security = [Security(header_scheme)]
    responses = ERROR_RESPONSES | _responses(
        (503, "The decision log cannot take more now (it failed or is closing)")
    )

    if log is not None:
        _add_rewards_route(keyed, log, responses, security)

    @keyed.post(
        "/episodes/{episode_id}/end",
        operation_id="endEpisode",
        tags=["experience"],
        summary="Close an episode: its last decision is its last step, its state is freed",
        response_model=EpisodeAnswer,
        responses=responses,
        dependencies=security,
    )
    async def end_episode(
        episode_id: Annotated[str, Path(min_length=1, max_length=128)],
        end: Annotated[EpisodeEnd, Body()] = _TERMINATED,
    ) -> Any:
        await service.end_episode(episode_id)
        if log is None:
            return {"episode_id": episode_id, "status": "closed"}
        return await log.end_episode(episode_id, end.terminated, end.truncated)

    router.include_router(keyed)


def _add_rewards_route(
    keyed: APIRouter, log: DecisionLog, responses: dict[Any, Any], security: list[Any]
) -> None:
    @keyed.post(
        "/rewards",
        operation_id="addRewards",
        tags=["experience"],
        summary="Rewards for logged decisions; several for one decision add up",
        response_model=RewardsAnswer,
        responses=responses,
        dependencies=security,
    )
    async def add_rewards(
        rewards: Annotated[list[RewardItem], Body(min_length=1, max_length=MAX_REWARDS)],
    ) -> Any:
        results = await log.add_rewards([item.model_dump() for item in rewards])
        joined = sum(r["status"] == "joined" for r in results)
        return RewardsAnswer(joined=joined, unknown=len(results) - joined, results=results)  # type: ignore[arg-type]
