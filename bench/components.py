"""Costs of the request path's parts, measured in-process: the figures that bench/RESULTS.md's
analysis cites. Writes bench/COMPONENTS.md; `make bench` runs it after bench/run.py.

    python bench/components.py
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from policy_server.hosting.app import build_app
from policy_server.loading.loader import load_policy
from policy_server.runtime.onnx import OnnxRuntime
from policy_server.serving.batching import MicroBatcher
from policy_server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cartpole"
SHARED = ROOT.parent / "shared" / "pathmind-models" / "mouse_and_cheese"
KEY = "cartpole-demo-key"
OBSERVATION = {
    "cart_position": 0.0,
    "cart_velocity": 0.1,
    "pole_angle": 0.03,
    "pole_angular_velocity": 0.4,
}


def per_call_us(function: Callable[[], Any], seconds: float = 1.0) -> float:
    for _ in range(50):
        function()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        function()
        calls += 1
    return (time.perf_counter() - started) / calls * 1e6


async def per_await_us(function: Callable[[], Awaitable[Any]], seconds: float = 1.0) -> float:
    for _ in range(50):
        await function()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        await function()
        calls += 1
    return (time.perf_counter() - started) / calls * 1e6


def settings(folder: Path, cache: Path, **extra: Any) -> Settings:
    return Settings(
        policy_path=folder, cache_dir=cache, metrics_port=0, client_languages="", **extra
    )


def model_rows(cache: Path) -> list[tuple[str, float]]:
    onnx = load_policy(settings(EXAMPLE, cache, runtime="onnx"))
    tensorflow = load_policy(settings(EXAMPLE, cache, runtime="tensorflow"))
    row = np.zeros((1, 4), dtype=np.float32)
    logits = onnx.runtime.forward(row).logits
    rng = np.random.default_rng(0)
    rows = [
        (
            "CartPole forward pass, 1 row, TensorFlow",
            per_call_us(lambda: tensorflow.runtime.forward(row)),
        ),
        (
            "CartPole forward pass, 1 row, ONNX Runtime",
            per_call_us(lambda: onnx.runtime.forward(row)),
        ),
        (
            "sample an action from the logits, 1 row",
            per_call_us(lambda: onnx.distribution.sample(logits, rng)),
        ),
    ]
    big = load_policy(settings(SHARED, cache)) if (SHARED / "saved_model.zip").is_file() else onnx
    assert isinstance(big.runtime, OnnxRuntime)
    width = big.runtime.observation_width
    batch = np.random.default_rng(1).random((1000, width), dtype=np.float32)
    for label, session in (
        ("one thread", big.runtime._session),
        ("every core", big.runtime._large_session),
    ):
        rows.append(
            (
                f"{big.name} forward pass, 1,000 rows, ONNX on {label}",
                per_call_us(lambda s=session: s.run(None, {s.get_inputs()[0].name: batch})),
            )
        )
    return rows


async def hand_off_rows(cache: Path) -> list[tuple[str, float]]:
    policy = load_policy(settings(EXAMPLE, cache, runtime="onnx"))
    row = np.zeros((1, 4), dtype=np.float32)
    batcher = MicroBatcher(policy.runtime.forward, 64, 0.0)
    threaded = MicroBatcher(policy.runtime.forward, 64, 0.0, inline_budget_s=0.0)
    pool = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    inline = await per_await_us(lambda: batcher.forward(row))
    batcher_thread = await per_await_us(lambda: threaded.forward(row))
    handed = await per_await_us(lambda: loop.run_in_executor(pool, policy.runtime.forward, row))
    await batcher.close()
    await threaded.close()
    pool.shutdown()
    return [
        ("a lone request through the micro-batcher (a quick call: on the event loop)", inline),
        ("the same through the micro-batcher's thread (inline budget 0)", batcher_thread),
        ("the same forward pass handed to a thread and back", handed),
    ]


async def asgi_post(app: Any, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """One POST /predict straight into the ASGI app: no sockets, no HTTP parsing."""
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    assert status == [200], status


async def auth_rows(cache: Path, work: Path) -> list[tuple[str, float]]:
    keyless = work / "keyless"
    keyless.mkdir()
    shutil.copy(EXAMPLE / "saved_model.zip", keyless)
    schema = (EXAMPLE / "schema.yaml").read_text().replace(f'api_key: "{KEY}"', "")
    (keyless / "schema.yaml").write_text(schema)
    body = json.dumps(OBSERVATION).encode()
    json_header = (b"content-type", b"application/json")
    keyed = build_app(settings(EXAMPLE, cache, log_level="warning"))
    open_app = build_app(settings(keyless, cache, log_level="warning", no_auth=True))
    with_key = await per_await_us(
        lambda: asgi_post(keyed, body, [json_header, (b"access-token", KEY.encode())])
    )
    without = await per_await_us(lambda: asgi_post(open_app, body, [json_header]))
    return [
        ("POST /predict through the whole app in-process, with the API-key check", with_key),
        ("the same without authentication", without),
        ("the API-key check (the difference)", with_key - without),
    ]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="components-"))
    cache = work / "cache"
    try:
        rows = model_rows(cache)
        rows += asyncio.run(hand_off_rows(cache))
        rows += asyncio.run(auth_rows(cache, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# Costs of the request path's parts",
        "",
        "The table is written by `make bench` (`bench/components.py`); the sections after it",
        "are kept. In-process timings on the machine of bench/RESULTS.md, in microseconds per",
        "call.",
        "",
        "| part | us per call |",
        "|---|---|",
        *(f"| {label} | {value:,.1f} |" for label, value in rows),
        "",
    ]
    path = ROOT / "bench" / "COMPONENTS.md"
    text = "\n".join(lines) + _profiles(path)
    path.write_text(text)
    print(text)


def _profiles(path: Path) -> str:
    """The hand-written sections after the table (the sampling profiles of a running
    server, bench/PROFILING.md), kept as they are."""
    old = path.read_text() if path.is_file() else ""
    start = old.find("\n## ")
    return "" if start < 0 else old[start:]


if __name__ == "__main__":
    main()
