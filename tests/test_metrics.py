"""Prometheus metrics on their own port and JSON request logs, on a real server."""

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.policies import EXAMPLE_KEY
from tests.servers import RunningServer

OBSERVATION = {
    "cart_position": 0.0,
    "cart_velocity": 0.0,
    "pole_angle": 0.2,
    "pole_angular_velocity": 1.0,
}


def samples(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_metrics_count_requests_batches_and_actions(
    example_with_metrics: tuple[RunningServer, str],
) -> None:
    server, metrics_url = example_with_metrics
    with server.client() as client:
        for _ in range(10):
            assert client.post("/predict", json=OBSERVATION).status_code == 200
        client.post("/predict", json={"cart_position": "x"})
        client.get("/nowhere")
        client.post("/predict_raw_batch", json={"observations": [[0.0, 0.0, 0.2, 1.0]] * 50})
        version = client.get("/schema").json()["version"]
    text = httpx.get(metrics_url).text
    values = samples(text)
    answered = f'policy="cartpole",protocol="rest",route="/predict",version="{version}"'
    assert values[f'policy_server_requests_total{{code="200",method="POST",{answered}}}'] == 10
    refused = 'policy="",protocol="rest",route="/predict",version=""'
    assert values[f'policy_server_requests_total{{code="422",method="POST",{refused}}}'] == 1
    unmatched = 'policy="",protocol="rest",route="unmatched",version=""'
    assert values[f'policy_server_requests_total{{code="404",method="GET",{unmatched}}}'] == 1
    ours = f'policy="cartpole",version="{version}"'
    timed = f'policy="cartpole",protocol="rest",route="/predict",version="{version}"'
    assert values[f"policy_server_request_duration_seconds_count{{{timed}}}"] == 10
    assert values[f"policy_server_batch_size_sum{{{ours}}}"] == 60
    assert values[f"policy_server_inference_duration_seconds_count{{{ours}}}"] >= 11
    served = sum(v for k, v in values.items() if k.startswith("policy_server_actions_total{"))
    assert served == 60
    # The pole falls to the right: a trained policy pushes right nearly every time.
    pushes = f'action="1",component="0",{ours}'
    assert values[f"policy_server_actions_total{{{pushes}}}"] >= 55
    assert values[f"policy_server_model_load_seconds{{{ours}}}"] > 0
    info = [k for k in values if k.startswith("policy_server_policy_info{")]
    assert len(info) == 1 and 'runtime="onnx"' in info[0] and f'version="{version}"' in info[0]
    assert "# TYPE policy_server_requests_total counter" in text


def test_one_json_line_per_request_without_the_key(
    example_with_metrics: tuple[RunningServer, str],
) -> None:
    server, _ = example_with_metrics
    response = httpx.post(
        server.url + "/predict",
        params={"access-token": EXAMPLE_KEY},
        json=OBSERVATION,
        headers={"x-request-id": "trace-42"},
    )
    assert response.headers["x-request-id"] == "trace-42"
    mine: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10  # the line is written once the response has gone out
    while not mine and time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
        requests = [line for line in lines if line.get("logger") == "policy_server.access"]
        mine = [line for line in requests if line["request_id"] == "trace-42"]
        time.sleep(0.05)
    assert len(mine) == 1
    assert mine[0]["route"] == "/predict" and mine[0]["status"] == 200
    assert mine[0]["policy"] == "cartpole" and mine[0]["latency_ms"] > 0
    assert EXAMPLE_KEY not in server.output()


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def test_requests_in_flight_are_counted_while_they_are_handled(
    example_with_metrics: tuple[RunningServer, str],
) -> None:
    server, metrics_url = example_with_metrics
    release = threading.Event()

    def body() -> Iterator[bytes]:  # a client that sends half its body, then waits
        yield b'{"cart_position": 0.0, "cart_velocity": 0.0,'
        release.wait(60)
        yield b' "pole_angle": 0.2, "pole_angular_velocity": 1.0}'

    def in_flight() -> float:
        return samples(httpx.get(metrics_url).text)["policy_server_requests_in_flight"]

    with ThreadPoolExecutor(1) as pool, server.client() as client:
        answer = pool.submit(client.post, "/predict", content=body())
        wait_for(lambda: in_flight() == 1)
        release.set()
        assert answer.result().status_code == 200
    wait_for(lambda: in_flight() == 0)


def test_process_and_python_metrics_are_exported(
    example_with_metrics: tuple[RunningServer, str],
) -> None:
    _, metrics_url = example_with_metrics
    values = samples(httpx.get(metrics_url).text)
    assert values["process_resident_memory_bytes"] > 0
    assert values["process_open_fds"] > 0 and "process_cpu_seconds_total" in values
    assert any(name.startswith("python_info{") for name in values)
    assert any(name.startswith("python_gc_collections_total{") for name in values)


def test_the_start_up_log_says_where_metrics_are_served(
    example_with_metrics: tuple[RunningServer, str],
) -> None:
    server, metrics_url = example_with_metrics
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    assert lines[0]["message"].startswith("loading the policies in ")
    said = [line for line in lines if line["logger"] == "policy_server.metrics"]
    assert [line["message"] for line in said] == [f"Prometheus metrics on {metrics_url}"]
    assert f"API documentation on {server.url}/docs" in [line["message"] for line in lines]
