"""Hardening over real servers: the key before the body, one answer for undecodable bodies,
415 for compressed bodies, HEAD wherever GET is, no redirects, a strict seed; and the
connection time-outs of `policy_server.http` on a real uvicorn."""

from __future__ import annotations

import gzip
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLE, EXAMPLE_KEY, RunningServer, free_port, run_server

OBSERVATION = (
    b'{"cart_position": 0.0, "cart_velocity": 0.1, "pole_angle": 0.05, '
    b'"pole_angular_velocity": 0.2}'
)
UNDECODABLE = [
    b"\xff\xfe{",  # invalid UTF-8
    b'{"cart_position": ' + b"1" * 5000 + b"}",  # an integer of more than 4,300 digits
    b"[" * 100_000,  # nesting too deep
    b"{not json",  # plain syntax
]
LAUNCH = """
import sys, uvicorn
from policy_server.http import uvicorn_options
from policy_server.server import build_app
from policy_server.settings import Settings
settings = Settings(_cli_parse_args=False, policy_path=sys.argv[1], port=int(sys.argv[2]),
    cache_dir=sys.argv[3], metrics_port=0, client_languages="", request_timeout_s=2,
    keep_alive_s=1, max_connections=64)
uvicorn.run(build_app(settings), host="127.0.0.1", port=settings.port, log_config=None,
    **uvicorn_options(settings))
"""


@pytest.fixture(scope="module")
def timed(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    port = free_port()
    command = [sys.executable, "-c", LAUNCH, str(EXAMPLE), str(port), str(cache_dir)]
    with run_server(command, tmp_path_factory.mktemp("timed"), EXAMPLE_KEY, port=port) as server:
        yield server


def post(server: RunningServer, path: str, body: bytes, **headers: str) -> httpx.Response:
    headers = {"content-type": "application/json"} | headers
    return httpx.post(server.url + path, content=body, headers=headers, timeout=30)


@pytest.mark.parametrize("path", ["/predict", "/rewards", "/policies/cartpole/predict_batch"])
def test_without_a_key_any_body_gets_403(timed: RunningServer, path: str) -> None:
    for body in [*UNDECODABLE, gzip.compress(OBSERVATION), b"x" * (9 * 1024**2)]:
        assert post(timed, path, body).status_code in (403, 404)  # 404: no decision log
    assert post(timed, path, OBSERVATION, **{"content-encoding": "gzip"}).status_code in (403, 404)


def test_undecodable_bodies_get_one_422(timed: RunningServer) -> None:
    for body in UNDECODABLE:
        answer = post(timed, "/predict", body, **{"access-token": EXAMPLE_KEY})
        assert answer.status_code == 422, body[:20]
        assert answer.json()["error"]["code"] == "invalid_request"
        assert answer.json()["error"]["fields"][0]["field"] == "body"


def test_compressed_bodies_get_415(timed: RunningServer) -> None:
    headers = {"access-token": EXAMPLE_KEY, "content-encoding": "gzip"}
    answer = post(timed, "/predict", gzip.compress(OBSERVATION), **headers)
    assert answer.status_code == 415
    assert answer.json()["error"]["code"] == "unsupported_media_type"


def test_head_wherever_get_is_and_no_redirect(timed: RunningServer) -> None:
    headers = {"access-token": EXAMPLE_KEY}
    for path in ["/", "/ready", "/policies", "/schema", "/openapi.json", "/schema/"]:
        get = httpx.get(timed.url + path, headers=headers)
        head = httpx.head(timed.url + path, headers=headers)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-length"] == str(len(get.content))
    assert httpx.head(timed.url + "/predict", headers=headers).status_code == 405


@pytest.mark.parametrize("seed", ["1.0", "+5", "1_0", " 1", "-1", str(2**63)])
def test_seed_is_one_whole_number(timed: RunningServer, seed: str) -> None:
    answer = httpx.post(
        timed.url + "/predict",
        params={"seed": seed},
        content=OBSERVATION,
        headers={"access-token": EXAMPLE_KEY, "content-type": "application/json"},
    )
    assert answer.status_code == 422


def test_idle_and_slow_sockets_are_closed_while_predictions_go_on(timed: RunningServer) -> None:
    port = int(timed.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    for sock in slow:
        sock.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\n")  # headers never finished
    with httpx.Client(base_url=timed.url, headers={"access-token": EXAMPLE_KEY}) as client:
        for _ in range(20):
            answer = client.post("/predict", content=OBSERVATION)
            assert answer.status_code == 200
    for sock in idle + slow:
        sock.settimeout(10)  # bounded wait: keep-alive 1 s, request time-out 2 s
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        sock.close()
        assert received == b"" or received.startswith(b"HTTP/1.1 408")
