"""The original's commands: `uvicorn app:app` and `python generate.py ...` from a checkout."""

import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import EXAMPLE, EXAMPLE_KEY, ROOT, run_server


def generate(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_generate_copies_unzips_and_cleans(tmp_path: Path) -> None:
    generate("copy_server_files", str(EXAMPLE), cwd=tmp_path)
    assert (tmp_path / "saved_model.zip").is_file() and (tmp_path / "schema.yaml").is_file()
    generate("unzip", cwd=tmp_path)
    assert (tmp_path / "models" / "saved_model.pb").is_file()
    generate("clean", cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_uvicorn_app_serves_the_working_folder(tmp_path: Path) -> None:
    generate("copy_server_files", str(EXAMPLE), cwd=tmp_path)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "app:app",
        "--app-dir",
        str(ROOT),
        "--port",
        "{port}",
    ]
    env = {"POLICY_SERVER_CACHE_DIR": str(tmp_path / "cache"), "POLICY_SERVER_METRICS_PORT": "0"}
    with run_server(command, tmp_path, EXAMPLE_KEY, env=env, cwd=tmp_path) as server:
        response = httpx.post(
            server.url + "/predict_raw", json={"obs": [0, 0, 0, 0]}, headers=server.headers
        )
        assert response.status_code == 200
    assert not (tmp_path / "models").exists(), "the archive is extracted into the cache"


def test_uvicorn_app_reads_base_path_and_refuses_bad_policies(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "uvicorn", "app:app", "--port", "{port}"]
    env = {
        "BASE_PATH": str(EXAMPLE),
        "POLICY_SERVER_CACHE_DIR": str(tmp_path / "cache"),
        "POLICY_SERVER_METRICS_PORT": "0",
    }
    with run_server(command, tmp_path, EXAMPLE_KEY, env=env) as server:
        assert (
            httpx.get(server.url + "/schema", headers={"access-token": EXAMPLE_KEY}).json()["name"]
            == "cartpole"
        )
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app:app", "--port", "1"],
        cwd=ROOT,
        env={"BASE_PATH": str(tmp_path / "missing"), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "cannot serve" in result.stderr and "no such folder" in result.stderr
