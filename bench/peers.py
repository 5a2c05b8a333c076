"""The bare-ASGI limit and the peers, LitServe and Ray Serve, serving the model policy-server
converted with the same work per request (bench/references/onnx_policy.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path
from typing import Any

from harness import BENCH, PYTHON, Server, Target, wrk

REFERENCES = BENCH / "references"


def converted_model(target: Target, cache: Path) -> Path:
    """Where policy-server cached its ONNX conversion of the target's archive."""
    digest = hashlib.sha256((target.path / "saved_model.zip").read_bytes()).hexdigest()
    return cache / digest / "policy.onnx"


def peers(target: Target, cache: Path) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """Each peer's command and the connection counts it is measured at."""
    onnx = str(converted_model(target, cache))
    return {
        "bare": ([PYTHON, str(REFERENCES / "bare_asgi.py"), "{port}"], (32,)),
        "litserve": (
            [PYTHON, str(REFERENCES / "litserve_peer.py"), str(target.path), onnx, "{port}"],
            (32,),
        ),
        "rayserve": (
            [PYTHON, str(REFERENCES / "rayserve_peer.py"), str(target.path), onnx, "{port}"],
            (32,),
        ),
    }


MISSING = {"litserve": "litserve", "rayserve": "ray"}


def measure_peers(target: Target, cache: Path, duration: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"notes": {}}
    for name, (command, connections) in peers(target, cache).items():
        module = MISSING.get(name)
        if module and importlib.util.find_spec(module) is None:
            figures["notes"][name] = f"not measured: {module} is not installed"
            continue
        server = Server(command, ("/predict", target.observation, target.key))
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
