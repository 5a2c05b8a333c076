"""The real RLlib LSTM export (../shared/rllib-exports/cartpole_lstm) replayed through a real
server with two workers, a new connection per step: every step's logits and value are the
ones RLlib's own compute_single_action gave (truth.json), with another episode interleaved,
and after `POST /episodes/{id}/end` the episode starts over."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from policy_server.experience.files import ReadStats, read_records
from tests.policies import PATHMIND_KEY, ROOT
from tests.servers import serving

EXPORT = ROOT.parent / "shared" / "rllib-exports" / "cartpole_lstm"
FIELDS = ("cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity")
TOLERANCE = 1e-5


def _truth() -> list[dict[str, Any]]:
    if not (EXPORT / "truth.json").is_file():
        pytest.skip(f"needs the real RLlib export: {EXPORT} is absent")
    steps: list[dict[str, Any]] = json.loads((EXPORT / "truth.json").read_text())["steps"]
    return steps


PATIENCE_S = 60


def _step(
    url: str,
    episode: str,
    truth: dict[str, Any],
    client: httpx.Client | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One step, on `client`'s connection, else on a new connection of its own."""
    body = {
        "observation": dict(zip(FIELDS, truth["obs"], strict=True)),
        "episode_id": episode,
        "reward": truth["prev_reward"],
        **extra,
    }
    headers = {"access-token": PATHMIND_KEY}
    path = url + "/predict_deterministic"
    answer = (client or httpx).post(path, json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    result["worker"] = answer.headers["policy-server-worker"]
    return result


def _one_connection_per_worker(url: str) -> list[httpx.Client]:
    """New connections until each of the two workers holds one (the kernel hands a new
    connection to whichever worker accepts first)."""
    found: dict[str, httpx.Client] = {}
    deadline = time.monotonic() + PATIENCE_S
    while len(found) < 2 and time.monotonic() < deadline:
        client = httpx.Client(base_url=url, headers={"access-token": PATHMIND_KEY})
        worker = client.get("/schema").headers["policy-server-worker"]
        if worker in found:
            client.close()
        else:
            found[worker] = client
        time.sleep(0.02)
    assert sorted(found) == ["0", "1"]
    return [found["0"], found["1"]]


def _logged(log: Path) -> dict[str, dict[str, Any]]:
    return {
        r["decision_id"]: r for r in read_records(log, ReadStats()) if r.get("type") == "decision"
    }


def test_cartpole_lstm_matches_rllib_step_by_step(tmp_path: Path, cache_dir: Path) -> None:
    truth = _truth()
    log = tmp_path / "decisions"
    flags = ("--workers", "2", "--decision-log", str(log), "--decision-log-sync")
    with serving(EXPORT, cache_dir, tmp_path, PATHMIND_KEY, *flags) as server:
        schema = httpx.get(server.url + "/schema", headers=server.headers).json()
        assert schema["recurrent"]["state_sizes"] == [16, 16]
        answers: list[tuple[str, dict[str, Any]]] = []
        pinned = _one_connection_per_worker(server.url)
        for index, step in enumerate(truth):
            # a: its steps alternate between the workers; b, interleaved with it and fed the
            # same observations: a new connection per step.
            for episode, client in (("a", pinned[index % 2]), ("b", None)):
                answer = _step(server.url, episode, step, client)
                assert answer["step"] == index
                assert answer["episode_state"] == ("initial" if index == 0 else "held")
                assert answer["state_reset"] is False
                assert answer["actions"] == [step["action"]]
                answers.append((episode, answer))
        # Ended, then started over: zeros again, counted from 0.
        end = httpx.post(server.url + "/episodes/a/end", headers=server.headers)
        assert end.status_code == 200, end.text
        again = [_step(server.url, "a", step) for step in truth[:3]]
        assert [a["step"] for a in again] == [0, 1, 2]
        answers += [("a", a) for a in again]
        # An unknown episode at a step past 0 restarts from zeros, and says so.
        reset = _step(server.url, "c", truth[0], step=7)
        assert reset["state_reset"] is True and reset["episode_state"] == "initial"
        for client in pinned:
            client.close()
    assert {a["worker"] for e, a in answers if e == "a"} == {"0", "1"}
    logged = _logged(log)
    expected = [step for step in truth for _ in ("a", "b")] + truth[:3]
    for (episode, answer), step in zip(answers, expected, strict=True):
        record = logged[answer["decision_id"]]
        assert np.allclose(record["logits"], step["logits"], atol=TOLERANCE, rtol=0), episode
        assert abs(answer["value"] - step["vf"]) <= TOLERANCE
        assert np.allclose(record["state_in"], step["state_in"], atol=TOLERANCE, rtol=0)
    # Each step's reward was logged as the reward of the decision before it.
    rewards = [r for r in read_records(log, ReadStats()) if r.get("type") == "reward"]
    first_a = [a for e, a in answers if e == "a"][: len(truth)]
    rewarded = {r["decision_id"]: r["reward"] for r in rewards}
    for previous, step in zip(first_a, truth[1:], strict=False):
        assert rewarded[previous["decision_id"]] == step["prev_reward"]
