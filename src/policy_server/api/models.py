"""Response bodies of the API, as pydantic models so that /docs and the SDKs describe them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, create_model

from policy_server.spaces import ActionSpace, Box


def action_type(space: ActionSpace) -> Any:
    return list[float] if isinstance(space, Box) else list[int]


def prediction_model(space: ActionSpace) -> type[BaseModel]:
    return create_model(
        "Prediction",
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
    )


def prediction_batch_model(prediction: type[BaseModel]) -> type[BaseModel]:
    return create_model(
        "PredictionBatch",
        __doc__="One prediction per observation, in request order.",
        predictions=(list[prediction], ...),  # type: ignore[valid-type]
    )


def distribution_model(space: ActionSpace) -> type[BaseModel]:
    return create_model(
        "ActionDistribution",
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
    )


class FieldInfo(BaseModel):
    name: str
    type: str
    description: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_items: int | None = None
    max_items: int | None = None


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
