"""`make bench`: the project's server against references built and run in the same run.

Measures with wrk over loopback: /predict requests/s and p50/p99 latency at 1 and 32
connections, /predict_batch observations/s (1,000 observations a request), cold start
(process start to the first 200, ONNX cache cold and warm) and the server's peak memory.
Writes bench/RESULTS.md with every figure as a ratio to the references.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
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


class Server:
    """A server process on a loopback port; `start` returns seconds until the first 200."""

    def __init__(
        self,
        command: list[str],
        probe: tuple[str, dict[str, Any], str],
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
        log = (OUT / f"server-{self.port}.log").open("wb")
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
        )
        headers = {"access-token": self.key}
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command} exited; see {log.name}")
            try:
                response = httpx.post(
                    self.url + self.probe_path, json=self.probe_body, headers=headers, timeout=5
                )
                if response.status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.command} did not answer within {timeout}s")

    def peak_memory_mb(self) -> float:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else float("nan")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def wrk(url: str, body: Any, key: str, connections: int, duration: int) -> Load:
    script = OUT / f"post-{connections}.lua"
    payload = json.dumps(body)
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["access-token"] = "{key}"\n'
        f"wrk.body = [==[{payload}]==]\n"
    )
    result = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return parse_wrk(result.stdout)


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


def ours(target: Target, cache: Path, *flags: str) -> Server:
    command = [
        PYTHON,
        "-m",
        "policy_server.cli",
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
        *flags,
    ]
    return Server(command, ("/predict", target.observation, target.key))


def measure_target(target: Target, duration: int, with_ray: bool) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    cache = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=OUT))
    cold = ours(target, cache)
    figures["cold_start_cold_cache_s"] = cold.start()
    cold.stop()
    server = ours(target, cache)
    figures["cold_start_warm_cache_s"] = server.start()
    try:
        for connections in (1, 32):
            figures[f"ours_c{connections}"] = wrk(
                server.url + "/predict", target.observation, target.key, connections, duration
            )
        batch = {"observations": [target.observation] * 1000}
        load = wrk(server.url + "/predict_batch", batch, target.key, 2, duration)
        figures["batch"] = load
        figures["batch_observations_per_s"] = load.requests_per_s * 1000
        figures["peak_memory_mb"] = server.peak_memory_mb()
    finally:
        server.stop()
    references = {
        "original": Server(
            [
                PYTHON,
                str(BENCH / "references" / "original.py"),
                str(target.path),
                "{port}",
                str(cache / "original"),
            ],
            ("/predict", target.observation, target.key),
            {"TF_CPP_MIN_LOG_LEVEL": "3"},
        ),
        "ceiling": Server(
            [PYTHON, str(BENCH / "references" / "ceiling.py"), str(target.path), "{port}"],
            ("/predict", target.observation, target.key),
        ),
    }
    for name, reference in references.items():
        reference.start()
        try:
            for connections in (1, 32):
                figures[f"{name}_c{connections}"] = wrk(
                    reference.url + "/predict",
                    target.observation,
                    target.key,
                    connections,
                    duration,
                )
            figures[f"{name}_peak_memory_mb"] = reference.peak_memory_mb()
        finally:
            reference.stop()
    if with_ray:
        figures |= measure_ray(target, cache, duration)
    shutil.rmtree(cache, ignore_errors=True)
    return figures


def measure_ray(target: Target, cache: Path, duration: int) -> dict[str, Any]:
    """The Ray backend (one replica) against reference (c), the original design with Ray."""
    figures: dict[str, Any] = {}
    server = ours(target, cache, "--backend", "ray", "--ray-replica-cpus", "1")
    reference = Server(
        [PYTHON, str(BENCH / "references" / "original_ray.py"), str(target.path), "{port}"],
        ("/predict", target.observation, target.key),
        {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    for name, process in (("ours_ray", server), ("original_ray", reference)):
        process.start()
        try:
            for connections in (1, 32):
                figures[f"{name}_c{connections}"] = wrk(
                    process.url + "/predict", target.observation, target.key, connections, duration
                )
        finally:
            process.stop()
            time.sleep(3)  # let the local Ray instance go before the next one starts
    return figures


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


def targets() -> list[Target]:
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
    if (SHARED / "mouse_and_cheese" / "saved_model.zip").is_file():
        found.insert(
            0,
            Target(
                "mouse_and_cheese",
                SHARED / "mouse_and_cheese",
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


def _loads(saved: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """results.json back into figures: wrk measurements become Load objects again."""
    return {
        name: {
            key: Load(**value) if isinstance(value, dict) else value
            for key, value in figures.items()
        }
        for name, figures in saved.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite RESULTS.md from the last run's bench/out/results.json",
    )
    arguments = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if arguments.render:
        from report import render

        saved = json.loads((OUT / "results.json").read_text())
        arguments.out.write_text(render(_loads(saved), machine(), arguments.duration))
        return
    results = {}
    for index, target in enumerate(targets()):
        print(f"== {target.name}", flush=True)
        # Ray is measured on the first policy only: each Ray start costs tens of seconds.
        results[target.name] = measure_target(target, arguments.duration, with_ray=index == 0)
        print(json.dumps(results[target.name], default=vars, indent=1), flush=True)
    from report import render

    text = render(results, machine(), arguments.duration)
    arguments.out.write_text(text)
    (OUT / "results.json").write_text(json.dumps(results, default=vars, indent=1))
    print(text)


if __name__ == "__main__":
    main()
