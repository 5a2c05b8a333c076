"""What a rollout is asked to do: the body of `POST /admin/policies/{name}/rollout`, and the
`rollout:` entry of a policy in repository.yaml (one model, so both check the same way)."""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Guardrails(BaseModel):
    """Bands the candidate must stay in, each judged by its own confidence sequence; null
    turns one off."""

    model_config = ConfigDict(extra="forbid")

    error_rate_increase: float | None = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Roll back when the candidate's error rate exceeds the incumbent's by "
        "more than this, with confidence.",
    )
    p99_latency_ratio: float | None = Field(
        default=1.5,
        gt=1,
        description="Roll back when, with confidence, more than 1% of the candidate's "
        "requests take longer than this many times the incumbent's p99 latency.",
    )


class RolloutSpec(BaseModel):
    """A candidate version that earns its traffic step by step."""

    model_config = ConfigDict(extra="forbid")

    candidate: str = Field(description="The version rolled out.")
    steps: list[Annotated[float, Field(gt=0, lt=100)]] = Field(
        default=[5.0, 20.0, 50.0],
        min_length=1,
        description="The canary's weights in percent, increasing, each within (0, 100); "
        "the candidate gets 100% only by promotion.",
    )
    unit: Literal["decision", "episode"] = Field(
        default="decision",
        description="What one observation of the value is: a decision's reward, or an "
        "episode's return (episodes are sticky to one version).",
    )
    min_units_per_step: int = Field(
        default=300, ge=1, description="The candidate's rewarded units before the next step."
    )
    alpha: float = Field(
        default=0.05,
        gt=0,
        lt=0.5,
        description="The error level of the whole rollout, split between the offline gate, "
        "the value test and the guardrails.",
    )
    min_effect: float = Field(
        default=0.0,
        description="Promote when the value difference (candidate minus incumbent) is "
        "above this with confidence; roll back when it is below.",
    )
    offline_gate: bool = Field(
        default=True,
        description="Evaluate the candidate off-policy on the incumbent's logged decisions "
        "before it gets any traffic.",
    )
    max_units: int = Field(
        default=40_000,
        ge=1,
        description="Rewarded units of both versions after which `on_inconclusive` applies.",
    )
    on_inconclusive: Literal["hold", "rollback"] = Field(
        default="hold", description="What happens at `max_units` without a decision."
    )
    guardrails: Guardrails = Field(default_factory=Guardrails)

    def problems(self) -> list[tuple[str, str]]:
        """What no JSON schema can say, as (field, message): checked when a rollout starts
        (a 422 naming the field) and when repository.yaml is read."""
        found = []
        if any(b <= a for a, b in itertools.pairwise(self.steps)):
            found.append(("steps", f"steps must increase, got {[f'{s:g}' for s in self.steps]}"))
        if self.max_units < self.min_units_per_step:
            found.append(
                (
                    "max_units",
                    f"max_units must be at least min_units_per_step ({self.min_units_per_step})",
                )
            )
        return found
