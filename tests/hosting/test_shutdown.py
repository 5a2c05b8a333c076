"""Graceful shutdown: SIGTERM under 32 clients stops accepting, answers every request in
flight (no client sees its connection reset), writes the decision log, and exits in time."""

import asyncio
import gzip
import json
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.policies import EXAMPLE, EXAMPLE_KEY
from tests.servers import free_port, serve_command, wait_until_up

BODY = {"observation": {"obs": [0.0, 0.1, 0.02, -0.1]}, "episode_id": "shutdown"}


async def clients(url: str, stop_after: asyncio.Event) -> tuple[list[str], list[str], int]:
    """32 keep-alive clients sending until the server is gone; returns the decision ids
    answered, the errors other than a refused connection, and how many were refused."""
    answered: list[str] = []
    resets: list[str] = []
    refused = 0

    async def one() -> None:
        nonlocal refused
        headers = {"access-token": EXAMPLE_KEY}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
            for _ in range(10_000):
                try:
                    response = await client.post("/predict_raw", json=BODY)
                except httpx.ConnectError:
                    refused += 1  # the listener is closed: a new connection is refused
                    return
                except httpx.TransportError as error:
                    resets.append(f"{type(error).__name__}: {error}")
                    return
                if response.status_code != 200:
                    resets.append(f"{response.status_code}: {response.text}")
                    return
                answered.append(response.json()["decision_id"])
                if len(answered) == 500:
                    stop_after.set()

    await asyncio.gather(*(one() for _ in range(32)))
    return answered, resets, refused


def test_sigterm_answers_every_request_in_flight(cache_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "decisions"
    command = [
        arg.replace("{port}", str(port))
        for arg in serve_command(
            EXAMPLE, cache_dir, "--decision-log", str(log), "--graceful-shutdown-s", "10"
        )
    ]
    output = tmp_path / "server.log"
    with output.open("wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server, output, 180)

        async def scenario() -> tuple[list[str], list[str], int, float]:
            stop = asyncio.Event()
            load = asyncio.create_task(clients(url, stop))
            await stop.wait()
            server.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            answered, resets, refused = await load
            return answered, resets, refused, signalled

        answered, resets, refused, signalled = asyncio.run(scenario())
        server.wait(timeout=30)
        exited_after = time.monotonic() - signalled
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert resets == [], resets[:5]
    assert refused > 0, "the clients ran until the server stopped accepting"
    assert exited_after < 10 + 5, "within the grace period"
    logged = set()
    for path in sorted(log.glob("decisions-*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as lines:
            logged |= {json.loads(line)["decision_id"] for line in lines if line.strip()}
    assert set(answered) <= logged, "every answered decision was written before exit"
