"""A seeded simulation of a rollout's controller: the real evidence and rule, driven by
synthetic units whose values are known exactly (Bernoulli rewards), with rewards that
arrive late and out of order while the weights ramp.

`python -m tests.rollout_simulation RUNS` prints the false-promotion count for an identical
candidate over RUNS runs (the README states the figure).
"""

from __future__ import annotations

import heapq
import sys
from dataclasses import dataclass

import numpy as np

from policy_server.loading.rollout_spec import Guardrails, RolloutSpec
from policy_server.serving.rollout.rule import Evidence, decide, weight_after

SPEC = RolloutSpec(
    candidate="2",
    steps=[5, 20, 50],
    min_units_per_step=100,
    alpha=0.05,
    offline_gate=False,
    max_units=5000,
    guardrails=Guardrails(error_rate_increase=None, p99_latency_ratio=None),
)


@dataclass(frozen=True)
class Outcome:
    state: str
    units: int  # rewarded units when it ended
    candidate_units: int  # units assigned to the candidate, rewarded or not
    max_step: int


def simulate(
    candidate_mean: float,
    incumbent_mean: float,
    seed: int,
    spec: RolloutSpec = SPEC,
    max_delay: int = 50,
    grid: int = 201,
) -> Outcome:
    """One rollout: each unit is assigned with the weight of the moment, its reward comes
    back up to `max_delay` units later; the rule is checked after every reward."""
    rng = np.random.default_rng(seed)
    evidence = Evidence(spec, 0.0, 1.0, grid=grid)
    state, step, assigned = "canary", 0, 0
    pending: list[tuple[int, int, bool, float, float]] = []
    arrival = 0
    while state == "canary":
        p = weight_after(spec, state, step) / 100.0
        candidate = bool(rng.random() < p)
        assigned += candidate
        mean = candidate_mean if candidate else incumbent_mean
        reward = float(rng.random() < mean)
        due = arrival + int(rng.integers(0, max_delay + 1))
        heapq.heappush(pending, (due, arrival, candidate, p, reward))
        arrival += 1
        while pending and pending[0][0] <= arrival and state == "canary":
            _, _, was_candidate, was_p, value = heapq.heappop(pending)
            evidence.add_unit(was_candidate, was_p, value)
            transition = decide(spec, state, step, evidence)
            if transition is not None:
                state = transition.to
                if transition.step is not None:
                    step, evidence.step_rewarded = transition.step, 0
    return Outcome(state, evidence.rewarded.total, assigned, step)


def false_promotions(runs: int, mean: float = 0.5) -> int:
    return sum(simulate(mean, mean, seed).state == "promoted" for seed in range(runs))


if __name__ == "__main__":
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    count = false_promotions(runs)
    print(f"{count} false promotions in {runs} runs ({count / runs:.4f})")
