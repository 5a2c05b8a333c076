"""Response bodies of the API, as pydantic models so that /docs and the SDKs describe them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, create_model

from policy_server.policy.spaces import ActionSpace, Box
from policy_server.runtime.base import Recurrence


def action_type(space: ActionSpace) -> Any:
    return list[float] if isinstance(space, Box) else list[int]


def _answered_by() -> dict[str, Any]:
    return {
        "policy": (str, Field(description="The policy that answered.")),
        "version": (str, Field(description="The version of the policy that answered.")),
    }


def _episode_fields() -> dict[str, Any]:
    return {
        "episode_id": (
            str | None,
            Field(default=None, description="The request's episode, when it named one."),
        ),
        "step": (
            int | None,
            Field(default=None, description="The decision's step within that episode."),
        ),
    }


def _recurrent_answer_fields() -> dict[str, Any]:
    return {
        "episode_state": (
            str | None,
            Field(
                default=None,
                description="Recurrent policies: where this step's state came from: `held` "
                "(the episode's, held by the server), `given` (the request's `state`) or "
                "`initial` (zeros: the episode's first step, a reset, or no episode_id, in "
                "which case nothing is kept).",
            ),
        ),
        "state_reset": (
            bool | None,
            Field(
                default=None,
                description="Recurrent policies: true when the episode had earlier steps "
                "whose state is gone (evicted, idle too long, ended, or held by another "
                "version), so this step started from zeros.",
            ),
        ),
        "state": (
            str | None,
            Field(
                default=None,
                description="With `return_state`: the state after this step, an opaque "
                "signed string to send back as `state`.",
            ),
        ),
    }


def prediction_model(space: ActionSpace, prefix: str = "") -> type[BaseModel]:
    return create_model(
        f"{prefix}Prediction",
        __doc__="The policy's action for one observation.",
        actions=(
            action_type(space),
            Field(
                description="One entry per action component (one for a Discrete action, one "
                "per component of a tuple action, one per dimension of a continuous action)."
            ),
        ),
        probability=(
            float,
            Field(description="Probability of these actions (a density for continuous ones)."),
        ),
        log_probability=(float, Field(description="Natural log of `probability`.")),
        value=(float | None, Field(description="The policy's value estimate, if exported.")),
        decision_id=(
            str,
            Field(description="Unique, time-ordered id of this decision (for rewards)."),
        ),
        **_answered_by(),
        **_episode_fields(),
        **_recurrent_answer_fields(),
    )


def prediction_batch_model(prediction: type[BaseModel], prefix: str = "") -> type[BaseModel]:
    return create_model(
        f"{prefix}PredictionBatch",
        __doc__="One prediction per observation, in request order.",
        predictions=(list[prediction], ...),  # type: ignore[valid-type]
    )


def distribution_model(space: ActionSpace, prefix: str = "") -> type[BaseModel]:
    return create_model(
        f"{prefix}ActionDistribution",
        __doc__="The exact action distribution computed from the policy's logits.",
        action_space=(dict[str, Any], Field(description="The model's action space.")),
        probabilities=(
            list[list[float]] | None,
            Field(description="Per component, the probability of each action (discrete)."),
        ),
        mean=(list[float] | None, Field(description="Per dimension, the mean (continuous).")),
        std=(
            list[float] | None,
            Field(description="Per dimension, the standard deviation (continuous)."),
        ),
        most_likely=(action_type(space), Field(description="The most likely action.")),
        value=(float | None, Field(description="The policy's value estimate, if exported.")),
        **_answered_by(),
        episode_id=_episode_fields()["episode_id"],
    )


class FieldInfo(BaseModel):
    name: str
    type: str
    description: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_items: int | None = None
    max_items: int | None = None


class RecurrentInfo(BaseModel):
    """A recurrent policy's state, and what each step of an episode carries."""

    state_sizes: list[int] = Field(description="The size of each state tensor.")
    state_size: int = Field(description="The state's values in all (what the server holds).")
    reads_prev_action: bool
    reads_prev_reward: bool
    each_step: str = Field(description="What each step's request carries.")

    @classmethod
    def of(cls, recurrence: Recurrence | None) -> RecurrentInfo | None:
        if recurrence is None:
            return None
        return cls(
            state_sizes=list(recurrence.state_sizes),
            state_size=recurrence.state_width,
            reads_prev_action=recurrence.reads_prev_action,
            reads_prev_reward=recurrence.reads_prev_reward,
            each_step="an envelope {observation, episode_id} per step (the server holds the "
            "state, zeros at the first step), with `reward`: the reward that followed the "
            "previous step; optional `prev_action` (default: the action answered), `state` "
            "and `return_state` for clients that keep the state; POST "
            "/episodes/{episode_id}/end frees it",
        )


class PolicyInfo(BaseModel):
    """What a client needs to build an observation and read the answer."""

    name: str
    version: str
    runtime: str
    observations: list[FieldInfo]
    observation_width: int
    action_space: dict[str, Any]
    discrete: bool
    tuple: bool
    url_path: str
    recurrent: RecurrentInfo | None = Field(
        default=None, description="Set for a recurrent policy (its state is held per episode)."
    )


class VersionInfo(BaseModel):
    version: str
    state: str = Field(description="loading, ready, failed, draining or unloaded.")
    reason: str | None = Field(description="Why the version failed to load, if it did.")
    action_space: dict[str, Any] | None
    runtime: str | None
    recurrent: RecurrentInfo | None = None
    traffic: float = Field(description="Percent of the policy's unpinned requests it answers.")
    shadow: bool = Field(description="Whether it scores the policy's requests as a shadow.")
    loaded_at: float = Field(description="When it was found or loaded (Unix seconds).")


class PolicyListing(BaseModel):
    name: str
    url: str = Field(description="The prefix of the policy's routes.")
    default: bool
    traffic: dict[str, float] | None = Field(description="The configured weights, if any.")
    shadow: str | None
    versions: list[VersionInfo]


class PolicyList(BaseModel):
    """The policies the caller's key opens."""

    default: str | None
    policies: list[PolicyListing]
