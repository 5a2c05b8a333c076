"""The Ray Serve backend on a real local Ray instance: same answers as the in-process backend,
two replicas sharing traffic, a killed replica replaced, and a clean shutdown."""

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.conftest import EXAMPLE, EXAMPLE_KEY, RunningServer, free_port, run_server, serving

OBSERVATIONS = [[0.0, 0.0, 0.1, 1.0], [0.2, -0.3, -0.05, 0.1], [0.0, 0.0, 0.01, 0.02]]
REPLICA = "ray::ServeReplica:policy-cartpole:"


@pytest.fixture(scope="module")
def ray_server(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, str]]:
    port = free_port()
    flags = (
        "--backend",
        "ray",
        "--replicas",
        "2",
        "--ray-replica-cpus",
        "0.5",
        "--metrics-port",
        str(port),
    )
    with serving(EXAMPLE, cache_dir, tmp_path_factory.mktemp("ray"), EXAMPLE_KEY, *flags) as server:
        yield server, f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def local_server(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with serving(EXAMPLE, cache_dir, tmp_path_factory.mktemp("local"), EXAMPLE_KEY) as server:
        yield server


def answers(server: RunningServer) -> list[object]:
    with server.client() as client:
        found: list[object] = []
        for values in OBSERVATIONS:
            body = {"obs": values}
            found.append(client.post("/distribution", json=body).json())
            found.append(client.post("/predict_deterministic", json=body).json())
            found.append(client.post("/predict_raw", params={"seed": 7}, json=body).json())
            typed = dict(
                zip(
                    ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"],
                    values,
                    strict=True,
                )
            )
            found.append(client.post("/predict", params={"seed": 3}, json=typed).json())
        found.append(
            client.post(
                "/predict_raw_batch", params={"seed": 1}, json={"observations": OBSERVATIONS}
            ).json()
        )
        found.append(client.post("/predict_raw", json={"obs": [1.0]}).json())
    return found


def test_same_answers_as_the_in_process_backend(
    ray_server: tuple[RunningServer, str], local_server: RunningServer
) -> None:
    ray, _ = ray_server
    assert answers(ray) == answers(local_server)
    with httpx.Client(base_url=ray.url) as client:
        assert client.post("/predict_raw", json={"obs": [0, 0, 0, 0]}).status_code == 403
        assert (
            client.get("/openapi.json").json()
            == httpx.get(local_server.url + "/openapi.json").json()
        )


def test_sampled_actions_follow_the_distribution(ray_server: tuple[RunningServer, str]) -> None:
    ray, _ = ray_server
    body = {"obs": [0.0, 0.0, 0.0, 0.0]}
    with ray.client() as client:
        p = client.post("/distribution", json=body).json()["probabilities"][0]
        batch = client.post(
            "/predict_raw_batch", json={"observations": [body["obs"]] * 2000}
        ).json()
    counts = np.bincount([item["actions"][0] for item in batch["predictions"]], minlength=2) / 2000
    assert np.all(np.abs(counts - p) < 5 * np.sqrt(np.array(p) * (1 - np.array(p)) / 2000) + 1e-3)


async def concurrent(server: RunningServer, count: int) -> list[int]:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
        responses = await asyncio.gather(
            *(
                client.post("/predict_raw", json={"obs": [0.0, 0.0, 0.01 * i, 0.0]})
                for i in range(count)
            )
        )
    return [response.status_code for response in responses]


def replica_counts(metrics_url: str) -> dict[str, float]:
    counts = {}
    for line in httpx.get(metrics_url).text.splitlines():
        if line.startswith("policy_server_replica_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('replica="')[1].split('"')[0]] = float(value)
    return counts


def test_two_replicas_share_the_traffic(ray_server: tuple[RunningServer, str]) -> None:
    ray, metrics_url = ray_server
    for _ in range(5):
        assert set(asyncio.run(concurrent(ray, 64))) == {200}
    counts = replica_counts(metrics_url)
    assert len(counts) == 2 and all(count > 0 for count in counts.values()), counts


def replica_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if command.startswith(REPLICA):
            found.append(process)
    return found


def test_a_killed_replica_is_replaced(ray_server: tuple[RunningServer, str]) -> None:
    ray, _ = ray_server
    replicas = replica_processes()
    assert len(replicas) == 2, [p.info for p in replicas]
    statuses: list[int] = []

    async def load_while_killing() -> None:
        async def load() -> None:
            for _ in range(10):
                statuses.extend(await concurrent(ray, 16))

        task = asyncio.create_task(load())
        await asyncio.sleep(0.2)
        os.kill(replicas[0].pid, signal.SIGKILL)
        await task

    asyncio.run(load_while_killing())
    assert set(statuses) <= {200, 503}, "a lost replica may cost a retry, never a 500"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        alive = [p for p in replica_processes() if p.pid != replicas[0].pid]
        if len(alive) == 2:
            break
        time.sleep(1)
    assert len(alive) == 2, "Ray Serve starts a replacement replica"
    recovered: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        recovered = asyncio.run(concurrent(ray, 32))
        if set(recovered) == {200}:
            break
        time.sleep(1)
    assert set(recovered) == {200}


def test_sigterm_stops_ray_and_leaves_no_process(cache_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "uvicorn", "app:app", "--port", "{port}"]
    env = {
        "USE_RAY": "1",
        "BASE_PATH": str(EXAMPLE),
        "POLICY_SERVER_CACHE_DIR": str(cache_dir),
        "POLICY_SERVER_METRICS_PORT": "0",
        "POLICY_SERVER_CLIENT_LANGUAGES": "",
        "POLICY_SERVER_RAY_REPLICA_CPUS": "0.25",
    }
    with run_server(command, tmp_path, EXAMPLE_KEY, env=env) as server:
        with server.client() as client:
            assert client.post("/predict_raw", json={"obs": [0, 0, 0, 0]}).status_code == 200
        children = psutil.Process(server.process.pid).children(recursive=True)
        assert any("raylet" in " ".join(child.cmdline()) for child in children), "a local Ray ran"
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.cmdline()[:2] for p in alive]
