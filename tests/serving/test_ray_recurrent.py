"""A recurrent policy on the Ray backend with two replicas: the server holds each episode's
state and sends it with every model call, so whichever replica answers a step answers it
as the network run by hand."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.recurrent_exports import cell, tf1_recurrent_policy
from tests.servers import free_port, serving
from tests.serving.test_recurrent_episodes import ByHand, _body

pytest.importorskip("ray.serve", reason="the Ray backend needs the ray extra")


def _replica_counts(metrics: str) -> dict[str, float]:
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("policy_server_replica_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels] = float(value)
    return counts


def test_any_replica_answers_any_step(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "lstm"
    folder.mkdir()
    net = cell()
    tf1_recurrent_policy(folder, net)
    port = free_port()
    flags: tuple[str, ...] = ("--backend", "ray", "--replicas", "2", "--ray-replica-cpus", "0.25")
    flags += ("--metrics-port", str(port))
    rng = np.random.default_rng(11)
    with serving(folder, cache_dir, tmp_path, "k", *flags) as server:
        episodes = {name: ByHand(net) for name in ("a", "b", "c", "d")}
        for index in range(8):
            for name, hand in episodes.items():
                obs = rng.normal(size=3)
                reward = float(rng.normal()) if index else 0.0
                hand.reward = np.array([reward], np.float32)
                answer = httpx.post(
                    server.url + "/predict_deterministic",
                    json=_body(obs, episode_id=name, reward=reward),
                    headers=server.headers,
                    timeout=60,
                ).json()
                logits, value = hand.step(obs)
                actions, _ = hand.answer(logits)
                assert answer["step"] == index
                assert answer["actions"] == actions
                assert answer["value"] == pytest.approx(value, abs=1e-5)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    counts = _replica_counts(metrics)
    assert len(counts) == 2 and all(count > 0 for count in counts.values()), counts
