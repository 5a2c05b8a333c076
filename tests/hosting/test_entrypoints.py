"""The original's commands: `uvicorn app:app` and `python generate.py ...` from a checkout."""

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.policies import EXAMPLE, EXAMPLE_KEY, ROOT
from tests.servers import run_server


def generate(*arguments: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def _python_path() -> dict[str, str]:
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def policy_files(folder: Path) -> dict[Path, int]:
    """The folder's files and their modification times, leaving out the server's cache and log."""
    return {
        path: path.stat().st_mtime_ns
        for path in folder.rglob("*")
        if path.is_file() and path.suffix != ".log" and path.relative_to(folder).parts[0] != "cache"
    }


def test_generate_copies_unzips_and_cleans(tmp_path: Path) -> None:
    generate("copy_server_files", str(EXAMPLE), cwd=tmp_path)
    assert (tmp_path / "saved_model.zip").is_file() and (tmp_path / "schema.yaml").is_file()
    assert (tmp_path / "models" / "saved_model.pb").is_file(), "copy_server_files unzips too"
    (tmp_path / "models" / "saved_model.pb").unlink()
    generate("unzip", cwd=tmp_path)
    assert (tmp_path / "models" / "saved_model.pb").is_file()
    generate("clean", cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_generate_cli_is_called_on_the_class_as_the_original_suite_does(tmp_path: Path) -> None:
    script = (
        "from generate import CLI\n"
        f"CLI.copy_server_files({str(EXAMPLE)!r})\n"
        "import os; assert os.path.isfile('models/saved_model.pb')\n"
        "CLI.unzip()\n"
        "CLI.clean()\n"
    )
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    }
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, timeout=120)
    assert list(tmp_path.iterdir()) == []


def test_generate_reports_a_wrong_folder_in_one_line(tmp_path: Path) -> None:
    result = generate("copy_server_files", str(tmp_path / "missing"), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"generate.py: {tmp_path / 'missing'}: no such folder; pass the folder holding schema.yaml"
    ]
    result = generate("unzip", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "has no saved_model.zip" in result.stderr


def test_uvicorn_app_serves_the_working_folder(tmp_path: Path) -> None:
    generate("copy_server_files", str(EXAMPLE), cwd=tmp_path)
    copied = policy_files(tmp_path)
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
    assert policy_files(tmp_path) == copied, "the server extracts into its cache, not here"


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
        env={"BASE_PATH": str(tmp_path / "missing"), "PATH": "", **_python_path()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "cannot serve" in result.stderr and "no such folder" in result.stderr


def test_uvicorn_app_in_a_folder_without_a_policy_says_why(tmp_path: Path) -> None:
    # The app waits for a policy until its start (the original's tests copy one in after
    # importing app), so here uvicorn's start fails, with its own exit code.
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(ROOT), "--port", "1"],
        cwd=tmp_path,
        env={"PATH": "", "POLICY_SERVER_METRICS_PORT": "0", **_python_path()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "policy-server: cannot serve:" in result.stderr and "schema.yaml" in result.stderr
