"""`serve --workers 2`: two processes on one port, over a real server on loopback.

One server serves most of the module, so those tests run in order: both workers answer, the
metrics add them up, admin changes reach both, a killed worker is replaced (and follows the
admin changes), and SIGTERM under load drains both without losing a logged decision. The
last tests start their own: one whose workers cannot start, one whose supervisor is killed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from policy_server.experience.files import read_records
from policy_server.hosting.shared_state import AdminState, SharedPolicyManager, SharedState
from policy_server.metrics import Metrics
from policy_server.serving.registry import PolicyRegistry, State
from policy_server.settings import Settings, available_cores
from tests.policies import EXAMPLE, EXAMPLE_KEY
from tests.servers import RunningServer, free_port, run_server, serve_command

WORKERS = 2
ADMIN_KEY = "workers-admin-key"
OBSERVATION = {
    "cart_position": 0.0,
    "cart_velocity": 0.0,
    "pole_angle": 0.2,
    "pole_angular_velocity": 1.0,
}
# Waiting for what the server does in the background: generous, never a measure of speed.
PATIENCE_S = 60.0
TRAFFIC_CHANGE = {"traffic": {"1": 1.0}, "shadow": "2"}


@dataclass
class Workers:
    server: RunningServer
    metrics_url: str
    repository: Path
    decision_log: Path
    run_root: Path

    def predict(self) -> httpx.Response:
        """On a new connection each time, so that every worker gets its share."""
        response = httpx.post(
            self.server.url + "/predict", json=OBSERVATION, headers=self.server.headers
        )
        assert response.status_code == 200, response.text
        return response

    def policies(self) -> httpx.Response:
        return httpx.get(self.server.url + "/policies", headers=self.server.headers)

    def metrics(self) -> dict[str, float]:
        found = {}
        for line in httpx.get(self.metrics_url).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                found[name] = float(value)
        return found


@pytest.fixture(scope="module")
def workers(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    tmp = tmp_path_factory.mktemp("workers")
    repository = tmp / "repository"
    shutil.copytree(EXAMPLE, repository / "cartpole" / "1")
    metrics_port = free_port()
    run_root = tmp / "run"
    run_root.mkdir()
    flags = [
        "--workers",
        str(WORKERS),
        "--metrics-port",
        str(metrics_port),
        "--decision-log",
        str(tmp / "decisions"),
        "--admin-key",
        ADMIN_KEY,
        "--poll-interval-s",
        "0",  # only the admin reload makes the workers see a new version
    ]
    command = serve_command(repository, cache_dir, *flags)
    # The supervisor's run folder goes under TMPDIR: the last test sees it removed.
    with run_server(command, tmp, EXAMPLE_KEY, env={"TMPDIR": str(run_root)}) as server:
        yield Workers(
            server,
            f"http://127.0.0.1:{metrics_port}/metrics",
            repository,
            tmp / "decisions",
            run_root,
        )


def from_every_worker(
    request: Callable[[], httpx.Response], accept: Callable[[httpx.Response], bool]
) -> dict[str, httpx.Response]:
    """Sends `request` until every worker has given an answer that `accept` takes."""
    accepted: dict[str, httpx.Response] = {}
    deadline = time.monotonic() + PATIENCE_S
    while len(accepted) < WORKERS and time.monotonic() < deadline:
        response = request()
        if accept(response):
            accepted[response.headers["policy-server-worker"]] = response
        time.sleep(0.02)
    assert sorted(accepted) == [str(index) for index in range(WORKERS)]
    return accepted


def worker_pids(values: dict[str, float]) -> set[str]:
    """Live workers, from the per-worker gauge of load times."""
    return {
        name.split('pid="', 1)[1].split('"', 1)[0]
        for name in values
        if name.startswith("policy_server_model_load_seconds{")
    }


def predictions_counted(values: dict[str, float]) -> float:
    return sum(
        value
        for name, value in values.items()
        if name.startswith("policy_server_requests_total{")
        and 'route="/predict"' in name
        and 'method="POST"' in name
    )


def test_both_workers_answer_on_one_port(workers: Workers) -> None:
    answers = from_every_worker(workers.predict, lambda _: True)
    assert all(response.json()["decision_id"] for response in answers.values())


def test_metrics_add_up_every_worker(workers: Workers) -> None:
    before = workers.metrics()
    served_by = {workers.predict().headers["policy-server-worker"] for _ in range(30)}
    after = workers.metrics()
    assert predictions_counted(after) - predictions_counted(before) == 30
    assert len(worker_pids(after)) == WORKERS
    assert after["policy_server_workers"] == WORKERS
    assert after["policy_server_workers_replaced_total"] == 0
    info = [name for name in after if name.startswith("policy_server_policy_info{")]
    assert len(info) == 1 and 'runtime="onnx"' in info[0]
    assert served_by <= {str(index) for index in range(WORKERS)}


def test_admin_reload_and_traffic_reach_every_worker(workers: Workers) -> None:
    shutil.copytree(EXAMPLE, workers.repository / "cartpole" / "2")
    admin = {"access-token": ADMIN_KEY}
    reload = httpx.post(workers.server.url + "/admin/reload", headers=admin)
    assert reload.status_code == 200 and reload.json()["loaded"] == ["cartpole/2"]

    def versions(response: httpx.Response) -> list[str]:
        entry = response.json()["policies"][0]
        return [v["version"] for v in entry["versions"] if v["state"] == "ready"]

    from_every_worker(workers.policies, lambda response: sorted(versions(response)) == ["1", "2"])
    put = httpx.put(
        workers.server.url + "/admin/policies/cartpole/traffic", json=TRAFFIC_CHANGE, headers=admin
    )
    assert put.status_code == 200, put.text
    from_every_worker(workers.policies, _follows_traffic_change)


def _follows_traffic_change(response: httpx.Response) -> bool:
    entry = response.json()["policies"][0]
    return {"traffic": entry["traffic"], "shadow": entry["shadow"]} == TRAFFIC_CHANGE


def test_a_killed_worker_is_replaced_and_counted(workers: Workers) -> None:
    pids = worker_pids(workers.metrics())
    killed = max(pids)
    os.kill(int(killed), signal.SIGKILL)
    deadline = time.monotonic() + PATIENCE_S
    values = workers.metrics()
    while time.monotonic() < deadline and values["policy_server_workers_replaced_total"] < 1:
        time.sleep(0.2)
        values = workers.metrics()
    assert values["policy_server_workers_replaced_total"] == 1

    # The replacement takes the dead worker's index, and the admin changes made before it.
    from_every_worker(workers.policies, _follows_traffic_change)
    now = worker_pids(workers.metrics())
    assert killed not in now and len(now) == WORKERS


def test_sigterm_under_load_drains_every_worker(workers: Workers) -> None:
    stop = threading.Event()
    answered: list[str] = []

    def load() -> None:
        with workers.server.client() as client:
            while not stop.is_set():
                try:
                    response = client.post("/predict", json=OBSERVATION)
                except httpx.TransportError:
                    return  # the server is going away
                if response.status_code == 200:
                    answered.append(response.json()["decision_id"])

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    while len(answered) < 100:
        time.sleep(0.05)
    workers.server.process.send_signal(signal.SIGTERM)
    returncode = workers.server.process.wait(timeout=PATIENCE_S)
    stop.set()
    for client in clients:
        client.join()
    assert returncode == 0, workers.server.output()
    assert "Traceback" not in workers.server.output()
    assert "Warning" not in workers.server.output()
    logged = {
        record["decision_id"]
        for record in read_records(workers.decision_log)
        if record["type"] == "decision"
    }
    assert set(answered) <= logged
    assert {path.name.split("-")[1] for path in workers.decision_log.glob("decisions-*-*")} == {
        str(index) for index in range(WORKERS)
    }
    assert list(workers.run_root.glob("policy-server-*")) == []


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "policy_server.hosting.cli",
        "serve",
        str(tmp_path / "absent"),
        "--workers",
        str(WORKERS),
        "--port",
        str(free_port()),
        "--metrics-port",
        "0",
        "--no-auth",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=PATIENCE_S)
    assert result.returncode == 2
    assert "policy-server: cannot serve:" in result.stderr


def test_workers_stop_when_their_supervisor_is_killed(cache_dir: Path, tmp_path: Path) -> None:
    command = serve_command(EXAMPLE, cache_dir, "--workers", str(WORKERS))
    with run_server(command, tmp_path, EXAMPLE_KEY) as server:
        from_every_worker(lambda: httpx.get(server.url + "/"), lambda _: True)
        workers = psutil.Process(server.process.pid).children()
        server.process.kill()
        server.process.wait()
        _, alive = psutil.wait_procs(workers, timeout=PATIENCE_S)
        assert alive == []


CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [
        (None, CORES),  # no cgroup v2 file
        ("max 100000\n", CORES),  # no quota
        ("100000 100000\n", 1),  # docker run --cpus 1
        ("150000 100000\n", min(CORES, 2)),  # a fraction counts as a core
        ("50000 100000\n", 1),
    ],
)
def test_default_workers_follow_a_cpu_quota(
    tmp_path: Path, cpu_max: str | None, cores: int
) -> None:
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    assert available_cores(tmp_path / "cpu.max") == cores


def ready_versions(manager: SharedPolicyManager) -> list[str]:
    versions = manager.registry.entry("cartpole").ordered()
    return sorted(version.version for version in versions if version.state is State.READY)


def test_a_worker_scans_its_folders_itself_and_records_only_admin_reloads(
    cache_dir: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(EXAMPLE, repository / "cartpole" / "1")
    settings = Settings(
        policy_path=repository, cache_dir=cache_dir, poll_interval_s=0.2, client_languages=""
    )
    state = SharedState(tmp_path / "state.json")

    async def scenario() -> list[str]:
        with (tmp_path / "worker-0.lock").open("ab") as slot:
            manager = SharedPolicyManager(settings, PolicyRegistry(), Metrics(), state, slot)
            manager.load_initial()
            await manager.start()
            shutil.copytree(EXAMPLE, repository / "cartpole" / "2")
            deadline = time.monotonic() + PATIENCE_S
            while len(ready_versions(manager)) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await manager.close()
            return ready_versions(manager)

    assert asyncio.run(scenario()) == ["1", "2"]
    assert state.read() == AdminState()  # a scan is each worker's own: nothing recorded
