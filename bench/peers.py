"""The bare-ASGI limit and the peers, LitServe and Ray Serve, serving the model policy-server
converted with the same work per request (bench/references/onnx_policy.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from harness import BENCH, PYTHON, Load, Server, Target, ours, wrk

REFERENCES = BENCH / "references"


def converted_model(target: Target, cache: Path) -> Path:
    """Where policy-server cached its ONNX conversion of the target's archive."""
    digest = hashlib.sha256((target.path / "saved_model.zip").read_bytes()).hexdigest()
    return cache / digest / "policy.onnx"


UVICORN_APP = [
    *(PYTHON, "-m", "uvicorn", "app:app", "--port", "{port}", "--http", "httptools"),
    *("--loop", "uvloop", "--no-access-log", "--log-level", "warning"),
]


def granian(app: str) -> list[str]:
    """`app` (module:attribute) on Granian, one process, uvloop, as uvicorn runs them."""
    command = [PYTHON, "-m", "granian", "--interface", "asgi", "--port", "{port}"]
    return [*command, "--loop", "uvloop", "--no-ws", "--log-level", "warning", app]


def peers(target: Target, cache: Path) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """Each peer's command and the connection counts it is measured at."""
    onnx = str(converted_model(target, cache))
    return {
        "bare": ([PYTHON, str(REFERENCES / "bare_asgi.py"), "{port}"], (32,)),
        # The HTTP server evaluated against uvicorn (issue #22): the bare app, and
        # policy-server's own app (`app.py`, as `uvicorn app:app` serves it) in one process.
        "granian_bare": (granian("bare_asgi:app"), (32,)),
        "granian_ours": (granian("app:app"), (32,)),
        "uvicorn_ours": (UVICORN_APP, (32,)),
        "litserve": (
            [PYTHON, str(REFERENCES / "litserve_peer.py"), str(target.path), onnx, "{port}"],
            (32,),
        ),
        "rayserve": (
            [PYTHON, str(REFERENCES / "rayserve_peer.py"), str(target.path), onnx, "{port}"],
            (32,),
        ),
    }


MISSING = {
    "litserve": "litserve",
    "rayserve": "ray",
    "granian_bare": "granian",
    "granian_ours": "granian",
}


def environment(name: str, target: Target, cache: Path) -> dict[str, str]:
    """`app.py` (run from the repository root) reads its policy and settings from the
    environment; the bare app is imported from the references."""
    if not name.startswith(("granian", "uvicorn")):
        return {}
    path = [str(REFERENCES), os.environ.get("PYTHONPATH", "")]
    return {
        "PYTHONPATH": os.pathsep.join(part for part in path if part),
        "BASE_PATH": str(target.path),
        "POLICY_SERVER_CACHE_DIR": str(cache),
        "POLICY_SERVER_METRICS_PORT": "0",
        "POLICY_SERVER_LOG_LEVEL": "warning",
        "POLICY_SERVER_CLIENT_LANGUAGES": "",
    }


def measure_peers(target: Target, cache: Path, duration: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"notes": {}}
    for name, (command, connections) in peers(target, cache).items():
        module = MISSING.get(name)
        if module and importlib.util.find_spec(module) is None:
            figures["notes"][name] = f"not measured: {module} is not installed"
            continue
        probe = ("/predict", target.observation, target.key)
        server = Server(command, probe, environment(name, target, cache))
        try:
            server.start()
            server.warm_up()
            for count in connections:
                figures[f"{name}_c{count}"] = wrk(
                    server.url + "/predict", target.observation, target.key, count, duration
                )
        except RuntimeError as error:
            figures["notes"][name] = f"not measured: {error}"
        finally:
            server.stop()
        if name == "rayserve":
            time.sleep(3)  # let the local Ray instance go before the next server starts
    return figures


SIDE_BY_SIDE_ROUNDS = 3


def measure_side_by_side(target: Target, cache: Path, duration: int) -> dict[str, Any]:
    """Issue #22's ratios from interleaved runs: the bare-ASGI app, the FastAPI constant,
    policy-server with its default workers and with one, all started at once and measured
    in turn, round after round; each figure is the median over the rounds. Measured minutes
    apart, as the tables above are, the same server moved by up to 30% on a shared machine;
    in turn, every server meets the same moments."""
    probe = ("/predict", target.observation, target.key)
    servers = {
        "bare": Server([PYTHON, str(REFERENCES / "bare_asgi.py"), "{port}"], probe),
        "ceiling": Server(
            [PYTHON, str(REFERENCES / "ceiling.py"), str(target.path), "{port}"], probe
        ),
        "ours": ours(target, cache),
        "one": ours(target, cache, "--workers", "1"),
    }
    loads: dict[str, list[Load]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.start()
            server.warm_up()
        seconds = max(3, duration // 2)
        for round_ in range(SIDE_BY_SIDE_ROUNDS):
            # Each round in another order, so that no server always follows the same one.
            names = list(servers)[round_:] + list(servers)[:round_]
            for name in names:
                url = servers[name].url + "/predict"
                loads[name].append(wrk(url, target.observation, target.key, 32, seconds))
    finally:
        for server in servers.values():
            server.stop()
    return {f"side_{name}": _median(found) for name, found in loads.items()}


def _median(loads: list[Load]) -> Load:
    middle = sorted(loads, key=lambda load: load.requests_per_s)[len(loads) // 2]
    p99 = sorted(load.p99_ms for load in loads)[len(loads) // 2]
    return Load(middle.requests_per_s, middle.p50_ms, p99, sum(load.errors for load in loads))
