"""/predict at 32 connections with a rollout under way, against the same traffic split
without one (issue #24: the controller adds nothing measurable; target at least 0.97x).

Both servers serve a repository of two copies of the policy with the decision log on (a
rollout needs it) and the traffic split 50/50: the only difference is the rollout's
controller folding every decision into its ledger. No rewards are sent, so every decision
becomes an open unit: the controller's work per decision, not per reward, is what shows.

`python bench/rollout.py [SECONDS]` runs it alone on the first policy and prints the ratio.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
from features import (
    ADMIN_KEY,
    ServeFlags,
    not_available,
    policy_stem,
    ready_route,
    repository_server,
)
from harness import OUT, Load, Target, targets, wrk


def rollout_repository(target: Target) -> Path:
    """REPO/<stem>/1 and REPO/<stem>/2: the same policy twice, version 1 with all traffic."""
    repository = OUT / "rollout-repository"
    shutil.rmtree(repository, ignore_errors=True)
    for version in ("1", "2"):
        folder = repository / policy_stem(target) / version
        folder.mkdir(parents=True)
        for name in ("schema.yaml", "saved_model.zip"):
            shutil.copyfile(target.path / name, folder / name)
    (repository / "repository.yaml").write_text(
        f'policies:\n  {policy_stem(target)}:\n    traffic: {{"1": 100}}\n'
    )
    return repository


def _split(url: str, name: str, rollout: bool) -> None:
    headers = {"access-token": ADMIN_KEY}
    if rollout:
        spec = {"candidate": "2", "steps": [50], "offline_gate": False}
        answer = httpx.post(f"{url}/admin/policies/{name}/rollout", json=spec, headers=headers)
    else:
        change = {"traffic": {"1": 50, "2": 50}, "shadow": None}
        answer = httpx.put(f"{url}/admin/policies/{name}/traffic", json=change, headers=headers)
    answer.raise_for_status()


def measure_rollout(
    target: Target, cache: Path, duration: int, flags: ServeFlags | None = None
) -> dict[str, Any]:
    flags = flags or ServeFlags()
    if "--rollout-reward-cutoff-s" not in flags:
        return {"notes": {"rollout": not_available("rollouts")}}
    figures: dict[str, Any] = {"notes": {}}
    repository = rollout_repository(target)
    name = policy_stem(target)
    for variant, rollout in (("rollout_off", False), ("rollout_on", True)):
        folder = OUT / "rollout-decisions"
        shutil.rmtree(folder, ignore_errors=True)
        server = repository_server(
            target, cache, repository, "--decision-log", str(folder), "--admin-key", ADMIN_KEY
        )
        try:
            server.start()
            route = ready_route(server, target, name)
            _split(server.url, name, rollout)
            server.warm_up(route, target.observation)
            figures[variant] = wrk(server.url + route, target.observation, target.key, 32, duration)
            if rollout:
                state = httpx.get(
                    f"{server.url}/policies/{name}/rollout",
                    headers={"access-token": target.key},
                ).json()
                figures["rollout_units"] = state["evidence"]["units"]
        except RuntimeError as error:
            figures["notes"]["rollout"] = f"not measured: {error}"
            return figures
        finally:
            server.stop()
    return figures


def ratio(figures: dict[str, Any]) -> float | None:
    on, off = figures.get("rollout_on"), figures.get("rollout_off")
    if not isinstance(on, Load) or not isinstance(off, Load) or not off.requests_per_s:
        return None
    return on.requests_per_s / off.requests_per_s


if __name__ == "__main__":
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    target = targets()[0]
    cache = OUT / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    found = measure_rollout(target, cache, seconds)
    shown = {k: (v.__dict__ if isinstance(v, Load) else v) for k, v in found.items()}
    print(json.dumps(shown | {"policy": target.name, "ratio": ratio(found)}, indent=2))
