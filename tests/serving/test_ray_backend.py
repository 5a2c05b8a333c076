"""The Ray Serve backend on a real local Ray instance, serving a repository of two policies:
the same answers as the in-process backend, two replicas per version sharing traffic, a
killed replica replaced, versions deployed and removed by a reload, and a clean shutdown.

The tests share one Ray server and run in file order: the last one stops it."""

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from tests.policies import EXAMPLE, EXAMPLE_KEY, linear_onnx_policy
from tests.servers import RunningServer, free_port, serving, without_ids

ADMIN_KEY = "ray-admin-key"
CARTPOLE = [[0.0, 0.0, 0.1, 1.0], [0.2, -0.3, -0.05, 0.1], [0.0, 0.0, 0.01, 0.02]]
LINEAR = [[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [0.3, 0.2, -0.1]]
LINEAR_WEIGHTS = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
LINEAR_BIAS = np.array([0.0, 0.5, -0.5, 1.0], dtype=np.float32)
LINEAR_SCHEMA = f"""\
observations:
  position: {{type: "List[float]", max_items: 3}}
parameters:
  api_key: {EXAMPLE_KEY}
  action_space: {{type: Discrete, n: 4}}
  logits_output: logits
  value_output: value
"""


def two_policies(root: Path) -> Path:
    """ROOT/cartpole/1 (the bundled SavedModel) and ROOT/linear/1 (a model.onnx)."""
    shutil.copytree(EXAMPLE, root / "cartpole" / "1")
    linear = root / "linear" / "1"
    linear.mkdir(parents=True)
    linear_onnx_policy(linear / "model.onnx", LINEAR_WEIGHTS, LINEAR_BIAS)
    (linear / "schema.yaml").write_text(LINEAR_SCHEMA)
    return root


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_policies(tmp_path_factory.mktemp("repository"))


# The folders change only by the reload test, which comes after every comparison.
COMMON = ("--admin-key", ADMIN_KEY, "--poll-interval-s", "0")


@pytest.fixture(scope="module")
def ray_server(
    repository: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, str]]:
    port = free_port()
    flags = (
        *COMMON,
        "--backend",
        "ray",
        "--replicas",
        "2",
        "--ray-replica-cpus",
        "0.25",
        "--metrics-port",
        str(port),
    )
    tmp = tmp_path_factory.mktemp("ray")
    with serving(repository, cache_dir, tmp, EXAMPLE_KEY, *flags) as server:
        yield server, f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def local_server(
    repository: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("local")
    with serving(repository, cache_dir, tmp, EXAMPLE_KEY, *COMMON) as server:
        yield server


Call = tuple[str, int | None, dict[str, Any]]


def calls(prefix: str, observations: list[list[float]], typed: list[dict[str, Any]]) -> list[Call]:
    """(path, seed, body) of every kind of prediction, for each observation."""
    found: list[Call] = []
    for values, fields in zip(observations, typed, strict=True):
        body = {"obs": values}
        found += [
            (prefix + "/distribution", None, body),
            (prefix + "/predict_deterministic", None, body),
            (prefix + "/predict_raw", 7, body),
            (prefix + "/predict", 3, fields),
        ]
    found += [
        (prefix + "/predict_raw_batch", 1, {"observations": observations}),
        (prefix + "/predict_raw", None, {"obs": [1.0]}),
    ]
    return found


CARTPOLE_FIELDS = ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"]
CARTPOLE_TYPED = [dict(zip(CARTPOLE_FIELDS, values, strict=True)) for values in CARTPOLE]
CALLS = [
    *calls("", CARTPOLE, CARTPOLE_TYPED),
    *calls("/policies/cartpole", CARTPOLE, CARTPOLE_TYPED),
    *calls("/policies/linear", LINEAR, [{"position": values} for values in LINEAR]),
    *calls("/policies/linear/versions/1", LINEAR, [{"position": values} for values in LINEAR]),
]


def answers(server: RunningServer) -> list[tuple[str, int, dict[str, Any]]]:
    with server.client() as client:
        found = []
        for path, seed, body in CALLS:
            params = {} if seed is None else {"seed": seed}
            response = client.post(path, params=params, json=body)
            found.append((path, response.status_code, without_ids(response.json())))
    return found


def test_both_policies_give_the_same_answers_as_the_in_process_backend(
    ray_server: tuple[RunningServer, str], local_server: RunningServer
) -> None:
    ray, _ = ray_server
    found = answers(ray)
    assert found == answers(local_server)
    assert {answer["policy"] for _, _, answer in found if "policy" in answer} == {
        "cartpole",
        "linear",
    }
    with httpx.Client(base_url=ray.url) as client:
        assert client.post("/predict_raw", json={"obs": [0, 0, 0, 0]}).status_code == 403
        assert (
            client.get("/openapi.json").json()
            == httpx.get(local_server.url + "/openapi.json").json()
        )


def test_sampled_actions_follow_the_distribution(ray_server: tuple[RunningServer, str]) -> None:
    ray, _ = ray_server
    for prefix, observation in (
        ("/policies/cartpole", [0.0] * 4),
        ("/policies/linear", [0.0] * 3),
    ):
        with ray.client() as client:
            body = {"obs": observation}
            p = np.array(
                client.post(prefix + "/distribution", json=body).json()["probabilities"][0]
            )
            batch = client.post(
                prefix + "/predict_raw_batch", json={"observations": [observation] * 2000}
            ).json()
        actions = [item["actions"][0] for item in batch["predictions"]]
        counts = np.bincount(actions, minlength=len(p)) / 2000
        assert np.all(np.abs(counts - p) < 5 * np.sqrt(p * (1 - p) / 2000) + 1e-3), (prefix, p)


async def concurrent(server: RunningServer, count: int, policy: str = "cartpole") -> list[int]:
    width = 4 if policy == "cartpole" else 3
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    f"/policies/{policy}/predict_raw",
                    json={"obs": [0.0] * (width - 2) + [0.01 * i, 0.0]},
                )
                for i in range(count)
            )
        )
    return [response.status_code for response in responses]


def replica_counts(metrics_url: str, policy: str) -> dict[str, float]:
    counts = {}
    for line in httpx.get(metrics_url).text.splitlines():
        if line.startswith("policy_server_replica_requests_total{") and (
            f'policy="{policy}"' in line
        ):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('replica="')[1].split('"')[0]] = float(value)
    return counts


def test_two_replicas_of_each_policy_share_the_traffic(
    ray_server: tuple[RunningServer, str],
) -> None:
    ray, metrics_url = ray_server
    for policy in ("cartpole", "linear"):
        for _ in range(5):
            assert set(asyncio.run(concurrent(ray, 64, policy))) == {200}
        counts = replica_counts(metrics_url, policy)
        assert len(counts) == 2 and all(count > 0 for count in counts.values()), (policy, counts)


def replica_processes(policy: str, version: str) -> list[psutil.Process]:
    """The replica processes of one version's Serve application `policy-<name>-<version>`."""
    title = f"ray::ServeReplica:policy-{policy}-{version}:"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if " ".join(process.info["cmdline"] or []).startswith(title):
            found.append(process)
    return found


def test_a_killed_replica_is_replaced(ray_server: tuple[RunningServer, str]) -> None:
    ray, _ = ray_server
    replicas = replica_processes("cartpole", "1")
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
        alive = [p for p in replica_processes("cartpole", "1") if p.pid != replicas[0].pid]
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


def version_states(client: httpx.Client, policy: str) -> dict[str, str]:
    listing = client.get("/policies").json()["policies"]
    [entry] = [p for p in listing if p["name"] == policy]
    return {v["version"]: v["state"] for v in entry["versions"]}


def test_a_reload_deploys_a_new_version_and_removes_a_deleted_one(
    ray_server: tuple[RunningServer, str], repository: Path
) -> None:
    ray, _ = ray_server
    admin = {"access-token": ADMIN_KEY}
    body = {"obs": LINEAR[0]}
    shutil.copytree(repository / "linear" / "1", repository / "linear" / "2")
    with ray.client() as client:
        report = client.post("/admin/reload", headers=admin).json()
        assert report["loaded"] == ["linear/2"] and not report["failed"], report
        assert len(replica_processes("linear", "2")) == 2, "version 2 runs as its own application"
        first, second = (
            without_ids(
                client.post(
                    f"/policies/linear/versions/{v}/predict_raw", params={"seed": 5}, json=body
                ).json()
            )
            for v in ("1", "2")
        )
        assert second == first | {"version": "2"}
        assert client.post("/policies/linear/predict_raw", json=body).json()["version"] == "2"

        shutil.rmtree(repository / "linear" / "2")
        report = client.post("/admin/reload", headers=admin).json()
        assert report["unloaded"] == ["linear/2"], report
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
            "2" in version_states(client, "linear") or replica_processes("linear", "2")
        ):
            time.sleep(0.5)
        assert version_states(client, "linear") == {"1": "ready"}
        assert not replica_processes("linear", "2"), "its Serve application is gone"
        assert len(replica_processes("linear", "1")) == 2, "the other versions stay deployed"
        pinned = client.post("/policies/linear/versions/2/predict_raw", json=body)
        assert pinned.status_code == 404
        assert client.post("/policies/linear/predict_raw", json=body).json()["version"] == "1"


def test_sigterm_stops_ray_and_leaves_no_process(ray_server: tuple[RunningServer, str]) -> None:
    """Runs last: it stops the module's server."""
    ray, _ = ray_server
    children = psutil.Process(ray.process.pid).children(recursive=True)
    assert any("raylet" in " ".join(child.cmdline()) for child in children), "a local Ray ran"
    ray.process.send_signal(signal.SIGTERM)
    # uvicorn exits by raising the signal again once shut down; never an abort (-6)
    assert ray.process.wait(timeout=60) in (0, -signal.SIGTERM), ray.output()[-3000:]
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.cmdline()[:2] for p in alive]
