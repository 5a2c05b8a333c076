"""Recurrent policies served with their state held per episode, through a real uvicorn: every
step's answer is the network's run by hand with the state fed back; state strings, resets,
the batch rule, and the envelope's reward in the decision log."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from policy_server.experience.files import ReadStats, read_records
from policy_server.hosting.app import build_app
from policy_server.settings import Settings
from tests.policies import EXAMPLE, EXAMPLE_KEY
from tests.recurrent_exports import CELL, Cell, cell, onnx_recurrent_policy, tf1_recurrent_policy
from tests.servers import app_in_thread

KEY = {"access-token": "k"}


@contextmanager
def served(folder: Path, cache: Path, **settings: Any) -> Iterator[httpx.Client]:
    app = build_app(
        Settings(
            policy_path=folder,
            cache_dir=cache,
            workers=1,
            metrics_port=0,
            client_languages="",
            **settings,
        )
    )
    with app_in_thread(app) as url, httpx.Client(base_url=url, headers=KEY) as client:
        yield client


def _body(obs: np.ndarray, **envelope: Any) -> dict[str, Any]:
    return {"observation": dict(zip("xyz", obs.tolist(), strict=True)), **envelope}


class ByHand:
    """One episode of the network run by hand, fed what the server should feed it."""

    def __init__(self, net: Cell) -> None:
        self.net = net
        self.h = np.zeros((1, CELL), np.float32)
        self.c = np.zeros((1, CELL), np.float32)
        self.prev = np.zeros((1, 1 if net.discrete else net.actions))
        self.reward = np.zeros(1, np.float32)

    def step(self, obs: np.ndarray) -> tuple[np.ndarray, float]:
        """The step's logits and value; `reward` and `prev` are what it is fed."""
        logits, value, self.h, self.c = self.net.step(
            obs[None].astype(np.float32), self.h, self.c, self.prev, self.reward
        )
        return logits[0], float(value[0])

    def answer(self, logits: np.ndarray) -> tuple[list[Any], float]:
        """The mode and its probability, from the logits."""
        net = self.net
        if net.discrete:
            action = int(np.argmax(logits))
            probabilities = np.exp(logits - logits.max())
            probabilities /= probabilities.sum()
            self.prev = np.array([[action]])
            return [action], float(probabilities[action])
        mean, log_std = logits[: net.actions], logits[net.actions :]
        self.prev = mean[None].astype(np.float64)
        density = float(np.prod(1 / (math.sqrt(2 * math.pi) * np.exp(log_std))))
        return mean.tolist(), density


KINDS = ["tf1-discrete", "tf1-continuous", "onnx"]


def _policy(kind: str, folder: Path) -> Cell:
    if kind == "onnx":
        net = cell()
        onnx_recurrent_policy(folder, net)
    else:
        net = cell(discrete=kind == "tf1-discrete", actions=3 if kind == "tf1-discrete" else 2)
        tf1_recurrent_policy(folder, net)
    return net


@pytest.mark.parametrize("kind", KINDS)
def test_episodes_step_as_the_network_by_hand(tmp_path: Path, cache_dir: Path, kind: str) -> None:
    net = _policy(kind, tmp_path)
    rng = np.random.default_rng(2)
    episodes = {"one": ByHand(net), "two": ByHand(net)}
    rewards = {"one": 0.0, "two": 0.0}
    with served(tmp_path, cache_dir) as client:
        schema = client.get("/schema").json()
        assert schema["recurrent"]["state_sizes"] == [CELL, CELL]
        assert schema["recurrent"]["reads_prev_action"] is True
        for index in range(6):
            for name, hand in episodes.items():  # two episodes interleaved
                obs = rng.normal(size=3)
                body = _body(obs, episode_id=name, reward=rewards[name])
                answer = client.post("/predict_deterministic", json=body)
                assert answer.status_code == 200, answer.text
                result = answer.json()
                logits, value = hand.step(obs)
                actions, probability = hand.answer(logits)
                assert result["step"] == index and result["episode_id"] == name
                assert result["episode_state"] == ("initial" if index == 0 else "held")
                assert result["state_reset"] is False
                np.testing.assert_allclose(result["actions"], actions, atol=1e-5)
                assert result["value"] == pytest.approx(value, abs=1e-5)
                assert result["probability"] == pytest.approx(probability, rel=1e-4)
                rewards[name] = float(rng.normal())
                hand.reward = np.array([rewards[name]], np.float32)


def test_state_strings_continue_an_episode_and_refuse_tampering(
    tmp_path: Path, cache_dir: Path
) -> None:
    net = cell()
    tf1_recurrent_policy(tmp_path, net)
    rng = np.random.default_rng(5)
    observations = [rng.normal(size=3) for _ in range(4)]
    with served(tmp_path, cache_dir) as client:
        held = [
            client.post(
                "/predict_deterministic",
                json=_body(obs, episode_id="held", reward=1.0, return_state=True),
            ).json()
            for obs in observations
        ]
        # A stateless client: no episode id, the state string of the answer before.
        state = None
        for obs, expected in zip(observations, held, strict=True):
            body = _body(obs, reward=1.0 if state else 0.0, return_state=True)
            if state is not None:
                body["state"] = state
            answer = client.post("/predict_deterministic", json=body).json()
            assert answer["value"] == pytest.approx(expected["value"], abs=1e-6)
            assert answer["episode_state"] == ("given" if state else "initial")
            assert "episode_id" not in answer
            state = answer["state"]
        assert state == held[-1]["state"]
        token = held[1]["state"]
        flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
        for bad in (flipped, token[:-8], "s1.nonsense", "x" + token[1:]):
            refused = client.post("/predict_deterministic", json=_body(observations[0], state=bad))
            assert refused.status_code == 422, bad
            assert [f["field"] for f in refused.json()["error"]["fields"]] == ["state"]
        # Without an episode id nothing is kept: the held episode goes on untouched.
        after = client.post(
            "/predict_deterministic", json=_body(observations[0], episode_id="held")
        )
        assert after.json()["step"] == 4 and after.json()["episode_state"] == "held"


def test_a_state_string_of_another_policy_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    tf1_recurrent_policy(first, cell(seed=1))
    tf1_recurrent_policy(second, cell(seed=2))
    obs = np.zeros(3)
    with served(first, cache_dir, extra_policy_paths=[second]) as client:
        token = client.post(
            "/policies/first/predict_deterministic", json=_body(obs, return_state=True)
        ).json()["state"]
        refused = client.post(
            "/policies/second/predict_deterministic", json=_body(obs, state=token)
        )
        assert refused.status_code == 422
        assert "first" not in refused.text or "second" in refused.text
        assert refused.json()["error"]["fields"][0]["field"] == "state"


def test_two_steps_of_one_episode_in_a_batch_are_refused(tmp_path: Path, cache_dir: Path) -> None:
    tf1_recurrent_policy(tmp_path, cell())
    obs = np.zeros(3)
    batch = {
        "observations": [
            _body(obs, episode_id="a"),
            _body(obs, episode_id="b"),
            _body(obs, episode_id="a"),
        ]
    }
    with served(tmp_path, cache_dir) as client:
        refused = client.post("/predict_batch", json=batch)
        assert refused.status_code == 422
        fields = [f["field"] for f in refused.json()["error"]["fields"]]
        assert fields == ["observations.2.episode_id"]
        assert "item 0" in refused.text
        # Different episodes in one batch are steps of each.
        batch["observations"].pop()
        answers = client.post("/predict_batch", json=batch).json()["predictions"]
        assert [a["step"] for a in answers] == [0, 0]


def test_evicted_and_ended_episodes_restart_from_zeros(tmp_path: Path, cache_dir: Path) -> None:
    net = cell()
    tf1_recurrent_policy(tmp_path, net)
    obs = np.full(3, 0.5)
    first = ByHand(net).step(obs)[1]
    with served(tmp_path, cache_dir, max_episodes=1) as client:

        def step(episode: str, **extra: Any) -> dict[str, Any]:
            body = _body(obs, episode_id=episode, **extra)
            answer: dict[str, Any] = client.post("/predict_deterministic", json=body).json()
            return answer

        step("a")
        step("a")
        step("b")  # the store holds one episode: a is evicted
        again = step("a")
        assert again["step"] == 0 and again["state_reset"] is False  # counted anew
        late = step("b", step=5)  # b was evicted in turn: its state is gone
        assert late["state_reset"] is True and late["episode_state"] == "initial"
        assert late["value"] == pytest.approx(first, abs=1e-5)
        step("b")
        assert client.post("/episodes/b/end").json()["status"] == "closed"
        restarted = step("b")
        assert restarted["step"] == 0 and restarted["episode_state"] == "initial"
        assert restarted["value"] == pytest.approx(first, abs=1e-5)


def test_prev_action_given_replaces_the_answered_one(tmp_path: Path, cache_dir: Path) -> None:
    net = cell()
    tf1_recurrent_policy(tmp_path, net)
    obs = np.full(3, 0.2)
    hand = ByHand(net)
    hand.answer(hand.step(obs)[0])
    hand.prev = np.array([[2]])
    _, value = hand.step(obs)
    with served(tmp_path, cache_dir) as client:
        client.post("/predict_deterministic", json=_body(obs, episode_id="e"))
        answer = client.post(
            "/predict_deterministic", json=_body(obs, episode_id="e", prev_action=[2], reward=0.0)
        ).json()
        assert answer["value"] == pytest.approx(value, abs=1e-5)
        refused = client.post(
            "/predict_deterministic", json=_body(obs, episode_id="e", prev_action=[1, 2])
        )
        assert refused.status_code == 422
        assert refused.json()["error"]["fields"][0]["field"].startswith("prev_action")


def test_the_envelope_reward_joins_the_previous_decision(tmp_path: Path, cache_dir: Path) -> None:
    """For every policy, recurrent or not: one call per environment step."""
    log = tmp_path / "log"
    observation = {
        "cart_position": 0.0,
        "cart_velocity": 0.1,
        "pole_angle": 0.02,
        "pole_angular_velocity": 0.0,
    }
    app = build_app(
        Settings(
            policy_path=EXAMPLE,
            cache_dir=cache_dir,
            workers=1,
            metrics_port=0,
            client_languages="",
            decision_log=log,
            decision_log_sync=True,
        )
    )
    headers = {"access-token": EXAMPLE_KEY}
    with app_in_thread(app) as url, httpx.Client(base_url=url, headers=headers) as client:
        ids = []
        for reward in (None, 1.0, 0.5):
            body: dict[str, Any] = {"observation": observation, "episode_id": "cart"}
            if reward is not None:
                body["reward"] = reward
            ids.append(client.post("/predict", json=body).json()["decision_id"])
        schema = client.get("/schema").json()
        assert schema["recurrent"] is None
    rewards = {
        r["decision_id"]: r["reward"]
        for r in read_records(log, ReadStats())
        if r.get("type") == "reward"
    }
    assert rewards == {ids[0]: 1.0, ids[1]: 0.5}


def test_across_a_reload_an_episode_keeps_its_version_and_a_new_one_starts_fresh(
    tmp_path: Path, cache_dir: Path
) -> None:
    repository = tmp_path / "repository"
    (repository / "r" / "1").mkdir(parents=True)
    tf1_recurrent_policy(repository / "r" / "1", cell(seed=1))
    (repository / "repository.yaml").write_text('policies:\n  r:\n    traffic: {"1": 100}\n')
    obs = np.full(3, 0.3)
    names = [f"e{index}" for index in range(12)]
    admin = {"access-token": "admin"}
    with served(repository, cache_dir, admin_key="admin", poll_interval_s=0) as client:

        def step(name: str) -> dict[str, Any]:
            answer: dict[str, Any] = client.post(
                "/predict_deterministic", json=_body(obs, episode_id=name)
            ).json()
            return answer

        for name in names:
            step(name)
            step(name)
        (repository / "r" / "2").mkdir()
        tf1_recurrent_policy(repository / "r" / "2", cell(seed=2))
        (repository / "repository.yaml").write_text(
            'policies:\n  r:\n    traffic: {"1": 50, "2": 50}\n'
        )
        assert client.post("/admin/reload", headers=admin).status_code == 200
        after = {name: step(name) for name in names}
        stayed = [a for a in after.values() if a["version"] == "1"]
        moved = [a for a in after.values() if a["version"] == "2"]
        assert stayed and moved  # rendezvous hashing moves only some episodes
        assert all(a["episode_state"] == "held" and not a["state_reset"] for a in stayed)
        assert all(a["episode_state"] == "initial" and a["state_reset"] for a in moved)
        assert all(a["step"] == 2 for a in after.values())
        fresh = [step(f"new{index}") for index in range(8)]
        assert all(a["episode_state"] == "initial" and not a["state_reset"] for a in fresh)


def test_the_docs_describe_what_a_step_carries(tmp_path: Path, cache_dir: Path) -> None:
    tf1_recurrent_policy(tmp_path, cell())
    with served(tmp_path, cache_dir) as client:
        document = client.get("/openapi.json").json()
        docs = client.get("/docs")
    schemas = document["components"]["schemas"]
    envelope = schemas["Step"]["properties"]  # the envelope, as the /step routes publish it
    for name in ("episode_id", "reward", "prev_action", "state", "return_state"):
        assert envelope[name]["description"], name
    answer = schemas["Prediction"]["properties"]
    assert {"episode_state", "state_reset", "state"} <= set(answer)
    assert "/episodes/{episode_id}/end" in document["paths"]
    assert docs.status_code == 200
