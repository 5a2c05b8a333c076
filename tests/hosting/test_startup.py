"""The first minute of `policy-server serve`, run as a user runs it: ports already taken,
Ctrl-C while it starts, the checks made before a model loads, and the help it prints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from policy_server import __version__
from tests.policies import EXAMPLE, PATHMIND_KEY
from tests.servers import RunningServer, free_port, run_server

INTERRUPTED = "policy-server: interrupted (Ctrl-C) while starting; nothing is being served"
# One process, whatever the machine's cores: these tests follow that process's start-up.
ONE_PROCESS = {"POLICY_SERVER_WORKERS": "1", "PYTHONUNBUFFERED": "1"}


def command(policy: Path, cache: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "policy_server.hosting.cli",
        "serve",
        str(policy),
        "--cache-dir",
        str(cache),
        "--client-languages",
        "",
        *flags,
    ]


def run(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        arguments,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | ONE_PROCESS,
    )


@contextmanager
def listening() -> Iterator[int]:
    """A port taken by something else, as a second server or any program would take it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def refused_in_one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- ports -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_metrics_port_is_named_before_the_model_loads(
    workers: str, cache_dir: Path
) -> None:
    with listening() as taken:
        flags = ("--port", str(free_port()), "--metrics-port", str(taken), "--workers", workers)
        result = run(command(EXAMPLE, cache_dir, *flags))
    line = refused_in_one_line(result)
    assert f"the metrics port 127.0.0.1:{taken} is already in use" in line
    assert "--metrics-port" in line and "0 to turn metrics off" in line
    assert "loaded policy" not in result.stdout


def test_a_second_server_is_told_which_port_to_change(
    example_with_metrics: tuple[RunningServer, str], cache_dir: Path
) -> None:
    server, metrics_url = example_with_metrics
    metrics_port = metrics_url.split(":")[-1].split("/")[0]
    http_port = server.url.split(":")[-1]
    # A second server: its own --port, the first one's metrics port.
    line = refused_in_one_line(
        run(command(EXAMPLE, cache_dir, "--port", str(free_port()), "--metrics-port", metrics_port))
    )
    assert f"metrics port 127.0.0.1:{metrics_port} is already in use" in line
    line = refused_in_one_line(
        run(command(EXAMPLE, cache_dir, "--port", http_port, "--metrics-port", "0"))
    )
    assert f"the HTTP port 127.0.0.1:{http_port} is already in use" in line
    assert "choose another with --port" in line


def test_the_same_port_twice_and_a_foreign_host_are_refused(cache_dir: Path) -> None:
    port = str(free_port())
    line = refused_in_one_line(
        run(command(EXAMPLE, cache_dir, "--port", port, "--metrics-port", port))
    )
    assert f"--port and --metrics-port are both {port}" in line
    line = refused_in_one_line(
        run(
            command(
                EXAMPLE, cache_dir, "--host", "192.0.2.1", "--port", port, "--metrics-port", "0"
            )
        )
    )
    assert "192.0.2.1 is not an address of this machine; check --host" in line


# --- Ctrl-C ------------------------------------------------------------------------------


def interrupt_at(
    marker: str, cache: Path, tmp_path: Path, workers: str = "1"
) -> tuple[bool, int, str, str]:
    """Start the server, and once it has logged `marker`, freeze it, note whether its port
    accepts connections, and press Ctrl-C, which a terminal sends to the whole process group.
    Returns that, the exit code, stdout and stderr."""
    port = free_port()
    errors = tmp_path / "stderr.txt"
    flags = ("--port", str(port), "--metrics-port", str(free_port()))
    with (
        errors.open("w") as sink,
        subprocess.Popen(
            command(EXAMPLE, cache, *flags),
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
            env=os.environ | ONE_PROCESS | {"POLICY_SERVER_WORKERS": workers},
            start_new_session=True,
        ) as process,
    ):
        assert process.stdout is not None
        seen = []
        try:
            for line in process.stdout:
                seen.append(line)
                if marker in line:
                    break
            else:
                pytest.fail(f"no {marker!r} in the log:\n{''.join(seen)}{errors.read_text()}")
            os.killpg(process.pid, signal.SIGSTOP)
            was_listening = accepts(port)
            os.killpg(process.pid, signal.SIGINT)
            os.killpg(process.pid, signal.SIGCONT)
            seen.append(process.stdout.read())
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert not accepts(port), "nothing may serve after a Ctrl-C"
    return was_listening, code, "".join(seen), errors.read_text()


@pytest.mark.parametrize(
    ("marker", "cold"),
    [
        ("loading the policies in", True),  # TensorFlow imports, the model converts to ONNX
        ("loaded policy", True),  # the rest of the app is built; TensorFlow's garbage goes
        ("Started server process", False),
        ("Waiting for application startup.", False),
        ("Prometheus metrics on", False),  # inside the application's start-up
    ],
)
def test_ctrl_c_during_start_up_says_so_in_one_line_and_exits_130(
    marker: str, cold: bool, cache_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache" if cold else cache_dir
    was_listening, code, out, err = interrupt_at(marker, cache, tmp_path)
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    if cold and marker.startswith("loading"):
        assert not was_listening, "frozen while TensorFlow converts, seconds before it listens"
    if "Uvicorn running on" in out:  # it had started: a Ctrl-C is the usual graceful stop
        assert code == 0, out + err
        assert "Application shutdown complete." in out
        return
    assert code == 130, out + err
    assert err.strip().splitlines()[-1] == INTERRUPTED
    # Nothing from TensorFlow's teardown or a half-started server reaches the terminal
    # beyond the line itself (native notices of an interrupted TensorFlow import aside).
    assert [line for line in err.splitlines() if line.startswith("policy-server")] == [INTERRUPTED]


def test_ctrl_c_while_workers_start_says_so_and_exits_130(tmp_path: Path) -> None:
    # A cold cache: the first worker converts the model to ONNX for seconds.
    _, code, out, err = interrupt_at("Started parent process", tmp_path / "cache", tmp_path, "2")
    assert "Traceback" not in out + err
    assert code == 130, out + err
    assert err.strip().splitlines()[-1] == INTERRUPTED
    assert "loaded policy" not in out, "the load is abandoned"


def test_ctrl_c_once_serving_is_the_usual_graceful_stop(cache_dir: Path, tmp_path: Path) -> None:
    was_listening, code, out, err = interrupt_at("Uvicorn running on", cache_dir, tmp_path)
    assert was_listening
    assert code == 0, out + err
    assert "Application shutdown complete." in out and INTERRUPTED not in err
    assert "Traceback" not in out + err


# --- checks before the model loads, help ---------------------------------------------------


def policy_copy(tmp_path: Path, api_key: str | None) -> Path:
    folder = tmp_path / "pathmind-export"
    shutil.copytree(EXAMPLE, folder)
    schema = (folder / "schema.yaml").read_text()
    key = "" if api_key is None else f'api_key: "{api_key}"'
    (folder / "schema.yaml").write_text(schema.replace('api_key: "cartpole-demo-key"', key))
    return folder


def test_a_missing_api_key_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    folder = policy_copy(tmp_path, None)
    # An archive that could not load: the key's message comes first, so nothing loaded.
    (folder / "saved_model.zip").write_bytes(b"not a zip archive")
    line = refused_in_one_line(run(command(folder, tmp_path / "cache", "--metrics-port", "0")))
    assert "no API key configured" in line and "--no-auth" in line
    assert "zip" not in line


def test_a_file_for_a_folder_says_so(tmp_path: Path) -> None:
    schema = EXAMPLE / "schema.yaml"
    line = refused_in_one_line(run(command(schema, tmp_path / "cache", "--metrics-port", "0")))
    assert f"{schema}: is a file, not a folder" in line and "no such folder" not in line


def demo_key_warnings(server: RunningServer) -> list[str]:
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    return [
        line["message"]
        for line in lines
        if line["level"] == "warning" and "Pathmind demo API key" in line["message"]
    ]


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_the_pathmind_demo_key_is_warned_about_beyond_loopback(
    host: str, cache_dir: Path, tmp_path: Path
) -> None:
    folder = policy_copy(tmp_path, PATHMIND_KEY)
    arguments = command(
        folder, cache_dir, "--host", host, "--port", "{port}", "--metrics-port", "0"
    )
    with run_server(arguments, tmp_path, PATHMIND_KEY, env=ONE_PROCESS) as server:
        warnings = demo_key_warnings(server)
    if host == "127.0.0.1":
        assert warnings == []
        return
    assert len(warnings) == 1
    assert "serving pathmind-export on 0.0.0.0" in warnings[0]
    assert "--api-key" in warnings[0] and PATHMIND_KEY not in server.output()


def test_help_shows_defaults_and_version_is_printed() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "policy_server.hosting.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flat = " ".join(help_text.split())
    assert "Port of the HTTP API. (default: 8000)" in flat
    assert "(0 turns it off). (default: 8080)" in flat
    version = subprocess.run(
        [sys.executable, "-m", "policy_server.hosting.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert version.strip() == f"policy-server {__version__}"
