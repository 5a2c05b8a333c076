"""Our code's cost per request, without HTTP: the app called through raw ASGI messages in
this process, by concurrent clients on one event loop (uvloop), as uvicorn would call it.

    python bench/inprocess.py [--clients 32] [--requests 6400] [--decision-log] [--batch]

Prints microseconds per request (the best of five rounds, after a warm-up). Steadier than
wrk on a shared 2-core machine, since no other process takes part: the figures of
bench/COMPONENTS.md's table of changes come from it. With 32 clients the requests meet in
the micro-batcher as they do under load; with 1, each request is alone. `--batch` posts
1,000 observations to /predict_batch instead of one to /predict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import OUT, targets

from policy_server.hosting.app import build_app
from policy_server.settings import Settings


def scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def measure(args: argparse.Namespace) -> float:
    target = targets()[0]
    extra: dict[str, Any] = {}
    if args.decision_log:
        extra["decision_log"] = Path(tempfile.mkdtemp(prefix="inprocess-log-", dir=OUT))
    settings = Settings(
        policy_path=target.path,
        cache_dir=OUT / "profile-cache",
        metrics_port=0,
        client_languages="",
        log_level="warning",
        **extra,
    )
    app = build_app(settings)
    path = "/predict_batch" if args.batch else "/predict"
    body = json.dumps(
        {"observations": [target.observation] * 1000} if args.batch else target.observation
    ).encode()
    headers = [
        (b"host", b"in-process"),
        (b"content-type", b"application/json"),
        (b"access-token", target.key.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def client(count: int) -> None:
        for _ in range(count):
            await app(scope(path, headers), receive, send)
            await asyncio.sleep(0)  # as a connection waits for its next request

    async with app.router.lifespan_context(app):
        per_client = max(1, args.requests // args.clients)
        await asyncio.gather(*(client(per_client // 4 + 1) for _ in range(args.clients)))
        best = float("inf")
        for _ in range(5):
            statuses.clear()
            started = time.perf_counter()
            await asyncio.gather(*(client(per_client) for _ in range(args.clients)))
            elapsed = time.perf_counter() - started
            best = min(best, elapsed / (per_client * args.clients))
            assert set(statuses) == {200}, f"answers {sorted(set(statuses))}"
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=6400, help="per round")
    parser.add_argument("--decision-log", action="store_true")
    parser.add_argument("--batch", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    import uvloop

    us = uvloop.run(measure(args))
    what = "1,000 observations a request" if args.batch else "one observation a request"
    log = ", decision log on" if args.decision_log else ""
    print(f"{us:,.1f} us a request ({what}, {args.clients} clients{log})")


if __name__ == "__main__":
    main()
