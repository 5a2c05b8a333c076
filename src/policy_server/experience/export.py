"""Export joined experience for offline RL and bandit tools.

- `rllib`: JSON lines, one row per transition, in RLlib's column names (`eps_id`, `t`, `obs`,
  `new_obs`, `actions`, `rewards`, `terminateds`, `truncateds`, `action_prob`,
  `action_logp`, `action_dist_inputs`, `vf_preds`), which `ray.data.read_json` and RLlib's
  offline input (`config.offline_data(input_=..., input_read_method="read_json")`) read.
- `parquet`: the same rows, for `ray.data.read_parquet` and RLlib's default offline reader.
- `minari`: a Minari dataset named OUT (a dataset id, written under MINARI_DATASETS_PATH).
- `dsjson`: Vowpal Wabbit's DSJSON, one contextual-bandit event per decision.

OUT is a directory for every format but `minari`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from policy_server.experience.episodes import Episode, Experience, load_experience, propensity
from policy_server.extras import missing_extra

FORMATS = ("rllib", "parquet", "minari", "dsjson")


def export_experience(
    log_dir: Path,
    out: Path | str,
    fmt: str,
    default_reward: float | None = None,
    *,
    policy: str | None = None,
) -> dict[str, Any]:
    """Join a decision log into episodes and write them in `fmt`; returns a summary.

    Decisions without a reward are left out (with the rest of their episode) unless
    `default_reward` is given, in which case they get it.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    experience = load_experience(Path(log_dir), policy=policy, default_reward=default_reward)
    if not experience.episodes:
        raise ValueError(f"{log_dir}: no decision with a reward to export")
    writers = {"rllib": _rllib, "parquet": _parquet, "minari": _minari, "dsjson": _dsjson}
    written = writers[fmt](experience, out)
    return {"format": fmt, "out": str(written), **experience.summary()}


def rllib_rows(experience: Experience) -> Iterator[dict[str, Any]]:
    for episode in experience.episodes:
        yield from _episode_rows(episode)


def _episode_rows(episode: Episode) -> Iterator[dict[str, Any]]:
    terminateds, truncateds = episode.terminateds, episode.truncateds
    for t, decision in enumerate(episode.decisions):
        probability = propensity(decision)
        row = {
            "eps_id": episode.episode_id,
            "agent_index": 0,
            "t": t,
            "obs": decision["obs"],
            "new_obs": episode.next_obs[t],
            "actions": _action(decision),
            "rewards": float(episode.rewards[t]),
            "terminateds": terminateds[t],
            "truncateds": truncateds[t],
            "action_prob": probability,
            "action_logp": float(decision["log_probability"]) if decision["sampled"] else 0.0,
            "action_dist_inputs": decision["logits"],
        }
        if decision["value"] is not None:
            row["vf_preds"] = decision["value"]
        if "state_in" in decision:  # a recurrent policy: what RLlib feeds it at each step
            prev = decision["prev_actions"]
            if decision["distribution"].get("probabilities") is not None:
                prev = [int(a) for a in prev]  # discrete actions, as `actions` has them
            row["prev_actions"] = prev if isinstance(row["actions"], list) else prev[0]
            row["prev_rewards"] = decision["prev_rewards"]
            for index, state in enumerate(decision["state_in"]):
                row[f"state_in_{index}"] = state
        yield row


def _action(decision: dict[str, Any]) -> Any:
    """A Discrete action is a plain int in RLlib's batches; other spaces stay lists."""
    actions = decision["actions"]
    probabilities = decision["distribution"].get("probabilities")
    if probabilities is not None and len(probabilities) == 1:
        return actions[0]
    return actions


def _output_dir(out: Path | str) -> Path:
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _rllib(experience: Experience, out: Path | str) -> Path:
    path = _output_dir(out) / "experience-000000.json"
    with path.open("wb") as file:
        for row in rllib_rows(experience):
            file.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
    return path


def _parquet(experience: Experience, out: Path | str) -> Path:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise missing_extra("experience", "the parquet export", cause=error) from None
    rows = list(rllib_rows(experience))
    if any("vf_preds" not in row for row in rows):
        for row in rows:
            row.pop("vf_preds", None)
    path = _output_dir(out) / "experience-000000.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _minari(experience: Experience, out: Path | str) -> str:
    try:
        import minari
        from minari.data_collector import EpisodeBuffer
    except ImportError as error:
        raise missing_extra("experience", "the minari export", cause=error) from None
    buffers = [
        EpisodeBuffer(
            id=index,
            observations=np.array([*(d["obs"] for d in e.decisions), e.next_obs[-1]], np.float32),
            actions=np.array([_action(d) for d in e.decisions]),
            rewards=e.rewards.tolist(),
            terminations=e.terminateds,
            truncations=e.truncateds,
        )
        for index, e in enumerate(experience.episodes)
    ]
    dataset_id = str(out)
    with warnings.catch_warnings():
        # A served policy has no Gymnasium environment, code link or author to record;
        # Minari warns about each missing one, which tells a user of this export nothing.
        warnings.filterwarnings(
            "ignore",
            r"`?(code_permalink|author|author_email|eval_env)`? is set to None|env_spec is None",
            UserWarning,
        )
        _create_minari(minari, dataset_id, buffers, experience)
    return dataset_id


def _create_minari(
    minari: Any, dataset_id: str, buffers: list[Any], experience: Experience
) -> None:
    first = experience.episodes[0].decisions[0]
    minari.create_dataset_from_buffers(
        dataset_id=dataset_id,
        buffer=buffers,
        observation_space=_observation_space(len(first["obs"])),
        action_space=_action_space(first["distribution"]),
        algorithm_name=f"policy-server decision log of {experience.policy}",
        description=f"Decisions of policy {experience.policy!r} served by policy-server, "
        "joined with the rewards its clients reported.",
    )


def _observation_space(width: int) -> Any:
    import gymnasium as gym

    return gym.spaces.Box(-np.inf, np.inf, (width,), np.float32)


def _action_space(distribution: dict[str, Any]) -> Any:
    """The logged distribution says the space: one categorical per component, or a Gaussian."""
    import gymnasium as gym

    probabilities = distribution.get("probabilities")
    if probabilities is None:
        return gym.spaces.Box(-np.inf, np.inf, (len(distribution["mean"]),), np.float32)
    if len(probabilities) == 1:
        return gym.spaces.Discrete(len(probabilities[0]))
    return gym.spaces.MultiDiscrete([len(p) for p in probabilities])


def _dsjson(experience: Experience, out: Path | str) -> Path:
    path = _output_dir(out) / "experience-000000.dsjson"
    with path.open("wb") as file:
        for episode in experience.episodes:
            for decision, reward in zip(episode.decisions, episode.rewards, strict=True):
                file.write(orjson.dumps(dsjson_event(decision, float(reward))) + b"\n")
    return path


def dsjson_event(decision: dict[str, Any], reward: float) -> dict[str, Any]:
    """One contextual-bandit event as Vowpal Wabbit's `--dsjson` reader takes it.

    VW minimises cost, so the cost is the negated reward. `a` lists action ids (1-based)
    with the chosen one first and `p` their probabilities in that order; a masked action
    stays listed with probability 0 so that ids mean the same action in every event.
    """
    probabilities = decision["distribution"].get("probabilities")
    if probabilities is None or len(probabilities) != 1:
        raise ValueError(
            "the dsjson export needs a Discrete action space (one categorical component); "
            f"policy {decision['policy']!r} logs {_describe(decision['distribution'])}"
        )
    chosen = int(decision["actions"][0])
    pmf = list(probabilities[0]) if decision["sampled"] else _one_hot(len(probabilities[0]), chosen)
    order = [chosen] + [a for a in range(len(pmf)) if a != chosen]
    return {
        "_label_cost": -reward,
        "_label_probability": propensity(decision),
        "_label_Action": chosen + 1,
        "_labelIndex": chosen,
        "Timestamp": _timestamp(decision["time"]),
        "Version": "1",
        "EventId": decision["decision_id"],
        "a": [a + 1 for a in order],
        "c": {
            "obs": decision["obs"],
            "_multi": [{"action": {f"a{a}": 1}} for a in range(len(pmf))],
        },
        "p": [pmf[a] for a in order],
        "VWState": {"m": f"{decision['policy']}/{decision['version']}"},
    }


def _one_hot(size: int, index: int) -> list[float]:
    return [1.0 if a == index else 0.0 for a in range(size)]


def _describe(distribution: dict[str, Any]) -> str:
    probabilities = distribution.get("probabilities")
    if probabilities is None:
        return f"a Gaussian over {len(distribution['mean'])} dimensions"
    return f"{len(probabilities)} categorical components"


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
