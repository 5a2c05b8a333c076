"""The decision log behind a real server: every acknowledged decision survives a
SIGTERM and a kill -9 under load, rewards and episode ends join over HTTP across restarts,
the exports made by the command are read back by their consumers, and `evaluate` on a log
the server wrote covers a value known in closed form."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from policy_server.experience.files import list_streams, read_records
from policy_server.experience.index import DecisionIndex
from tests.experience.test_evaluation import (
    CANDIDATE,
    CONTEXTS,
    LOGGING,
    MEANS,
    NOISE,
    SCHEMA,
    true_value,
)
from tests.experience.test_export import rllib_episodes
from tests.policies import EXAMPLE, EXAMPLE_KEY, ROOT, linear_onnx_policy
from tests.servers import RunningServer, free_port, serving

CLIENTS = 32
# Acknowledged decisions before the signal; each client stops at its first refusal.
SIGNAL_AFTER = 300
MAX_REQUESTS_PER_CLIENT = 200
OBSERVATION = {
    "cart_position": 0.1,
    "cart_velocity": -0.2,
    "pole_angle": 0.05,
    "pole_angular_velocity": 0.3,
}
RAW = [0.1, -0.2, 0.05, 0.3]
ROTATE_MB = "0.02"  # about 40 decisions a file


@dataclass
class Load:
    """What the clients were told: each acknowledged decision id with its episode and step."""

    acknowledged: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)
    refusals: Counter[str] = field(default_factory=Counter)
    enough: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, answers: list[dict[str, Any]]) -> None:
        for answer in answers:
            self.acknowledged[answer["decision_id"]] = (
                answer.get("episode_id"),
                answer.get("step"),
            )
        if len(self.acknowledged) >= SIGNAL_AFTER:
            self.enough.set()


def request_of(client: int, step: int) -> tuple[str, dict[str, Any]]:
    """Four kinds of request: typed and raw, flat and in an episode envelope, single and batch."""
    episode = f"client-{client}"
    if client % 4 == 0:
        return "/predict", OBSERVATION
    if client % 4 == 1:
        return "/predict", {"observation": OBSERVATION, "episode_id": episode, "step": step}
    if client % 4 == 2:
        return "/predict_raw", {"obs": RAW}
    envelope = {"observation": {"obs": RAW}, "episode_id": episode, "step": step}
    return "/predict_raw_batch", {"observations": [RAW, envelope]}


async def client_loop(server: RunningServer, client: int, load: Load) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
        for step in range(MAX_REQUESTS_PER_CLIENT):
            path, body = request_of(client, step)
            try:
                response = await http.post(path, json=body)
            except httpx.TransportError as error:
                load.refusals[type(error).__name__] += 1
                return
            if response.status_code != 200:
                load.refusals[str(response.status_code)] += 1
                return
            answer = response.json()
            load.take(answer.get("predictions", [answer]))


async def load_then_signal(server: RunningServer, stop: Callable[[RunningServer], None]) -> Load:
    """Load the server from CLIENTS clients and `stop` it once SIGNAL_AFTER decisions are
    acknowledged; the clients go on until the server refuses them."""
    load = Load()
    clients = [asyncio.create_task(client_loop(server, c, load)) for c in range(CLIENTS)]
    await asyncio.wait(
        [asyncio.create_task(load.enough.wait()), *clients],
        return_when=asyncio.FIRST_COMPLETED,
    )
    assert load.enough.is_set(), f"the load stopped early: {load.refusals}"
    stop(server)
    await asyncio.gather(*clients)
    return load


def decisions_in(directory: Path) -> dict[str, dict[str, Any]]:
    return {r["decision_id"]: r for r in read_records(directory) if r["type"] == "decision"}


def assert_all_logged(load: Load, directory: Path) -> None:
    logged = decisions_in(directory)
    missing = set(load.acknowledged) - set(logged)
    assert not missing, f"{len(missing)} of {len(load.acknowledged)} acknowledged ids lost"
    for decision_id, (episode, step) in load.acknowledged.items():
        record = logged[decision_id]
        assert (record["episode_id"], record["step"]) == (episode, step)
        assert record["policy"] == "cartpole" and record["sampled"]


def wait_for_exit(server: RunningServer) -> int:
    return server.process.wait(timeout=60)


def sigterm(server: RunningServer) -> None:
    server.process.send_signal(signal.SIGTERM)


def kill_9(server: RunningServer) -> None:
    """SIGKILL the server and, under `--workers`, its workers at once, as a crash of the
    machine or the container would."""
    supervisor = psutil.Process(server.process.pid)
    workers = supervisor.children(recursive=True)
    for process in (supervisor, *workers):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(workers, timeout=30)


# Two workers with a queue of 2 records: callers also wait for room while the server drains.
@pytest.mark.parametrize(("workers", "queue"), [("1", "10000"), ("2", "2")])
def test_sigterm_under_load_loses_no_acknowledged_decision(
    cache_dir: Path, tmp_path: Path, workers: str, queue: str
) -> None:
    log = tmp_path / "log"
    flags = (
        *("--decision-log", str(log), "--decision-log-rotate-mb", ROTATE_MB),
        *("--workers", workers, "--decision-log-queue", queue),
    )
    with serving(EXAMPLE, cache_dir, tmp_path, EXAMPLE_KEY, *flags) as server:
        load = asyncio.run(load_then_signal(server, sigterm))
        # uvicorn shuts down cleanly, then re-raises the signal it caught.
        assert wait_for_exit(server) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.output()
    assert len(load.acknowledged) >= SIGNAL_AFTER
    assert_all_logged(load, log)
    files = [path for _, _, path in list_streams(log)]
    assert len(files) > 1, "rotation by size never happened"
    assert all(path.name.endswith(".jsonl.gz") for path in files)
    index = DecisionIndex(log, durable=False)
    try:
        assert index.known(list(load.acknowledged)) == set(load.acknowledged)
    finally:
        index.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_kill_9_in_sync_mode_loses_no_acknowledged_decision_and_rewards_join_after_restart(
    cache_dir: Path, tmp_path: Path, workers: str
) -> None:
    log = tmp_path / "log"
    flags = (
        "--decision-log",
        str(log),
        "--decision-log-rotate-mb",
        ROTATE_MB,
        "--workers",
        workers,
    )
    with serving(EXAMPLE, cache_dir, tmp_path, EXAMPLE_KEY, *flags, "--decision-log-sync") as s:
        load = asyncio.run(load_then_signal(s, kill_9))
        assert wait_for_exit(s) == -signal.SIGKILL
    assert_all_logged(load, log)

    by_age = ("--decision-log-rotate-s", "1")
    with (
        serving(EXAMPLE, cache_dir, tmp_path, EXAMPLE_KEY, *flags, *by_age) as server,
        server.client() as http,
    ):
        rewards = [{"decision_id": i, "reward": 1.0} for i in load.acknowledged]
        answer = http.post("/rewards", json=rewards).json()
        assert (answer["joined"], answer["unknown"]) == (len(rewards), 0)
        episode = play_episode(http, "after-restart", [0.5, 1.0, 2.0])
        assert http.post("/episodes/never-seen/end").json() == {
            "episode_id": "never-seen",
            "status": "unknown_episode",
        }
        # The killed run's files were recovered at start; the new ones are rotated by age
        # while the server idles.
        assert eventually(lambda: not uncompressed(log)), uncompressed(log)

    rows = export(log, tmp_path / "rllib", "rllib")
    mine = [row for row in rows if row["eps_id"] == "after-restart"]
    assert [row["t"] for row in mine] == [0, 1, 2]
    assert [row["rewards"] for row in mine] == [0.5, 1.0, 2.0]
    assert [row["terminateds"] for row in mine] == [False, False, True]
    assert [row["actions"] for row in mine] == [d["actions"][0] for d in episode]
    # RLlib maps each row to a one-step chunk of its episode.
    chunks = [e for e in rllib_episodes(rows) if e.id_ == "after-restart"]
    assert [len(e) for e in chunks] == [1, 1, 1]
    assert [e.is_terminated for e in chunks] == [False, False, True]
    assert sum(e.get_return() for e in chunks) == 3.5


def uncompressed(log: Path) -> list[Path]:
    return [path for _, _, path in list_streams(log) if path.suffix == ".jsonl"]


def eventually(condition: Callable[[], bool]) -> bool:
    """Poll a condition that a server thread makes true in its own time."""
    for _ in range(300):
        if condition():
            return True
        time.sleep(0.1)
    return False


def play_episode(http: httpx.Client, episode: str, rewards: list[float]) -> list[dict[str, Any]]:
    """One envelope prediction per reward, each rewarded, then the episode's end."""
    answers = []
    for step, reward in enumerate(rewards):
        body = {"observation": OBSERVATION, "episode_id": episode}
        answer = http.post("/predict", json=body).json()
        assert (answer["episode_id"], answer["step"]) == (episode, step)
        joined = http.post(
            "/rewards", json=[{"decision_id": answer["decision_id"], "reward": reward}]
        )
        assert joined.json()["joined"] == 1
        answers.append(answer)
    end = http.post(f"/episodes/{episode}/end", json={"terminated": True})
    assert end.json() == {"episode_id": episode, "status": "closed"}
    return answers


def export(log: Path, out: Path, fmt: str) -> list[dict[str, Any]]:
    """`policy-server export-experience` as a user runs it; the exported lines, parsed."""
    command = ["export-experience", str(log), str(out), "--format", fmt]
    summary = json.loads(policy_server(command, out.parent))
    return [json.loads(line) for line in Path(summary["out"]).read_text().splitlines()]


def policy_server(arguments: list[str], tmp: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "policy_server.hosting.cli", *arguments],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "POLICY_SERVER_CACHE_DIR": str(tmp / "cli-cache")},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


BANDIT_ROUNDS = 3000
BANDIT_BATCH = 250
BANDIT_KEY = "x"  # test_evaluation's SCHEMA


@dataclass
class Round:
    context: int
    answer: dict[str, Any]
    reward: float


def bandit_policy(folder: Path, weights: np.ndarray, bias: np.ndarray) -> Path:
    folder.mkdir()
    linear_onnx_policy(folder / "model.onnx", weights, bias)
    (folder / "schema.yaml").write_text(SCHEMA.format(n=len(bias)))
    return folder


def play_bandit(http: httpx.Client, rng: np.random.Generator) -> list[Round]:
    """Contexts drawn by the client, actions sampled by the server (seeded per request),
    rewards MEANS[context, action] + noise."""
    rounds = []
    for batch in range(BANDIT_ROUNDS // BANDIT_BATCH):
        contexts = rng.integers(len(CONTEXTS), size=BANDIT_BATCH)
        body = {"observations": [CONTEXTS[c].tolist() for c in contexts]}
        response = http.post("/predict_raw_batch", params={"seed": batch}, json=body)
        for context, answer in zip(contexts, response.json()["predictions"], strict=True):
            mean = MEANS[context, answer["actions"][0]]
            rounds.append(Round(int(context), answer, float(mean + NOISE * rng.standard_normal())))
    return rounds


def post_rewards(http: httpx.Client, items: list[tuple[str, float]]) -> dict[str, Any]:
    body = [{"decision_id": decision_id, "reward": reward} for decision_id, reward in items]
    response = http.post("/rewards", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def metric_values(url: str) -> dict[str, float]:
    text = httpx.get(url, timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def metrics_now(url: str, expected: Mapping[str, float]) -> dict[str, float]:
    values = metric_values(url)
    return {name: values.get(name, float("nan")) for name in expected}


def test_bandit_rewards_over_http_join_across_a_restart_export_and_evaluate(
    cache_dir: Path, tmp_path: Path
) -> None:
    logging = bandit_policy(tmp_path / "logging", *LOGGING)
    candidate = bandit_policy(tmp_path / "candidate", *CANDIDATE)
    log = tmp_path / "log"
    metrics_port = free_port()
    # Two workers: a reward may reach the one that did not answer its decision.
    flags = ("--decision-log", str(log), "--workers", "2")
    rng = np.random.default_rng(11)
    with (
        serving(
            logging, cache_dir, tmp_path, BANDIT_KEY, *flags, "--metrics-port", str(metrics_port)
        ) as server,
        server.client() as http,
    ):
        rounds = play_bandit(http, rng)
        first, *middle, last = rounds
        answer = post_rewards(http, [(r.answer["decision_id"], r.reward) for r in middle])
        assert (answer["joined"], answer["unknown"]) == (len(middle), 0)
        half = first.reward / 2
        first_id = first.answer["decision_id"]
        assert post_rewards(http, [(first_id, half)])["joined"] == 1
        answer = post_rewards(http, [("never-logged", 1.0), (first_id, first.reward - half)])
        assert answer == {
            "joined": 1,
            "unknown": 1,
            "results": [
                {"decision_id": "never-logged", "status": "unknown_decision"},
                {"decision_id": first_id, "status": "joined"},
            ],
        }
        expected = {
            "policy_server_decisions_logged_total": BANDIT_ROUNDS,
            "policy_server_rewards_joined_total": BANDIT_ROUNDS,
            "policy_server_rewards_unknown_total": 1,
            "policy_server_decisions_awaiting_reward": 1,
        }
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        # The writer counts a group once it is written, after the answer.
        eventually(lambda: metrics_now(metrics_url, expected) == expected)
        assert metrics_now(metrics_url, expected) == expected
    with (
        serving(logging, cache_dir, tmp_path, BANDIT_KEY, *flags) as server,
        server.client() as http,
    ):
        assert post_rewards(http, [(last.answer["decision_id"], last.reward)])["joined"] == 1

    check_dsjson(export(log, tmp_path / "dsjson", "dsjson"), rounds)
    reports = [evaluate(log, folder, tmp_path) for folder in (logging, candidate)]
    for (weights, bias), report in zip((LOGGING, CANDIDATE), reports, strict=True):
        truth = true_value(weights, bias)
        assert (report["n"], report["warnings"]) == (BANDIT_ROUNDS, [])
        for name in ("ips", "snips", "wis", "dr"):
            estimate = report["estimators"][name]
            assert estimate["ci_low"] <= truth <= estimate["ci_high"], (name, truth, estimate)
    logged, better = reports
    # On its own log every importance weight is 1: IPS is the logged mean.
    assert logged["estimators"]["ips"]["estimate"] == pytest.approx(logged["logged_value"])
    assert better["estimators"]["dr"]["ci_low"] > logged["estimators"]["dr"]["ci_high"]


def evaluate(log: Path, candidate: Path, tmp: Path) -> dict[str, Any]:
    """`policy-server evaluate LOG CANDIDATE --json`."""
    command = ["evaluate", str(log), str(candidate), "--json", "--bootstrap", "400"]
    report: dict[str, Any] = json.loads(policy_server(command, tmp))
    return report


def check_dsjson(events: list[dict[str, Any]], rounds: list[Round]) -> None:
    """Every round is one event with its summed reward as cost, and Vowpal Wabbit parses
    each with the logged action and probability as its label."""
    vowpalwabbit = pytest.importorskip("vowpalwabbit")
    by_id = {r.answer["decision_id"]: r for r in rounds}
    assert sorted(e["EventId"] for e in events) == sorted(by_id)
    parser = vowpalwabbit.Workspace("--cb_explore_adf --dsjson --quiet")
    try:
        for event in events:
            played = by_id[event["EventId"]]
            examples = parser.parse(json.dumps(event))
            chosen = examples[1 + played.answer["actions"][0]]
            label = chosen.get_label(vowpalwabbit.LabelType.CONTEXTUAL_BANDIT).costs[0]
            assert label.cost == pytest.approx(-played.reward)
            assert label.probability == pytest.approx(played.answer["probability"])
            parser.finish_example(examples)
    finally:
        parser.finish()


STEPS = 6
EPISODES = 8


async def episode_without_steps(server: RunningServer, episode: str) -> list[int]:
    """An episode whose steps the server counts, each request on a new connection."""
    steps = []
    body = {"observation": OBSERVATION, "episode_id": episode}
    for _ in range(STEPS):
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
            steps.append((await http.post("/predict", json=body)).json()["step"])
    return steps


async def episodes_without_steps(server: RunningServer) -> list[list[int]]:
    return await asyncio.gather(*(episode_without_steps(server, f"e{i}") for i in range(EPISODES)))


def test_steps_the_server_counts_follow_each_other_across_workers(
    cache_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    flags = ("--decision-log", str(log), "--workers", "2")
    with serving(EXAMPLE, cache_dir, tmp_path, EXAMPLE_KEY, *flags) as server:
        answered = asyncio.run(episodes_without_steps(server))
    logged: dict[str, list[int]] = {}
    for record in decisions_in(log).values():
        logged.setdefault(record["episode_id"], []).append(record["step"])
    assert answered == [list(range(STEPS))] * EPISODES
    assert all(sorted(steps) == list(range(STEPS)) for steps in logged.values())
