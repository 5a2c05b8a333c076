"""What the benchmarks share: servers started on loopback ports, wrk runs and their parsing,
the policies measured and the machine they ran on."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OUT = BENCH / "out"
SHARED = ROOT.parent / "shared" / "pathmind-models"
PYTHON = sys.executable


@dataclass
class Load:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass
class Target:
    name: str
    path: Path
    key: str
    observation: dict[str, Any]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """The process and its descendants, from /proc."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                queue.extend(int(child) for child in (task / "children").read_text().split())
    return found


class Server:
    """A server process on a loopback port; `start` returns seconds until the first 200 (to a
    POST of the probe's body, or a GET where the probe has none)."""

    def __init__(
        self,
        command: list[str],
        probe: tuple[str, dict[str, Any] | None, str],
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.command = [part.replace("{port}", str(self.port)) for part in command]
        self.probe_path, self.probe_body, self.key = probe
        self.env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> float:
        started = time.perf_counter()
        self.log = OUT / f"server-{self.port}.log"
        # A session of its own, so that stop() also ends the workers a server spawns.
        self.process = subprocess.Popen(
            self.command,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
            start_new_session=True,
        )
        headers = {"access-token": self.key}
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"{self.command[2:4]} exited: {' '.join(tail)}")
            try:
                response = (
                    httpx.get(self.url + self.probe_path, timeout=5)
                    if self.probe_body is None
                    else httpx.post(
                        self.url + self.probe_path,
                        json=self.probe_body,
                        headers=headers,
                        timeout=5,
                    )
                )
                if response.status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.command} did not answer within {timeout}s")

    def warm_up(self, path: str | None = None, body: Any = None, seconds: int = 2) -> None:
        """Load before a measurement, not measured: each worker process of a server finishes
        building its app and sessions on its first requests."""
        command = wrk_command(
            self.url + (path or self.probe_path), body or self.probe_body, self.key, 32, seconds
        )
        subprocess.run(command, capture_output=True, check=False)

    def peak_memory_mb(self) -> float:
        """VmHWM summed over the server's processes (its workers too)."""
        assert self.process is not None
        total_kb = 0
        for pid in process_tree(self.process.pid):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                status = Path(f"/proc/{pid}/status").read_text()
                match = re.search(r"VmHWM:\s+(\d+) kB", status)
                total_kb += int(match.group(1)) if match else 0
        return total_kb / 1024 if total_kb else float("nan")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def wrk(url: str, body: Any, key: str, connections: int, duration: int, threads: int = 1) -> Load:
    result = subprocess.run(
        wrk_command(url, body, key, connections, duration, threads),
        capture_output=True,
        text=True,
        check=True,
    )
    return parse_wrk(result.stdout)


def wrk_command(
    url: str, body: Any, key: str, connections: int, duration: int, threads: int = 1
) -> list[str]:
    script = OUT / f"post-{connections}-{hashlib.sha1(url.encode()).hexdigest()[:8]}.lua"
    payload = json.dumps(body)
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["access-token"] = "{key}"\n'
        f"wrk.body = [==[{payload}]==]\n"
    )
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def parse_wrk(output: str) -> Load:
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    percentiles = {int(p): _ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)", output, re.M)}
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket:
        errors += sum(int(n) for n in socket.groups())
    return Load(rate, percentiles.get(50, float("nan")), percentiles.get(99, float("nan")), errors)


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def ours(
    target: Target, cache: Path, *flags: str, probe: tuple[str, Any, str] | None = None
) -> Server:
    command = [
        PYTHON,
        "-m",
        "policy_server.hosting.cli",
        "serve",
        str(target.path),
        "--port",
        "{port}",
        "--cache-dir",
        str(cache),
        "--log-level",
        "warning",
        "--metrics-port",
        "0",
        # SDK generation would run four JVMs beside the measurement.
        "--client-languages",
        "",
        # No gRPC port unless a measurement asks for one.
        *(() if "--grpc-port" in flags else ("--grpc-port", "0")),
        *flags,
    ]
    return Server(command, probe or ("/predict", target.observation, target.key))


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = (
        int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024**2
    )  # type: ignore[union-attr]
    version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    system = f"{platform.system()} {platform.release()}"
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory} GiB memory, "
        f"Python {platform.python_version()}, {system}, {version.splitlines()[0].strip()}"
    )


def source() -> str:
    """The commit of the policy-server source that the servers run, and whether it differs
    from that commit."""
    folder = Path(
        subprocess.run(
            [PYTHON, "-c", "import policy_server; print(policy_server.__file__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    ).parent
    git = ["git", "-C", str(folder)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if commit.returncode != 0:
        return f"policy-server from {folder} (not a git checkout)"
    changed = subprocess.run(
        [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
    ).stdout.strip()
    suffix = " with uncommitted changes in src/" if changed else ""
    return f"policy-server at commit {commit.stdout.strip()}{suffix}"


def targets(shared: Path = SHARED) -> list[Target]:
    """mouse_and_cheese (from `shared`, the Pathmind policies, when present), then CartPole."""
    found = [
        Target(
            "cartpole (bundled example)",
            ROOT / "examples" / "cartpole",
            "cartpole-demo-key",
            {
                "cart_position": 0.01,
                "cart_velocity": -0.2,
                "pole_angle": 0.03,
                "pole_angular_velocity": 0.4,
            },
        )
    ]
    if (shared / "mouse_and_cheese" / "saved_model.zip").is_file():
        found.insert(
            0,
            Target(
                "mouse_and_cheese",
                shared / "mouse_and_cheese",
                "1234567asdfgh",
                {
                    "mouse_row": 0.5,
                    "mouse_col": 0.2,
                    "mouse_row_distance": -0.2,
                    "mouse_col_distance": 0.3,
                    "cheese_row": 0.3,
                    "cheese_col": 0.5,
                },
            ),
        )
    return found
