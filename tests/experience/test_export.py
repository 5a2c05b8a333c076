"""Each export format read back by its own consumer: Ray Data, RLlib, Minari, Vowpal Wabbit."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from policy_server.experience import DecisionLog
from policy_server.experience.export import export_experience
from tests.experience.records import decision

CONTEXTS = np.eye(4)


def bandit_log(directory: Path, count: int, *, unrewarded: int = 0) -> list[dict[str, Any]]:
    """Uniform logging over 4 actions; context k is one-hot, and action k earns 1."""
    rng = np.random.default_rng(7)
    records = [decision(CONTEXTS[rng.integers(4)], np.zeros(4), rng) for _ in range(count)]
    rewards = [
        {"decision_id": r["decision_id"], "reward": float(r["obs"][r["actions"][0]])}
        for r in records[: count - unrewarded]
    ]
    write(directory, records, rewards)
    return records  # type: ignore[return-value]


def write(
    directory: Path, records: list[Any], rewards: list[Any], ends: tuple[str, ...] = ()
) -> None:
    async def scenario() -> None:
        log = DecisionLog(directory)
        await log.append(records)
        results = await log.add_rewards(rewards)
        assert {r["status"] for r in results} <= {"joined"}
        for episode_id in ends:
            await log.end_episode(episode_id)
        await log.aclose()

    asyncio.run(scenario())


def episodic_log(directory: Path) -> list[dict[str, Any]]:
    """Two episodes of 3 steps with values: `e1` ended, `e2` still running, its last step
    without reward; plus a second reward for e1's first step."""
    rng = np.random.default_rng(3)
    records = [
        decision(rng.normal(size=4), rng.normal(size=4), rng, episode_id=e, step=s, value=0.5)
        for e in ("e1", "e2")
        for s in (2, 0, 1)  # out of order on purpose: steps, not arrival, order an episode
    ]
    rewards = [
        {"decision_id": r["decision_id"], "reward": 1.0} for i, r in enumerate(records) if i != 3
    ]
    rewards.append({"decision_id": records[1]["decision_id"], "reward": 0.25})
    write(directory, records, rewards, ends=("e1",))
    return records  # type: ignore[return-value]


def test_rllib_rows_join_rewards_order_steps_and_cut_unrewarded_tails(tmp_path: Path) -> None:
    records = episodic_log(tmp_path / "log")
    summary = export_experience(tmp_path / "log", tmp_path / "out", "rllib")
    assert summary["episodes"] == 2
    assert summary["decisions_left_out_without_reward"] == 1
    rows = [json.loads(line) for line in Path(summary["out"]).read_text().splitlines()]
    e1 = [row for row in rows if row["eps_id"] == "e1"]
    assert [row["t"] for row in e1] == [0, 1, 2]
    assert [row["rewards"] for row in e1] == [1.25, 1.0, 1.0]
    assert [row["obs"] for row in e1] == [records[i]["obs"] for i in (1, 2, 0)]
    assert [row["new_obs"] for row in e1[:2]] == [records[i]["obs"] for i in (2, 0)]
    assert [(row["terminateds"], row["truncateds"]) for row in e1] == [(False, False)] * 2 + [
        (True, False)
    ]
    e2 = [row for row in rows if row["eps_id"] == "e2"]
    # e2's step 2 has no reward yet: the episode so far, not ended, its last new_obs real.
    assert [row["t"] for row in e2] == [0, 1]
    assert e2[-1]["new_obs"] == records[3]["obs"]
    assert not e2[-1]["terminateds"] and not e2[-1]["truncateds"]
    assert e1[0]["action_logp"] == pytest.approx(np.log(e1[0]["action_prob"]))
    assert e1[0]["vf_preds"] == 0.5


def test_a_default_reward_keeps_decisions_that_have_none(tmp_path: Path) -> None:
    episodic_log(tmp_path / "log")
    summary = export_experience(tmp_path / "log", tmp_path / "out", "rllib", default_reward=0.0)
    assert summary["steps"] == 6
    assert summary["decisions_given_default_reward"] == 1


def test_ray_data_and_rllib_read_the_rllib_and_parquet_exports(tmp_path: Path) -> None:
    pytest.importorskip("ray.data")

    bandit_log(tmp_path / "log", 50)
    json_out = export_experience(tmp_path / "log", tmp_path / "json", "rllib")
    parquet_out = export_experience(tmp_path / "log", tmp_path / "parquet", "parquet")
    from_json, from_parquet = ray_data_rows(tmp_path / "json", tmp_path / "parquet")
    assert len(from_json) == len(from_parquet) == json_out["steps"] == parquet_out["steps"] == 50
    by_id = {row["eps_id"]: row for row in from_parquet}
    for row in from_json:
        twin = by_id[row["eps_id"]]
        assert list(twin["obs"]) == row["obs"]
        assert (twin["actions"], twin["rewards"], twin["terminateds"]) == (
            row["actions"],
            row["rewards"],
            True,
        )
    episodes = rllib_episodes(from_parquet)
    assert len(episodes) == 50
    assert all(len(e) == 1 and e.is_terminated for e in episodes)
    assert sum(e.get_return() for e in episodes) == sum(row["rewards"] for row in from_json)


_RAY_DATA = """
import json, sys
import ray
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
try:
    rows = [
        ray.data.read_json(sys.argv[1]).take_all(),
        ray.data.read_parquet(sys.argv[2]).take_all(),
    ]
finally:
    ray.shutdown()
json.dump(rows, sys.stdout, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
"""


def ray_data_rows(json_dir: Path, parquet_dir: Path) -> tuple[list[dict], list[dict]]:  # type: ignore[type-arg]
    """The rows Ray Data reads from both exports, read in a process of its own: Ray (as
    RLlib below) leaves TensorFlow in graph mode for the tests that run after it here."""
    result = subprocess.run(
        [sys.executable, "-c", _RAY_DATA, str(json_dir), str(parquet_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from_json, from_parquet = json.loads(result.stdout)
    return from_json, from_parquet


@dataclass(frozen=True)
class RLlibEpisode:
    """What RLlib's mapping made of an episode's rows, as read back from its process."""

    id_: str
    steps: int
    is_terminated: bool
    total: float

    def __len__(self) -> int:
        return self.steps

    def get_return(self) -> float:
        return self.total


_RLLIB_MAPPING = """
import json, sys
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.offline.offline_prelearner import OfflinePreLearner

rows = json.load(sys.stdin)
prelearner = OfflinePreLearner.__new__(OfflinePreLearner)
prelearner.config = AlgorithmConfig()
columns = {key: [row[key] for row in rows] for key in rows[0]}
episodes = prelearner._map_to_episodes(columns)["episodes"]
json.dump([[e.id_, len(e), bool(e.is_terminated), float(e.get_return())] for e in episodes],
          sys.stdout)
"""


def rllib_episodes(rows: list[dict[str, object]]) -> list[RLlibEpisode]:
    """RLlib's own mapping from offline rows to SingleAgentEpisodes (its OfflinePreLearner).

    The pre-learner is made without __init__, which would build a learner and a model this
    test does not need; the mapping only reads the config's column schema. It runs in a
    process of its own: RLlib leaves TensorFlow in graph mode, which would break the tests
    that run after it in this process.
    """
    # Not imported here: RLlib imported before TensorFlow turns TensorFlow's eager mode off.
    if importlib.util.find_spec("ray.rllib") is None:
        pytest.skip("RLlib is not installed (the ray extra)")
    result = subprocess.run(
        [sys.executable, "-c", _RLLIB_MAPPING],
        input=json.dumps(rows, default=_plain),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [RLlibEpisode(*episode) for episode in json.loads(result.stdout)]


def _plain(value: object) -> object:
    """numpy values that Ray Data hands back, as JSON."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def test_minari_loads_the_exported_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    minari = pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    records = episodic_log(tmp_path / "log")
    export_experience(tmp_path / "log", "policy-server/bandit-v0", "minari")
    dataset = minari.load_dataset("policy-server/bandit-v0")
    assert dataset.total_episodes == 2
    assert dataset.total_steps == 5
    episodes = {len(e): e for e in dataset.iterate_episodes()}
    e1 = episodes[3]
    assert e1.observations.shape == (4, 4)
    np.testing.assert_allclose(e1.observations[0], records[1]["obs"], rtol=1e-6)
    assert e1.rewards.tolist() == [1.25, 1.0, 1.0]
    assert e1.terminations.tolist() == [False, False, True]
    assert dataset.action_space.n == 4


def test_vowpal_wabbit_parses_the_dsjson_export_and_learns_the_best_action(
    tmp_path: Path,
) -> None:
    vowpalwabbit = pytest.importorskip("vowpalwabbit")
    records = bandit_log(tmp_path / "log", 1000, unrewarded=10)
    summary = export_experience(tmp_path / "log", tmp_path / "out", "dsjson")
    assert summary["steps"] == 990
    lines = Path(summary["out"]).read_text().splitlines()
    parser = vowpalwabbit.Workspace("--cb_explore_adf --dsjson --quiet")
    first = records[0]
    examples = parser.parse(lines[0])
    chosen = examples[1 + first["actions"][0]]  # the shared example, then one per action
    label = chosen.get_label(vowpalwabbit.LabelType.CONTEXTUAL_BANDIT).costs[0]
    assert label.cost == -first["obs"][first["actions"][0]]
    assert label.probability == pytest.approx(0.25)
    parser.finish_example(examples)
    parser.finish()

    learner = vowpalwabbit.Workspace(
        f"--cb_explore_adf --dsjson --quiet --epsilon 0 -q ::  -d {summary['out']}"
    )
    for k in range(4):
        event = orjson.loads(lines[0])
        event["c"]["obs"] = CONTEXTS[k].tolist()
        pmf = learner.predict(orjson.dumps(event).decode())
        assert int(np.argmax(pmf)) == k
    learner.finish()


def test_dsjson_refuses_actions_that_are_not_one_categorical(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    record = decision(np.zeros(2), np.zeros(3), rng)
    record["distribution"] = {"mean": [0.0], "std": [1.0]}
    write(tmp_path / "log", [record], [{"decision_id": record["decision_id"], "reward": 1.0}])
    with pytest.raises(ValueError, match="needs a Discrete action space"):
        export_experience(tmp_path / "log", tmp_path / "out", "dsjson")


def box_and_multidiscrete(rng: np.random.Generator, kind: str) -> dict[str, Any]:
    record: dict[str, Any] = dict(
        decision(rng.normal(size=3), np.zeros(4), rng, episode_id="e", step=0)
    )
    if kind == "box":
        mean, std = [0.5, -0.5], [1.0, 2.0]
        actions = rng.normal(mean, std).tolist()
        record.update(actions=actions, distribution={"mean": mean, "std": std})
    else:
        record.update(
            actions=[1, 0],
            distribution={"probabilities": [[0.5, 0.5], [0.25, 0.75]]},
            probability=0.125,
            log_probability=float(np.log(0.125)),
        )
    return record


@pytest.mark.parametrize("kind", ["box", "multidiscrete"])
def test_minari_and_rllib_keep_box_and_multidiscrete_actions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    minari = pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    record = box_and_multidiscrete(np.random.default_rng(0), kind)
    write(
        tmp_path / "log", [record], [{"decision_id": record["decision_id"], "reward": 1.0}], ("e",)
    )
    rows = export_experience(tmp_path / "log", tmp_path / "out", "rllib")
    row = json.loads(Path(rows["out"]).read_text())
    assert row["actions"] == record["actions"]
    export_experience(tmp_path / "log", f"policy-server/{kind}-v0", "minari")
    dataset = minari.load_dataset(f"policy-server/{kind}-v0")
    episode = next(dataset.iterate_episodes())
    np.testing.assert_allclose(episode.actions[0], record["actions"], rtol=1e-6)
    assert dataset.action_space.shape == (2,)


def test_a_shadow_answer_logged_after_its_decision_joins_it(tmp_path: Path) -> None:
    from policy_server.experience.episodes import load_experience
    from tests.experience.records import simple

    record = simple(0)
    shadow = {
        "type": "shadow",
        "time": record["time"] + 1,
        "decision_id": record["decision_id"],
        "version": "v2",
        "actions": [1],
        "probability": 0.5,
        "distribution": {"probabilities": [[0.5, 0.5]]},
    }
    write(tmp_path, [record, shadow], [{"decision_id": record["decision_id"], "reward": 1.0}])
    (episode,) = load_experience(tmp_path).episodes
    assert episode.decisions[0]["shadow"] == {
        k: shadow[k] for k in ("version", "actions", "probability", "distribution")
    }
