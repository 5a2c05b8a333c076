"""Real servers on loopback ports: `policy-server serve` in a subprocess, or an ASGI app under
uvicorn in a thread of the test process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.policies import ROOT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"access-token": self.key} if self.key else {}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server did not answer within {timeout}s:\n{log.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def run_server(
    command: list[str],
    tmp: Path,
    key: str | None,
    env: dict[str, str] | None = None,
    port: int | None = None,
    cwd: Path = ROOT,
    timeout: float = 180,
) -> Iterator[RunningServer]:
    port = port or free_port()
    log = tmp / f"server-{port}.log"
    full_env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [arg.replace("{port}", str(port)) for arg in command],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, log, timeout)
        yield RunningServer(url, process, log, key)
    finally:
        stop(process)


def serve_command(policy: Path, cache_dir: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "policy_server.hosting.cli",
        "serve",
        str(policy),
        "--port",
        "{port}",
        "--cache-dir",
        str(cache_dir),
        "--metrics-port",
        "0",
        "--client-languages",
        "",
        # One process unless a test asks for more: the default is one per core.
        *(() if "--workers" in flags else ("--workers", "1")),
        # No gRPC port unless a test asks for one: the default (8001) is one for all.
        *(() if "--grpc-port" in flags else ("--grpc-port", "0")),
        *flags,
    ]


@contextmanager
def serving(
    policy: Path, cache: Path, tmp: Path, key: str | None, *flags: str
) -> Iterator[RunningServer]:
    with run_server(serve_command(policy, cache, *flags), tmp, key) as server:
        yield server


def without_ids(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without its decision id, which is unique to every answer."""
    if "predictions" in answer:
        return {"predictions": [without_ids(p) for p in answer["predictions"]]}
    return {key: value for key, value in answer.items() if key != "decision_id"}


@contextmanager
def app_in_thread(app: object) -> Iterator[str]:
    """An ASGI app served by a real uvicorn on a loopback port, in a thread of this process;
    yields its URL."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
