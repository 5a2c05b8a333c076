"""`policy-server ray-config` writes a config that `serve deploy` accepts: checked against Ray
Serve's own schema, then deployed on a real local Ray cluster and called through its proxy.
The repository holds two policies, each version its own deployment behind the API ingress."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from policy_server.hosting.ray_app import IMPORT_PATH
from tests.policies import EXAMPLE_KEY, ROOT
from tests.servers import free_port
from tests.serving.test_ray_backend import LINEAR_BIAS, LINEAR_WEIGHTS, two_policies

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = two_policies(tmp_path_factory.mktemp("policies"))
    (root / "repository.yaml").write_text(
        "policies:\n  linear:\n    settings: {max_batch_size: 100}\n"
    )
    return root


def write_config(repository: Path, out: Path, *flags: str) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policy_server.hosting.cli",
            "ray-config",
            str(repository),
            "--out",
            str(out),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(out.read_text())
    return config


def test_config_matches_ray_serve_schema(repository: Path, tmp_path: Path) -> None:
    flags = ("--autoscale", "1:4", "--api-key", "secret", "--admin-key", "admin-secret")
    config = write_config(repository, tmp_path / "serve.yaml", *flags)
    ServeDeploySchema.model_validate(config)
    [application] = config["applications"]
    assert application["import_path"] == IMPORT_PATH
    assert application["args"]["autoscale"] == "1:4"
    deployments = {d["name"]: d for d in application["deployments"]}
    assert set(deployments) == {"policy-cartpole-1", "policy-linear-1", "api"}
    for name in ("policy-cartpole-1", "policy-linear-1"):
        assert deployments[name]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    # Room for two batches in flight per replica, at each policy's own batch size.
    assert deployments["policy-cartpole-1"]["max_ongoing_requests"] == 2 * 64
    assert deployments["policy-linear-1"]["max_ongoing_requests"] == 2 * 100
    text = (tmp_path / "serve.yaml").read_text()
    assert "secret" not in text and "*****" not in text, "no key is written, not even masked"


def stop_cluster(temp_dir: str) -> None:
    """Stop the processes of this cluster only (`ray stop` would stop every Ray here)."""
    owned = [
        p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])
    ]
    everything = {child for p in owned for child in p.children(recursive=True)} | set(owned)
    for process in everything:
        process.kill()
    psutil.wait_procs(list(everything), timeout=30)


def test_serve_deploy_runs_both_policies_on_a_ray_cluster(
    repository: Path, tmp_path: Path, cache_dir: Path
) -> None:
    http_port, dashboard_port, gcs_port = free_port(), free_port(), free_port()
    config = tmp_path / "serve.yaml"
    written = write_config(
        repository,
        config,
        "--port",
        str(http_port),
        "--ray-replica-cpus",
        "0.25",
        "--metrics-port",
        "0",
        "--client-languages",
        "",
        "--cache-dir",
        str(cache_dir),
    )
    app_name = written["applications"][0]["name"]
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    # Nothing of a Ray this process may have started (Ray Data in another test sets RAY_*
    # variables, token authentication among them): the cluster is a new one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--port",
            str(gcs_port),
            "--dashboard-port",
            str(dashboard_port),
            "--include-dashboard",
            "true",
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
            # Ports Ray would otherwise take at fixed numbers, which another Ray on this
            # machine (a bench, another test run) may hold.
            "--ray-client-server-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        deployed = subprocess.run(
            [
                str(BIN / "serve"),
                "deploy",
                str(config),
                "--address",
                f"http://127.0.0.1:{dashboard_port}",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        url = f"http://127.0.0.1:{http_port}"
        with httpx.Client(base_url=url, headers={"access-token": EXAMPLE_KEY}) as client:
            check_both_policies(client, app_name)
    finally:
        stop_cluster(temp_dir)


def check_both_policies(client: httpx.Client, app_name: str) -> None:
    first = wait_for_answer(client, "/policies/cartpole/predict_raw", [0.0, 0.0, 0.1, 1.0])
    assert first.json()["actions"] == [1]
    assert first.json()["policy"] == "cartpole" and first.json()["version"] == "1"
    observation = [1.0, -2.0, 0.5]
    answer = client.post("/policies/linear/distribution", json={"obs": observation})
    logits = np.array(observation) @ LINEAR_WEIGHTS + LINEAR_BIAS
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(answer.json()["probabilities"][0], expected, rtol=1e-5)
    assert client.post("/predict_raw", json={"obs": [0.0]}).status_code == 422
    assert client.get("/schema", headers={"access-token": ""}).status_code == 403
    for deployment in ("policy-cartpole-1", "policy-linear-1"):
        title = f"ray::ServeReplica:{app_name}:{deployment}"
        assert any(
            " ".join(p.info["cmdline"] or []).startswith(title)
            for p in psutil.process_iter(["cmdline"])
        ), f"each version runs as its own deployment: {title}"


def wait_for_answer(client: httpx.Client, path: str, observation: list[float]) -> httpx.Response:
    """The first answer of a freshly deployed application (Serve deploys in the background)."""
    answer = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            answer = client.post(path, json={"obs": observation}, timeout=10)
            if answer.status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    assert answer is not None and answer.status_code == 200, answer and answer.text
    return answer
