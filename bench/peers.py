"""The bare-ASGI limit and the peers, LitServe and Ray Serve, serving the model policy-server
converted with the same work per request (bench/references/onnx_policy.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from harness import BENCH, PYTHON, Server, Target, wrk

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
