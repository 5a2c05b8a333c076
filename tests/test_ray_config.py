"""`policy-server ray-config` writes a config that `serve deploy` accepts: checked against Ray
Serve's own schema, then deployed on a real local Ray cluster and called through its proxy."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml
from ray.serve.schema import ServeDeploySchema

from tests.conftest import EXAMPLE, EXAMPLE_KEY, ROOT, free_port

BIN = Path(sys.executable).parent


def write_config(out: Path, *flags: str) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policy_server.cli",
            "ray-config",
            str(EXAMPLE),
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
    return yaml.safe_load(out.read_text())


def test_config_matches_ray_serve_schema(tmp_path: Path) -> None:
    config = write_config(tmp_path / "serve.yaml", "--autoscale", "1:4", "--api-key", "secret")
    ServeDeploySchema.model_validate(config)
    [application] = config["applications"]
    assert application["import_path"] == "policy_server.ray_backend:application"
    assert application["args"]["autoscale"] == "1:4"
    assert "secret" not in (tmp_path / "serve.yaml").read_text(), "no key is written"


def stop_cluster(temp_dir: str) -> None:
    """Stop the processes of this cluster only (`ray stop` would stop every Ray here)."""
    owned = [
        p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])
    ]
    everything = {child for p in owned for child in p.children(recursive=True)} | set(owned)
    for process in everything:
        process.kill()
    psutil.wait_procs(list(everything), timeout=30)


def test_serve_deploy_runs_the_api_on_a_ray_cluster(tmp_path: Path, cache_dir: Path) -> None:
    http_port, dashboard_port, gcs_port = free_port(), free_port(), free_port()
    config = tmp_path / "serve.yaml"
    write_config(
        config,
        "--port",
        str(http_port),
        "--policy-name",
        "cartpole-cluster",
        "--ray-replica-cpus",
        "0.25",
        "--metrics-port",
        "0",
        "--client-languages",
        "",
        "--cache-dir",
        str(cache_dir),
    )
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    env = os.environ | {"HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
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
        ],
        check=True,
        capture_output=True,
        timeout=180,
        env=env,
    )
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
        answer = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                answer = httpx.post(
                    url + "/predict_raw",
                    json={"obs": [0.0, 0.0, 0.1, 1.0]},
                    headers={"access-token": EXAMPLE_KEY},
                    timeout=10,
                )
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert answer is not None and answer.status_code == 200
        assert answer.json()["actions"] == [1]
        assert (
            httpx.post(
                url + "/predict_raw", json={"obs": [0.0]}, headers={"access-token": EXAMPLE_KEY}
            ).status_code
            == 422
        )
        assert httpx.get(url + "/schema").status_code == 403
    finally:
        stop_cluster(temp_dir)
