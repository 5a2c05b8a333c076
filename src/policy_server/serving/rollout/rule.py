"""The evidence of a rollout and the rule that turns it into transitions. No I/O, no clock.

Units are the values the rollout observes: a decision's reward, or an episode's return,
each with the probability it had of going to the candidate when it was assigned. Only units
assigned at random (0 < p < 1) count: decisions on a pinned version route, or made while one
version had all the traffic, say nothing about the difference.

The value test is one confidence sequence on the difference of values, candidate minus
incumbent, over the whole rollout (every step), from inverse-propensity-weighted terms
(`experience.sequences.ipw_difference`): the terms stay unbiased while the weights ramp,
since each unit is weighted by the probability it had. Values are scaled to [0, 1] by the
policy's `rollout_reward_range` (a sequence of bounded terms needs their bounds); a value
outside the range is clipped and counted.

Alpha is split once, at the start: a quarter to the offline gate when there is one, a
quarter to the guardrails (shared equally), the rest to the value test; the document says so.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from policy_server.experience.sequences import DEFAULT_GRID, BettingSequence, ipw_difference
from policy_server.loading.rollout_spec import RolloutSpec

ACTIVE = ("offline_gate", "canary")
FINAL = ("promoted", "rolled_back", "rejected", "held", "aborted")
# The incumbent's requests that fix the latency reference (its p99) before the candidate's
# latencies are judged against it.
LATENCY_REFERENCE = 500
TRACE_POINTS = 720
_LATENCY_QUANTILE = 0.99


def alpha_split(spec: RolloutSpec) -> dict[str, float]:
    guardrails = [name for name, band in spec.guardrails if band is not None]
    offline = spec.alpha / 4 if spec.offline_gate else 0.0
    guarded = spec.alpha / 4 if guardrails else 0.0
    split = {"offline": offline, "value": spec.alpha - offline - guarded}
    split |= {name: guarded / len(guardrails) for name in guardrails}
    return split


@dataclass(frozen=True)
class Transition:
    to: str
    reason: str
    step: int | None = None


@dataclass
class Counts:
    """Per role (candidate, incumbent)."""

    candidate: int = 0
    incumbent: int = 0

    def add(self, candidate: bool, count: int = 1) -> None:
        if candidate:
            self.candidate += count
        else:
            self.incumbent += count

    @property
    def total(self) -> int:
        return self.candidate + self.incumbent


@dataclass
class Evidence:
    """What the rollout has seen since it started; serialisable, so every worker and a
    restarted server continue the same sequences."""

    spec: RolloutSpec
    reward_low: float
    reward_high: float
    grid: int = DEFAULT_GRID
    value: BettingSequence = field(init=False)
    errors: BettingSequence | None = field(init=False)
    latency: BettingSequence | None = field(init=False)
    units: Counts = field(default_factory=Counts)
    rewarded: Counts = field(default_factory=Counts)
    missing: Counts = field(default_factory=Counts)
    requests: Counts = field(default_factory=Counts)
    failed: Counts = field(default_factory=Counts)
    switched: int = 0
    clipped: int = 0
    step_rewarded: int = 0
    baseline: tuple[float, int] = (0.5, 1)  # sum and count, a prior of one unit at 1/2
    error_baseline: tuple[float, int] = (0.0, 1)
    latency_sample: list[float] = field(default_factory=list)
    latency_reference: float | None = None
    offline: dict[str, Any] | None = None
    # The interval over time, for the page and the document: [time, rewarded units,
    # estimate, lower, upper, weight], at most one point a second and TRACE_POINTS in all.
    trace: list[list[float | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        split = alpha_split(self.spec)
        self.value = BettingSequence(split["value"], -1.0, 1.0, self.grid)
        self.errors = None
        self.latency = None
        if "error_rate_increase" in split:
            self.errors = BettingSequence(split["error_rate_increase"], -1.0, 1.0, self.grid)
        if "p99_latency_ratio" in split:
            self.latency = BettingSequence(split["p99_latency_ratio"], 0.0, 1.0, self.grid)

    @property
    def scale(self) -> float:
        return self.reward_high - self.reward_low

    # --- what is observed -------------------------------------------------------------------

    def assigned(self, candidate: bool) -> None:
        self.units.add(candidate)

    def add_unit(self, candidate: bool, p: float, value: float) -> None:
        """A rewarded unit: its value (a reward or a return) and its assignment probability."""
        y = (value - self.reward_low) / self.scale
        if not 0.0 <= y <= 1.0:
            self.clipped += 1
            y = min(max(y, 0.0), 1.0)
        total, count = self.baseline
        term = ipw_difference(y, candidate, p, total / count)
        self.value.update(term.value, term.low, term.high, term.scale)
        self.baseline = (total + y, count + 1)
        self.rewarded.add(candidate)
        if candidate:
            self.step_rewarded += 1

    def add_missing(self, candidate: bool) -> None:
        """A unit with no reward by the cutoff: counted apart, never a pass."""
        self.missing.add(candidate)

    def add_request(self, candidate: bool, p: float, failed: bool, latency_s: float) -> None:
        """A routed request of either version, for the guardrails."""
        self.requests.add(candidate)
        self.failed.add(candidate, int(failed))
        if self.errors is not None:
            total, count = self.error_baseline
            term = ipw_difference(float(failed), candidate, p, total / count)
            self.errors.update(term.value, term.low, term.high, term.scale)
            self.error_baseline = (total + float(failed), count + 1)
        if self.latency is None or failed:
            return
        if self.latency_reference is None:
            if not candidate:
                bisect.insort(self.latency_sample, latency_s)
                if len(self.latency_sample) >= LATENCY_REFERENCE:
                    index = int(_LATENCY_QUANTILE * (len(self.latency_sample) - 1))
                    self.latency_reference = self.latency_sample[index]
                    self.latency_sample = []
            return
        if candidate:
            ratio = self.spec.guardrails.p99_latency_ratio or 1.0
            slow = latency_s > ratio * self.latency_reference
            self.latency.update(float(slow), 0.0, 1.0)

    # --- what it says --------------------------------------------------------------------

    def guardrail_failure(self) -> str | None:
        bands = self.spec.guardrails
        band = bands.error_rate_increase
        if self.errors is not None and band is not None and self.errors.lower > band:
            return (
                f"guardrail error_rate_increase: the candidate's error rate exceeds the "
                f"incumbent's by at least {self.errors.lower:.4f} (band {band:g})"
            )
        if self.latency is not None and self.latency.lower > 1.0 - _LATENCY_QUANTILE:
            return (
                f"guardrail p99_latency_ratio: at least {100 * self.latency.lower:.2f}% of "
                f"the candidate's requests took over {bands.p99_latency_ratio:g}x the "
                f"incumbent's p99 ({1000 * (self.latency_reference or 0):.2f} ms)"
            )
        return None

    def bounds(self) -> tuple[float | None, float, float]:
        """The value difference's estimate and bounds, in the reward's units."""
        estimate = self.value.estimate
        return (
            None if estimate is None else estimate * self.scale,
            self.value.lower * self.scale,
            self.value.upper * self.scale,
        )

    def mark(self, at: float, weight: float, transition: bool = False) -> None:
        """A point of the trace (always at a transition); when full, every other point goes,
        so it spans the whole rollout at half the resolution (constant memory and work)."""
        if not transition and self.trace and at - float(self.trace[-1][0] or 0.0) < 1.0:
            return
        if len(self.trace) >= TRACE_POINTS:
            self.trace = self.trace[::2]
        estimate, lower, upper = self.bounds()
        self.trace.append([at, self.rewarded.total, estimate, lower, upper, weight])

    # --- state ------------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "value": self.value.to_state(),
            "errors": None if self.errors is None else self.errors.to_state(),
            "latency": None if self.latency is None else self.latency.to_state(),
            "counts": {
                name: [getattr(self, name).candidate, getattr(self, name).incumbent]
                for name in ("units", "rewarded", "missing", "requests", "failed")
            },
            "switched": self.switched,
            "clipped": self.clipped,
            "step_rewarded": self.step_rewarded,
            "baseline": list(self.baseline),
            "error_baseline": list(self.error_baseline),
            "latency_sample": self.latency_sample,
            "latency_reference": self.latency_reference,
            "offline": self.offline,
            "trace": self.trace,
        }

    @classmethod
    def from_state(
        cls, spec: RolloutSpec, low: float, high: float, state: dict[str, Any]
    ) -> Evidence:
        evidence = cls(spec, low, high)
        evidence.value = BettingSequence.from_state(state["value"])
        if state["errors"] is not None:
            evidence.errors = BettingSequence.from_state(state["errors"])
        if state["latency"] is not None:
            evidence.latency = BettingSequence.from_state(state["latency"])
        for name, (candidate, incumbent) in state["counts"].items():
            setattr(evidence, name, Counts(candidate, incumbent))
        evidence.switched = int(state["switched"])
        evidence.clipped = int(state["clipped"])
        evidence.step_rewarded = int(state["step_rewarded"])
        evidence.baseline = (float(state["baseline"][0]), int(state["baseline"][1]))
        evidence.error_baseline = (
            float(state["error_baseline"][0]),
            int(state["error_baseline"][1]),
        )
        evidence.latency_sample = [float(v) for v in state["latency_sample"]]
        evidence.latency_reference = state["latency_reference"]
        evidence.offline = state["offline"]
        evidence.trace = state.get("trace", [])
        return evidence


def decide(spec: RolloutSpec, state: str, step: int, evidence: Evidence) -> Transition | None:
    """The canary's next transition, if any; checked after every unit. Safety first: a
    guardrail, then the value's bounds, then the unit budget, then the next step."""
    if state != "canary":
        return None
    failure = evidence.guardrail_failure()
    if failure is not None:
        return Transition("rolled_back", failure)
    _, lower, upper = evidence.bounds()
    if lower > spec.min_effect:
        return Transition(
            "promoted", f"value difference above {spec.min_effect:g}: lower bound {lower:.4g}"
        )
    if upper < spec.min_effect:
        return Transition(
            "rolled_back",
            f"value difference below {spec.min_effect:g}: upper bound {upper:.4g}",
        )
    if evidence.rewarded.total >= spec.max_units:
        target = "held" if spec.on_inconclusive == "hold" else "rolled_back"
        return Transition(
            target,
            f"inconclusive after {evidence.rewarded.total} rewarded units "
            f"(interval [{lower:.4g}, {upper:.4g}])",
        )
    if evidence.step_rewarded >= spec.min_units_per_step and step < len(spec.steps) - 1:
        return Transition(
            "canary",
            f"{evidence.step_rewarded} rewarded candidate units at {spec.steps[step]:g}%",
            step + 1,
        )
    return None


def weight_after(spec: RolloutSpec, state: str, step: int) -> float:
    """The candidate's percent of the traffic in a state."""
    if state == "canary":
        return spec.steps[step]
    if state == "promoted":
        return 100.0
    if state == "held":
        return spec.steps[step]
    return 0.0
