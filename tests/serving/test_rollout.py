"""Rollouts on real servers (issue #24): versions of a linear bandit policy whose values are
known exactly (the true value is a finite sum over contexts and actions), rewards drawn by
the client from Bernoulli(MEANS[context, action]), so each unit's value is in [0, 1]."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.experience.test_evaluation import CANDIDATE, CONTEXTS, LOGGING, MEANS, SCHEMA, true_value
from tests.policies import ROOT, linear_onnx_policy, slow_onnx_policy
from tests.rollout_simulation import false_promotions, simulate
from tests.servers import RunningServer, free_port, serving

KEY = "x"  # the bandit schema's key
ADMIN = "rollout-admin"
BATCH = 200
WORSE = (-CANDIDATE[0], -CANDIDATE[1])
NO_GUARDRAILS = {"error_rate_increase": None, "p99_latency_ratio": None}


def repository(root: Path, traffic: str = '{"1": 100}', extra: str = "") -> Path:
    """bandit/1 logs as LOGGING, bandit/2 is better (CANDIDATE), bandit/3 is worse."""
    for version, (weights, bias) in {"1": LOGGING, "2": CANDIDATE, "3": WORSE}.items():
        folder = root / "bandit" / version
        folder.mkdir(parents=True)
        linear_onnx_policy(folder / "model.onnx", weights, bias)
        (folder / "schema.yaml").write_text(SCHEMA.format(n=len(bias)))
    (root / "repository.yaml").write_text(f"policies:\n  bandit:\n    traffic: {traffic}\n{extra}")
    return root


def flags(log: Path, *more: str) -> tuple[str, ...]:
    return ("--decision-log", str(log), "--admin-key", ADMIN, "--poll-interval-s", "0", *more)


ADMIN_HEADERS = {"access-token": ADMIN}


def start(http: httpx.Client, **spec: Any) -> httpx.Response:
    return http.post("/admin/policies/bandit/rollout", json=spec, headers=ADMIN_HEADERS)


def rollout(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/policies/bandit/rollout")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def play(http: httpx.Client, rng: np.random.Generator, rounds: int, tag: str) -> dict[str, int]:
    """`rounds` one-step episodes (each item its own episode id, so each is routed on its
    own), rewarded at once; returns the decisions per version."""
    versions: dict[str, int] = {}
    for batch in range(rounds // BATCH):
        contexts = rng.integers(len(CONTEXTS), size=BATCH)
        body = {
            "observations": [
                {"observation": {"obs": CONTEXTS[c].tolist()}, "episode_id": f"{tag}-{batch}-{i}"}
                for i, c in enumerate(contexts)
            ]
        }
        response = http.post("/policies/bandit/predict_raw_batch", json=body)
        assert response.status_code == 200, response.text
        rewards = []
        for context, answer in zip(contexts, response.json()["predictions"], strict=True):
            versions[answer["version"]] = versions.get(answer["version"], 0) + 1
            reward = float(rng.random() < MEANS[context, answer["actions"][0]])
            rewards.append({"decision_id": answer["decision_id"], "reward": reward})
        assert http.post("/rewards", json=rewards).status_code == 200
    return versions


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def play_until(
    http: httpx.Client, rng: np.random.Generator, done: Callable[[dict[str, Any]], bool], most: int
) -> tuple[dict[str, Any], dict[str, int]]:
    """Play batches until the rollout is `done` or `most` decisions were made."""
    served: dict[str, int] = {}
    for round_ in range(most // BATCH):
        for version, count in play(http, rng, BATCH, f"r{round_}").items():
            served[version] = served.get(version, 0) + count
        time.sleep(0.3)  # a tick folds what the log wrote
        document = rollout(http)
        if done(document):
            return document, served
    return rollout(http), served


def traffic(http: httpx.Client) -> dict[str, float]:
    listing = http.get("/policies").json()["policies"][0]
    return {v["version"]: v["traffic"] for v in listing["versions"]}


SPEC: dict[str, Any] = {
    "steps": [10, 30, 50],
    "min_units_per_step": 100,
    "offline_gate": False,
    "max_units": 20000,
    "guardrails": NO_GUARDRAILS,
}


def test_a_better_candidate_is_promoted_within_4000_units(cache_dir: Path, tmp_path: Path) -> None:
    assert true_value(*CANDIDATE) - true_value(*LOGGING) > 0.19
    root = repository(tmp_path / "repo")
    port = free_port()
    more = flags(tmp_path / "log", "--metrics-port", str(port))
    with serving(root, cache_dir, tmp_path, KEY, *more) as server, server.client() as http:
        answer = start(http, candidate="2", **SPEC)
        assert answer.status_code == 201, answer.text
        assert answer.json()["state"] == "canary" and answer.json()["weight"] == 10
        assert traffic(http) == {"1": 90.0, "2": 10.0, "3": 0.0}
        document, _ = play_until(http, np.random.default_rng(1), _final, 4000)
        assert document["state"] == "promoted", document
        evidence = document["evidence"]
        assert evidence["lower"] > 0 and evidence["estimate"] > 0
        assert evidence["alpha_split"] == {
            "offline": 0.0,
            "value": 0.05,
        }
        steps = [h["to"] for h in document["history"]]
        assert steps[0] == "canary" and steps[-1] == "promoted"
        assert traffic(http) == {"1": 0.0, "2": 100.0, "3": 0.0}
        assert '"event": "rollout_transition"' in server.output().replace('":"', '": "')
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'policy_server_rollout_state{policy="bandit",state="promoted"} 1.0' in metrics
    assert 'policy_server_rollout_weight_percent{policy="bandit"} 100.0' in metrics
    for bound in ("estimate", "lower", "upper"):
        assert (
            f'policy_server_rollout_value_difference{{bound="{bound}",policy="bandit"}}' in metrics
        )
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/policy-server.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"policy_server_rollout_[a-z_]+", target["expr"])
    }
    assert len(queried) == 3 and all(name in metrics for name in queried)


def test_a_worse_candidate_is_rolled_back_with_its_share_bounded(
    cache_dir: Path, tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo")
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(tmp_path / "log")) as server,
        server.client() as http,
    ):
        assert start(http, candidate="3", **SPEC).status_code == 201
        document, served = play_until(http, np.random.default_rng(2), _final, 4000)
        assert document["state"] == "rolled_back", document
        assert document["evidence"]["upper"] < 0
        # The candidate got about its first steps' share: the controller folds rewards a
        # moment after they are logged, so the batches sent meanwhile still follow the weights.
        assert served.get("3", 0) <= 0.25 * sum(served.values()), served
        assert traffic(http) == {"1": 100.0, "2": 0.0, "3": 0.0}


def _final(document: dict[str, Any]) -> bool:
    return document["state"] not in ("canary", "offline_gate")


def test_bad_rollouts_are_refused_naming_the_field(cache_dir: Path, tmp_path: Path) -> None:
    root = repository(tmp_path / "repo")
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(tmp_path / "log")) as server,
        server.client() as http,
    ):
        for spec, field in (
            ({"candidate": "9"}, "candidate"),
            ({"candidate": "1"}, "candidate"),
            ({"candidate": "2", "steps": [20, 10]}, "steps"),
            ({"candidate": "2", "steps": [0, 10]}, "steps"),
            ({"candidate": "2", "steps": [50, 100]}, "steps"),
            ({"candidate": "2", "alpha": 0.5}, "alpha"),
            ({"candidate": "2", "alpha": 0}, "alpha"),
            ({"candidate": "2", "unit": "week"}, "unit"),
            ({"candidate": "2", "min_units_per_step": 50, "max_units": 10}, "max_units"),
        ):
            answer = start(http, **spec)
            assert answer.status_code == 422, (spec, answer.text)
            named = [f["field"] for f in answer.json()["error"]["fields"]]
            assert any(name.split(".")[0] == field for name in named), answer.text
        assert start(http, candidate="2", **SPEC).status_code == 201
        second = start(http, candidate="3", **SPEC)
        assert second.status_code == 409 and "already has a rollout" in second.text
        change = {"traffic": {"1": 50, "3": 50}, "shadow": None}
        manual = http.put("/admin/policies/bandit/traffic", json=change, headers=ADMIN_HEADERS)
        assert manual.status_code == 409 and "DELETE" in manual.json()["error"]["message"]
        assert (
            http.post("/admin/policies/bandit/rollout", json={"candidate": "2"}).status_code == 403
        )
        aborted = http.delete("/admin/policies/bandit/rollout", headers=ADMIN_HEADERS)
        assert aborted.json()["state"] == "aborted"
        assert traffic(http) == {"1": 100.0, "2": 0.0, "3": 0.0}
        assert start(http, candidate="3", **SPEC).status_code == 201


def test_a_rollout_needs_the_decision_log(cache_dir: Path, tmp_path: Path) -> None:
    root = repository(tmp_path / "repo")
    with (
        serving(root, cache_dir, tmp_path, KEY, "--admin-key", ADMIN) as server,
        server.client() as http,
    ):
        answer = start(http, candidate="2")
        assert answer.status_code == 409, answer.text
        assert "--decision-log" in answer.json()["error"]["message"]


def test_an_identical_candidate_is_promoted_in_at_most_alpha_of_seeded_simulations() -> None:
    runs = 100
    assert false_promotions(runs) <= 0.05 * runs


def test_simulated_better_and_worse_candidates_are_decided() -> None:
    assert simulate(0.69, 0.5, seed=0).state == "promoted"
    assert simulate(0.26, 0.5, seed=0).state == "rolled_back"


def test_the_offline_gate_rejects_a_worse_candidate_with_zero_exposure(
    cache_dir: Path, tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo")
    more = ("--rollout-offline-ess", "150")
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(tmp_path / "log", *more)) as server,
        server.client() as http,
    ):
        rng = np.random.default_rng(3)
        spec = SPEC | {"offline_gate": True}
        # Without the incumbent's rewarded decisions the gate waits, passing nothing.
        assert start(http, candidate="3", **spec).json()["state"] == "offline_gate"
        time.sleep(1)
        assert rollout(http)["state"] == "offline_gate"
        served = play(http, rng, 2000, "logged")
        assert served == {"1": 2000}
        eventually(lambda: rollout(http)["state"] == "rejected", timeout=30)
        document = rollout(http)
        offline = document["evidence"]["offline"]
        assert offline["upper"] < 0 and offline["effective_sample_size"] >= 150
        assert offline["estimator"] == "dr"
        assert document["weight"] == 0 and document["evidence"]["units"]["3"] == 0
        assert document["evidence"]["alpha_split"]["offline"] == pytest.approx(0.0125)
        assert play(http, rng, 400, "after") == {"1": 400}
        # A better candidate on the same log passes the gate into the canary.
        assert start(http, candidate="2", **spec).status_code == 201
        eventually(lambda: rollout(http)["state"] == "canary", timeout=30)
        assert rollout(http)["evidence"]["offline"]["lower"] > 0


def play_episodes(
    http: httpx.Client, rng: np.random.Generator, episodes: int, tag: str, late: list[Any]
) -> None:
    """Episodes of three independent bandit rounds, played step by step; their rewards are
    sent one batch later (`late` carries them over). Half end with `terminated`, the other
    half just stop (closed by the cutoff)."""
    steps = 3
    ids = [f"{tag}-{i}" for i in range(episodes)]
    rewards = []
    for step in range(steps):
        contexts = rng.integers(len(CONTEXTS), size=episodes)
        body = {
            "observations": [
                {"observation": {"obs": CONTEXTS[c].tolist()}, "episode_id": e, "step": step}
                for e, c in zip(ids, contexts, strict=True)
            ]
        }
        answers = http.post("/policies/bandit/predict_raw_batch", json=body).json()["predictions"]
        for index, (context, answer) in enumerate(zip(contexts, answers, strict=True)):
            reward = {
                "decision_id": answer["decision_id"],
                "reward": float(rng.random() < MEANS[context, answer["actions"][0]]),
            }
            if step == steps - 1 and index % 2 == 0:
                reward["terminated"] = True
            rewards.append(reward)
    if late:
        assert http.post("/rewards", json=late.pop()).status_code == 200
    late.append(rewards)


def test_episodes_as_units_with_delayed_rewards_promote_a_better_candidate(
    cache_dir: Path, tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo")
    more = ("--rollout-reward-high", "3", "--rollout-reward-cutoff-s", "2")
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(tmp_path / "log", *more)) as server,
        server.client() as http,
    ):
        assert start(http, candidate="2", unit="episode", **SPEC).status_code == 201
        rng, late = np.random.default_rng(4), list[Any]()
        for round_ in range(20):
            play_episodes(http, rng, 200, f"r{round_}", late)
            time.sleep(0.5)
            if rollout(http)["state"] == "promoted":
                break
        assert http.post("/rewards", json=late.pop()).status_code == 200
        eventually(lambda: rollout(http)["state"] == "promoted", timeout=30)
        evidence = rollout(http)["evidence"]
        # Episodes are sticky: none moved between versions while the weights ramped
        # except those the rendezvous hash moved, counted apart.
        assert evidence["rewarded"]["2"] > 0 and evidence["reward_range"] == [0.0, 3.0]
        assert evidence["missing"] == {"2": 0, "1": 0}


def test_a_rollout_resumes_after_a_restart(cache_dir: Path, tmp_path: Path) -> None:
    root = repository(tmp_path / "repo")
    log = tmp_path / "log"
    rng = np.random.default_rng(5)
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(log)) as server,
        server.client() as http,
    ):
        spec = SPEC | {"steps": [10, 20, 30], "min_units_per_step": 20}
        assert start(http, candidate="2", **spec).status_code == 201
        # Played a batch at a time until the second step, so that the rollout is stopped
        # early in its canary; then every reward played is folded in before the snapshot (the
        # log's writer and the controller fold in groups: a later one moves the rollout on).
        played = 0
        for batch in range(40):
            if rollout(http)["step"] >= 1:
                break
            played += sum(play(http, rng, BATCH, f"before{batch}").values())
            time.sleep(0.3)
        eventually(lambda: sum(rollout(http)["evidence"]["units"].values()) >= played)
        before = rollout(http)
        assert before["state"] == "canary"
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(log)) as server,
        server.client() as http,
    ):
        after = rollout(http)
        assert (after["state"], after["step"], after["weight"]) == (
            before["state"],
            before["step"],
            before["weight"],
        )
        assert after["evidence"]["rewarded"] == before["evidence"]["rewarded"]
        weight = after["weight"]
        assert traffic(http) == {"1": 100 - weight, "2": weight, "3": 0.0}
        document, _ = play_until(http, rng, _final, 4000)
        assert document["state"] == "promoted"
        assert len(document["history"]) >= len(before["history"]) + 1


def test_under_workers_every_worker_shows_the_same_rollout(cache_dir: Path, tmp_path: Path) -> None:
    root = repository(tmp_path / "repo")
    more = flags(tmp_path / "log", "--workers", "2")
    with (
        serving(root, cache_dir, tmp_path, KEY, *more) as server,
        server.client() as http,
    ):
        assert start(http, candidate="2", **SPEC).status_code == 201
        # The admin change reaches the other worker within a second (its follower).
        eventually(lambda: _workers_show(server) == {"1": 90.0, "2": 10.0, "3": 0.0}, 3)
        document, _ = play_until(http, np.random.default_rng(6), _final, 4000)
        assert document["state"] == "promoted"
        eventually(lambda: _workers_show(server) == {"1": 0.0, "2": 100.0, "3": 0.0}, 3)
        states = {_fresh(server, "/policies/bandit/rollout")[1]["state"] for _ in range(10)}
        assert states == {"promoted"}


def _fresh(server: RunningServer, path: str) -> tuple[str, Any]:
    """On a new connection each time, so that any worker may answer."""
    response = httpx.get(server.url + path, headers=server.headers, timeout=30)
    return response.headers["policy-server-worker"], response.json()


def _workers_show(server: RunningServer) -> dict[str, float] | None:
    """The traffic both workers show, when they agree."""
    shown: dict[str, dict[str, float]] = {}
    for _ in range(200):
        worker, listing = _fresh(server, "/policies")
        versions = listing["policies"][0]["versions"]
        shown[worker] = {v["version"]: v["traffic"] for v in versions}
        if len(shown) == 2:
            break
        time.sleep(0.02)
    values = list(shown.values())
    return values[0] if len(shown) == 2 and values[0] == values[1] else None


def test_a_reload_that_removes_the_candidate_aborts_the_rollout(
    cache_dir: Path, tmp_path: Path
) -> None:
    import shutil

    root = repository(tmp_path / "repo")
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(tmp_path / "log")) as server,
        server.client() as http,
    ):
        assert start(http, candidate="2", **SPEC).status_code == 201
        shutil.rmtree(root / "bandit" / "2")
        assert http.post("/admin/reload", headers=ADMIN_HEADERS).status_code == 200
        eventually(lambda: rollout(http)["state"] == "aborted")
        assert "removed by a reload" in rollout(http)["history"][-1]["reason"]
        assert traffic(http) == {"1": 100.0, "3": 0.0}


def test_a_rollout_entry_in_repository_yaml_starts_it_once(cache_dir: Path, tmp_path: Path) -> None:
    entry = (
        "    rollout: {candidate: 2, steps: [10, 30], min_units_per_step: 100, "
        "offline_gate: false, guardrails: {error_rate_increase: null, p99_latency_ratio: null}}\n"
    )
    root = repository(tmp_path / "repo", extra=entry)
    log = tmp_path / "log"
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(log)) as server,
        server.client() as http,
    ):
        first = rollout(http)
        assert (first["state"], first["candidate"], first["incumbent"]) == ("canary", "2", "1")
        aborted = http.delete("/admin/policies/bandit/rollout", headers=ADMIN_HEADERS)
        assert aborted.json()["state"] == "aborted"
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(log)) as server,
        server.client() as http,
    ):
        again = rollout(http)
        assert (again["id"], again["state"]) == (first["id"], "aborted")


def test_a_slow_candidate_is_rolled_back_by_its_latency_guardrail(
    cache_dir: Path, tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo")
    slow = root / "bandit" / "4"
    slow.mkdir()
    slow_onnx_policy(slow / "model.onnx", width=3, actions=3)
    (slow / "schema.yaml").write_text(SCHEMA.format(n=3))
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(tmp_path / "log")) as server,
        server.client() as http,
    ):
        spec = SPEC | {"guardrails": {"p99_latency_ratio": 1.5, "error_rate_increase": 0.01}}
        assert start(http, candidate="4", **spec).status_code == 201
        body = {"obs": CONTEXTS[0].tolist()}
        served: dict[str, int] = {}
        for index in range(3000):
            answer = http.post("/policies/bandit/predict_raw", json=body).json()
            served[answer["version"]] = served.get(answer["version"], 0) + 1
            if index % 100 == 99:
                time.sleep(0.3)
                if rollout(http)["state"] != "canary":
                    break
        document = rollout(http)
        assert document["state"] == "rolled_back", (document, served)
        assert "p99_latency_ratio" in document["history"][-1]["reason"]
        guardrail = document["evidence"]["guardrails"]["p99_latency_ratio"]
        assert guardrail["slow_share_lower"] > 0.01 and guardrail["reference_s"] > 0
        # No reward was sent: the value test decided nothing.
        assert document["evidence"]["rewarded"] == {"4": 0, "1": 0}
        assert document["evidence"]["alpha_split"] == pytest.approx(
            {
                "offline": 0.0,
                "value": 0.0375,
                "error_rate_increase": 0.00625,
                "p99_latency_ratio": 0.00625,
            }
        )


def test_a_rollout_promotes_on_the_ray_backend(cache_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    root = repository(tmp_path / "repo")
    ray = ("--backend", "ray", "--ray-replica-cpus", "0.25")
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(tmp_path / "log", *ray)) as server,
        server.client() as http,
    ):
        assert start(http, candidate="2", **SPEC).status_code == 201
        document, served = play_until(http, np.random.default_rng(8), _final, 4000)
        assert document["state"] == "promoted", (document, served)
        assert traffic(http) == {"1": 0.0, "2": 100.0, "3": 0.0}


def test_a_bad_rollout_entry_in_repository_yaml_names_its_field() -> None:
    from policy_server.errors import PolicyLoadError
    from policy_server.loading.repository import RepositoryConfig

    good = RepositoryConfig.coerce({"policies": {"p": {"rollout": {"candidate": 3}}}}, "r.yaml")
    rollout = good.policies["p"].rollout
    assert rollout is not None and rollout.candidate == "3" and rollout.steps == [5, 20, 50]
    for entry, where in (
        ({"candidate": "3", "steps": [20, 10]}, "policies.p.rollout.steps"),
        ({"candidate": "3", "steps": [120]}, "policies.p.rollout.steps.0"),
        ({"candidate": "3", "alpha": 0.7}, "policies.p.rollout.alpha"),
        ({"steps": [10]}, "policies.p.rollout.candidate"),
    ):
        with pytest.raises(PolicyLoadError, match=f"r.yaml: {where}"):
            RepositoryConfig.coerce({"policies": {"p": {"rollout": entry}}}, "r.yaml")
