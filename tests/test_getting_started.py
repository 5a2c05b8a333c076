"""The README's getting-started paths, run as they are written: each bash block's commands in
order, in a fresh clone, `policy-server serve` in the background (on a free port, the suite's
model cache, no metrics port), each `curl` answered as the README says."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fresh import fresh_clone
from tests.oip import client_python
from tests.policies import EXAMPLE, EXAMPLE_KEY, ROOT, SHARED_MODELS
from tests.readme import commands, readme_blocks
from tests.servers import RunningServer, run_server, serve_command

README_PORT = "localhost:8000"
POLICY_SERVER = [sys.executable, "-m", "policy_server.hosting.cli"]


class Reader:
    """Runs one README block; remembers the answers of its curl commands."""

    def __init__(self, folder: Path, cache: Path, tmp: Path) -> None:
        self.folder, self.cache, self.tmp = folder, cache, tmp
        self.answers: list[Any] = []
        self.server: Any = None
        self.running: RunningServer | None = None

    def run(self, block: str) -> None:
        try:
            for command in commands(block):
                self.one(command)
        finally:
            self.stop()

    def one(self, command: str) -> None:
        words = shlex.split(command)
        if words[:2] == ["policy-server", "serve"]:
            self.serve(words[2:])
        elif words[0] == "policy-server":
            self.stop()  # the README stops the server first, so the log is complete
            result = self.shell(command.replace("policy-server", shlex.join(POLICY_SERVER), 1))
            self.answers.append(json.loads(result))
        elif words[0] == "curl":
            assert self.running is not None, "a curl before the server"
            port = self.running.url.removeprefix("http://")
            last = self.answers[-1] if self.answers else {}
            if isinstance(last, dict) and "decision_id" in last:
                command = command.replace("01a2...", last["decision_id"])
            self.answers.append(json.loads(self.shell(command.replace(README_PORT, port))))
        else:
            self.shell(command)

    def serve(self, arguments: list[str]) -> None:
        port = arguments.index("--port")
        arguments[port + 1] = "{port}"
        flags = ["--cache-dir", str(self.cache), "--metrics-port", "0", "--workers", "1"]
        self.server = run_server(
            [*POLICY_SERVER, "serve", *arguments, *flags], self.tmp, None, cwd=self.folder
        )
        self.running = self.server.__enter__()

    def stop(self) -> None:
        if self.server is not None:
            self.server.__exit__(None, None, None)
            self.server = self.running = None

    def shell(self, command: str) -> str:
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result.stdout


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    return fresh_clone(tmp_path / "clone")


def test_a_pathmind_export(clone: Path, cache_dir: Path, tmp_path: Path) -> None:
    export = SHARED_MODELS / "mouse_and_cheese"
    if not (export / "saved_model.zip").is_file():
        pytest.skip(f"needs the real Pathmind policies: {export} is absent")
    shutil.copytree(export, clone / "my-export")
    reader = Reader(clone, cache_dir, tmp_path)
    [block] = readme_blocks("### A Pathmind export", "bash")
    reader.run(block)
    schema, prediction = reader.answers
    assert [f["name"] for f in schema["observations"]][:2] == ["mouse_row", "mouse_col"]
    assert schema["action_space"]["type"] == "Discrete"
    assert prediction["actions"][0] in range(schema["action_space"]["n"])
    assert 0 < prediction["probability"] <= 1 and prediction["policy"] == "my-export"


def test_a_repository_with_a_canary(clone: Path, cache_dir: Path, tmp_path: Path) -> None:
    reader = Reader(clone, cache_dir, tmp_path)
    [block] = readme_blocks("### A repository with a canary", "bash")
    reader.run(block)
    listing, step, promoted = reader.answers
    [cartpole] = listing["policies"]
    traffic = {v["version"]: v["traffic"] for v in cartpole["versions"]}
    assert traffic == {"1": 90.0, "2": 10.0}
    assert step["episode_id"] == "robot-7" and step["version"] in ("1", "2")
    assert promoted["traffic"] == {"2": 100.0}


def test_the_decision_log_rewards_and_an_evaluation(
    clone: Path, cache_dir: Path, tmp_path: Path
) -> None:
    reader = Reader(clone, cache_dir, tmp_path)
    [block] = readme_blocks("### The decision log, rewards and an evaluation", "bash")
    reader.run(block)
    step, rewards, ended, report = reader.answers
    assert step["episode_id"] == "run-1" and step["step"] == 0
    assert rewards["joined"] == 1 and rewards["unknown"] == 0
    assert ended
    assert report["n"] == 1
    assert set(report["estimators"]) >= {"ips", "snips", "wis"}
    assert report["logged_value"] == pytest.approx(1.0)


def test_an_rllib_export_of_today(clone: Path, cache_dir: Path, tmp_path: Path) -> None:
    shared = ROOT.parent / "shared"
    if not (shared / "rllib-exports" / "cartpole_lstm" / "saved_model.zip").is_file():
        pytest.skip(f"needs the RLlib export in {shared / 'rllib-exports'}")
    (tmp_path / "shared").symlink_to(shared)  # the README's ../shared, beside the clone
    reader = Reader(clone, cache_dir, tmp_path)
    [block] = readme_blocks("### An RLlib export of today, recurrent", "bash")
    reader.run(block)
    first, second, ended = reader.answers
    assert (first["step"], first["episode_state"]) == (0, "initial")
    assert (second["step"], second["episode_state"]) == (1, "held")
    assert not second["state_reset"]
    assert ended == {"episode_id": "ep-1", "status": "closed"}


def test_a_triton_client(cache_dir: Path, tmp_path: Path) -> None:
    [script] = readme_blocks("### A Triton or KServe client", "python")
    python = client_python("triton")
    with run_server(serve_command(EXAMPLE, cache_dir), tmp_path, EXAMPLE_KEY) as server:
        address = server.url.removeprefix("http://")
        result = subprocess.run(
            [str(python), "-c", script.replace("localhost:8000", address)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        with server.client() as http:
            body = {"cart_position": 0.0, "cart_velocity": 0.1, "pole_angle": 0.05}
            body["pole_angular_velocity"] = 0.2
            distribution = http.post("/distribution", json=body).json()
    assert result.returncode == 0, result.stderr
    actions, probabilities = result.stdout.strip().split("] [")
    assert actions.strip("[] ") in ("0", "1")
    printed = [float(p) for p in probabilities.strip("[] \n").split()]
    assert printed == pytest.approx(distribution["probabilities"][0], abs=1e-6)
