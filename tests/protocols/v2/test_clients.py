"""Triton's and KServe's own clients, unmodified, against a real server on the real models:
`tritonclient.http` (binary tensors, its default), `tritonclient.grpc`, and the KServe SDK's
InferenceRESTClient (protocol v2) and InferenceGRPCClient, each in a process of its own
(see tests/oip.py)."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from policy_server.experience.files import read_records
from tests.oip import client_python, run_client
from tests.policies import EXAMPLE, SHARED_MODELS
from tests.servers import RunningServer, free_port, run_server, serve_command
from tests.test_metrics import samples

KEY = "oip-test-key"
CARTPOLE = ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"]
ROWS = [[0.0, 0.1, 0.05, 0.2], [0.02, -0.3, -0.1, 0.4]]
SCHEDULING = SHARED_MODELS / "simple_scheduling"
DEPLOYMENT = SHARED_MODELS / "deployment_test"


@dataclass
class OipServer:
    http: RunningServer
    grpc_address: str
    log: Path
    scheduling: bool  # whether the real Pathmind policies are served too
    metrics: str

    @property
    def address(self) -> str:
        return self.http.url.removeprefix("http://")


@pytest.fixture(scope="module")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OipServer]:
    """cartpole, and the real simple_scheduling (a tuple action) and deployment_test (int
    fields) when ../shared holds them; gRPC on, the decision log on, one key for all."""
    tmp = tmp_path_factory.mktemp("oip")
    shared = (SCHEDULING / "saved_model.zip").is_file() and (
        DEPLOYMENT / "saved_model.zip"
    ).is_file()
    paths = [str(SCHEDULING), str(DEPLOYMENT)] if shared else []
    grpc_port, metrics_port = free_port(), free_port()
    log = tmp / "decisions"
    command = serve_command(
        EXAMPLE,
        cache_dir,
        "--metrics-port",
        str(metrics_port),
        "--api-key",
        KEY,
        "--grpc-port",
        str(grpc_port),
        "--decision-log",
        str(log),
    )
    at = command.index(str(EXAMPLE)) + 1
    command[at:at] = paths
    command[0] = str(client_python("triton"))  # serves gRPC with tritonclient's messages
    with run_server(command, tmp, KEY) as running:
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        yield OipServer(running, f"127.0.0.1:{grpc_port}", log, shared, metrics)


def fields(rows: list[list[float]]) -> dict[str, Any]:
    return {name: ["FP32", [row[i] for row in rows]] for i, name in enumerate(CARTPOLE)}


def observations(rows: list[list[float]]) -> dict[str, Any]:
    return {"observations": ["FP32", rows]}


def json_routes(server: OipServer, route: str, rows: list[list[float]]) -> list[dict[str, Any]]:
    with server.http.client() as http:
        return [http.post(f"/policies/cartpole{route}", json={"obs": row}).json() for row in rows]


def ok(result: dict[str, Any]) -> Any:
    assert "ok" in result, result
    return result["ok"]


def refused(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" in result, result
    error: dict[str, Any] = result["error"]
    return error


def common_operations() -> list[dict[str, Any]]:
    """What every client does: health, infer per field and as one tensor, every error."""
    infer = {"op": "infer", "model": "cartpole", "key": KEY}
    return [
        {"op": "live"},
        {"op": "ready"},
        {"op": "model_ready", "model": "cartpole", "key": KEY},
        infer | {"inputs": fields(ROWS)},
        infer
        | {
            "inputs": observations(ROWS),
            "parameters": {"deterministic": True},
            "outputs": ["actions", "probabilities"],
        },
        infer | {"inputs": fields(ROWS), "key": "wrong"},
        infer | {"inputs": fields(ROWS), "key": None},
        infer | {"inputs": fields(ROWS), "model": "nowhere"},
        infer | {"inputs": fields(ROWS), "version": "404"},
        infer | {"inputs": {"observations": ["FP32", [[0.0, 0.1, 0.05]]]}},
        infer | {"inputs": fields(ROWS), "outputs": ["nothing"]},
    ]


def check_common(server: OipServer, results: list[dict[str, Any]], codes: dict[str, str]) -> None:
    live, ready, model_ready, per_field, one_tensor, wrong, missing, model, version, shape, out = (
        results
    )
    assert ok(live) is True and ok(ready) is True and ok(model_ready) is True
    answer = ok(per_field)
    assert answer["model_name"] == "cartpole"
    outputs = answer["outputs"]
    assert set(outputs) == {
        "actions",
        "probability",
        "log_probability",
        "value",
        "probabilities",
        "decision_id",
    }
    distributions = json_routes(server, "/distribution", ROWS)
    for row, distribution in enumerate(distributions):
        assert outputs["probabilities"][row] == pytest.approx(distribution["probabilities"][0])
        action = outputs["actions"][row][0]
        assert outputs["probability"][row] == pytest.approx(
            distribution["probabilities"][0][action], rel=1e-5
        )
    assert len(set(outputs["decision_id"])) == 2
    modes = json_routes(server, "/predict_deterministic", ROWS)
    assert ok(one_tensor)["outputs"]["actions"] == [mode["actions"] for mode in modes]
    assert set(ok(one_tensor)["outputs"]) == {"actions", "probabilities"}
    assert refused(wrong)["status"] == codes["wrong"]
    assert refused(missing)["status"] == codes["missing"]
    assert refused(model)["status"] == codes["missing_model"]
    if "no_version" not in codes:
        assert refused(version)["status"] == codes["missing_model"]
    assert refused(shape)["status"] == codes["bad"]
    assert refused(out)["status"] == codes["bad"]
    assert "observations" in refused(shape)["message"]
    assert "nothing" in refused(out)["message"]
    assert "key" in refused(missing)["message"]


TRITON_HTTP = {"wrong": "403", "missing": "401", "missing_model": "404", "bad": "400"}
GRPC = {
    "wrong": "StatusCode.PERMISSION_DENIED",
    "missing": "StatusCode.UNAUTHENTICATED",
    "missing_model": "StatusCode.NOT_FOUND",
    "bad": "StatusCode.INVALID_ARGUMENT",
}
KSERVE_GRPC = {key: value.removeprefix("StatusCode.") for key, value in GRPC.items()}
# The KServe REST client cannot name a version: its URL is always /v2/models/{name}/infer.
KSERVE_REST = TRITON_HTTP | {"no_version": ""}


def metadata_operations() -> list[dict[str, Any]]:
    return [
        {"op": "server_metadata"},
        {"op": "model_metadata", "model": "cartpole", "key": KEY},
        {"op": "model_metadata", "model": "cartpole", "key": "wrong"},
    ]


def check_metadata(results: list[dict[str, Any]], wrong: str) -> None:
    server, model, refused_model = results
    assert "binary_tensor_data" in ok(server)["extensions"]
    assert "sequence" in ok(server)["extensions"]
    metadata = ok(model)
    assert metadata["name"] == "cartpole"
    assert [
        (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]
    ] == [(name, "FP32", [-1]) for name in CARTPOLE]
    shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["outputs"]}
    assert shapes["actions"] == ("INT64", [-1, 1])
    assert shapes["probabilities"] == ("FP32", [-1, 2])
    assert shapes["decision_id"] == ("BYTES", [-1])
    assert refused(refused_model)["status"] == wrong


def sequence_steps(episode: Any, reward_as_int: bool = False) -> list[dict[str, Any]]:
    """Three steps of one episode, the second and third with the reward of the one before."""
    base = {"op": "infer", "model": "cartpole", "key": KEY, "outputs": ["actions", "decision_id"]}
    reward = 1 if reward_as_int else 0.5
    if isinstance(episode, dict):  # an `episode_id` parameter
        return [
            base | {"inputs": fields([ROWS[0]]), "parameters": {"episode_id": episode["id"]}},
            base
            | {
                "inputs": fields([ROWS[1]]),
                "parameters": {"episode_id": episode["id"], "reward": reward},
            },
        ]
    return [
        base | {"inputs": fields([ROWS[0]]), "sequence": {"id": episode, "start": True}},
        base
        | {
            "inputs": fields([ROWS[1]]),
            "sequence": {"id": episode},
            "parameters": {"reward": reward},
        },
        base
        | {
            "inputs": fields([ROWS[0]]),
            "sequence": {"id": episode, "end": True},
            "parameters": {"reward": reward},
        },
    ]


def logged(server: OipServer, kind: str, key: str, wanted: set[str]) -> set[str]:
    """The values of `key` among the decision log's records of `kind`, once all have come."""
    found: set[str] = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not wanted <= found:
        found = {str(r.get(key)) for r in read_records(server.log) if r["type"] == kind}
        time.sleep(0.2)
    return found


def check_sequence(server: OipServer, steps: list[dict[str, Any]], episode: str) -> None:
    answers = [ok(step) for step in steps]
    assert [a["parameters"]["episode_id"] for a in answers] == [episode] * len(answers)
    assert [int(a["parameters"]["step"]) for a in answers] == list(range(len(answers)))
    ids = [a["outputs"]["decision_id"][0] for a in answers]
    rewarded = logged(server, "reward", "decision_id", set(ids[:-1]))
    assert set(ids[:-1]) <= rewarded  # each reward joined to the step before it
    assert ids[-1] not in rewarded
    logged_episodes = {
        r["decision_id"]: r["episode_id"]
        for r in read_records(server.log)
        if r["type"] == "decision"
    }
    assert all(logged_episodes.get(i) == episode for i in ids)


def test_tritonclient_http(server: OipServer) -> None:
    operations = [*common_operations(), *metadata_operations(), *sequence_steps(41)]
    results = run_client("triton", "triton_http.py", server.address, json.dumps(operations))
    check_common(server, results[:11], TRITON_HTTP)
    check_metadata(results[11:14], "403")
    # Without `outputs` the client asks for every output in binary; all came back so.
    assert set(ok(results[3])["binary"]) == set(ok(results[3])["outputs"])
    check_sequence(server, results[14:], "41")
    assert "41" in logged(server, "episode_end", "episode_id", {"41"})


def test_tritonclient_http_json_outputs_and_seeds(server: OipServer) -> None:
    infer = {"op": "infer", "model": "cartpole", "key": KEY, "inputs": observations(ROWS)}
    operations = [
        infer | {"outputs": ["actions", "probability"], "binary": False},
        infer | {"outputs": ["actions"], "parameters": {"seed": 7}},
        infer | {"outputs": ["actions"], "parameters": {"seed": 7}},
        infer | {"outputs": ["actions"], "parameters": {"seed": "7"}},
    ]
    results = run_client("triton", "triton_http.py", server.address, json.dumps(operations))
    assert ok(results[0])["binary"] == []
    assert ok(results[1])["outputs"] == ok(results[2])["outputs"]
    assert refused(results[3])["status"] == "400"
    assert "seed" in refused(results[3])["message"]


def test_tritonclient_grpc_and_a_sequence_over_one_stream(server: OipServer) -> None:
    operations = [
        *common_operations(),
        *metadata_operations(),
        {"op": "stream", "key": KEY, "steps": sequence_steps(42)},
        {"op": "stream", "key": KEY, "steps": sequence_steps("robot-7")},
    ]
    results = run_client("triton", "triton_grpc.py", server.grpc_address, json.dumps(operations))
    check_common(server, results[:11], GRPC)
    check_metadata(results[11:14], "StatusCode.PERMISSION_DENIED")
    check_sequence(server, ok(results[14]), "42")  # tritonclient.grpc: an int64 id
    check_sequence(server, ok(results[15]), "robot-7")


def test_grpc_requests_are_counted_with_their_protocol(server: OipServer) -> None:
    infer = {"op": "infer", "model": "cartpole", "key": KEY, "inputs": observations(ROWS)}
    operations = [infer, infer | {"key": "wrong"}]
    run_client("triton", "triton_grpc.py", server.grpc_address, json.dumps(operations))
    values = samples(httpx.get(server.metrics).text)
    route = 'protocol="grpc",route="/inference.GRPCInferenceService/ModelInfer"'
    counted = {
        name: value
        for name, value in values.items()
        if name.startswith("policy_server_requests_total{") and route in name
    }
    answered = [n for n in counted if 'code="OK"' in n and 'policy="cartpole"' in n]
    assert answered and counted[answered[0]] >= 1
    assert any('code="PERMISSION_DENIED"' in name for name in counted)
    lines = [json.loads(line) for line in server.http.output().splitlines() if '"GRPC"' in line]
    assert any(line.get("protocol") == "grpc" and line["status"] == "OK" for line in lines)


def test_kserve_rest_client(server: OipServer) -> None:
    operations = [*common_operations(), *sequence_steps({"id": "kserve-rest"})]
    url = server.http.url
    results = run_client("kserve", "kserve_client.py", "rest", url, json.dumps(operations))
    check_common(server, results[:11], KSERVE_REST)
    check_sequence(server, results[11:], "kserve-rest")


def test_kserve_grpc_client_sends_rewards_as_integers(server: OipServer) -> None:
    operations = [*common_operations(), *sequence_steps({"id": "kserve-grpc"}, reward_as_int=True)]
    address = server.grpc_address
    results = run_client("kserve", "kserve_client.py", "grpc", address, json.dumps(operations))
    check_common(server, results[:11], KSERVE_GRPC)
    check_sequence(server, results[11:], "kserve-grpc")


def test_tuple_actions_and_int_fields_of_the_real_policies(server: OipServer) -> None:
    if not server.scheduling:
        pytest.skip(f"needs the real Pathmind policies: {SHARED_MODELS} is absent")
    scheduling = [0.5, 0.2, -0.2, 0.3, 0.3, 0.5]
    deployment = {"minute": 5, "hour": 12, "day": 3, "month": 7, "price": 10.5}
    operations = [
        {
            "op": "infer",
            "model": "simple_scheduling",
            "key": KEY,
            "inputs": {"observations": ["FP32", [scheduling]]},
        },
        {
            "op": "infer",
            "model": "deployment_test",
            "key": KEY,
            "inputs": {
                name: ["FP32" if name == "price" else "INT64", [value]]
                for name, value in deployment.items()
            },
        },
        {"op": "model_metadata", "model": "deployment_test", "key": KEY},
    ]
    results = run_client("triton", "triton_grpc.py", server.grpc_address, json.dumps(operations))
    outputs = ok(results[0])["outputs"]
    with server.http.client() as http:
        exact = http.post(
            "/policies/simple_scheduling/distribution", json={"obs": scheduling}
        ).json()
    # The model's MultiDiscrete space decides, whatever `tuple` says: one tensor per component.
    for component, probabilities in enumerate(exact["probabilities"]):
        assert outputs[f"probabilities_{component}"][0] == pytest.approx(probabilities, abs=1e-6)
    assert len(outputs["actions"][0]) == len(exact["probabilities"])
    typed = {t["name"]: t["datatype"] for t in ok(results[2])["inputs"]}
    assert typed == {
        "minute": "INT64",
        "hour": "INT64",
        "day": "INT64",
        "month": "INT64",
        "price": "FP32",
    }
    with server.http.client() as http:
        mode = http.post("/policies/deployment_test/predict_deterministic", json=deployment).json()
    assert ok(results[1])["outputs"]["actions"][0] != [] and mode["actions"]


def test_health_and_metadata_need_no_key_but_models_do(server: OipServer) -> None:
    with httpx.Client(base_url=server.http.url) as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").json() == {"ready": True}
        assert http.get("/v2").status_code == 200
        assert http.get("/v2/models/cartpole").status_code == 401
        assert http.get("/v2/models/cartpole/ready").status_code == 401


def test_every_worker_serves_grpc_on_the_shared_port(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("oip-workers")
    grpc_port = free_port()
    command = serve_command(
        EXAMPLE, cache_dir, "--workers", "2", "--api-key", KEY, "--grpc-port", str(grpc_port)
    )
    command[0] = str(client_python("triton"))
    infer = {"op": "infer", "model": "cartpole", "key": KEY, "inputs": observations(ROWS)}
    operations = [infer | {"new_connection": True}] * 16
    with run_server(command, tmp, KEY) as running:
        deadline = time.monotonic() + 120
        while running.output().count("gRPC (Open Inference Protocol) on") < 2:
            assert time.monotonic() < deadline, running.output()
            time.sleep(0.5)
        address = f"127.0.0.1:{grpc_port}"
        results = run_client("triton", "triton_grpc.py", address, json.dumps(operations))
    assert all(ok(result)["outputs"]["actions"] for result in results)


def test_a_taken_grpc_port_is_named_before_the_model_loads(cache_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = serve_command(EXAMPLE, cache_dir, "--grpc-port", str(port))
        command[0] = str(client_python("triton"))
        result = subprocess.run(
            [part.replace("{port}", str(free_port())) for part in command],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert f"the gRPC port 127.0.0.1:{port} is already in use" in line
    assert "--grpc-port" in line and "0 to turn gRPC off" in line
    assert "loaded policy" not in result.stdout


def test_an_explicit_grpc_port_without_the_extra_says_which_to_install(cache_dir: Path) -> None:
    if importlib.util.find_spec("tritonclient") is not None:
        pytest.skip("tritonclient is installed here: the grpc extra is not missing")
    command = serve_command(EXAMPLE, cache_dir, "--grpc-port", str(free_port()))
    result = subprocess.run(
        [part.replace("{port}", str(free_port())) for part in command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "pip install 'policy-server[grpc]'" in result.stderr
    assert "--grpc-port 0" in result.stderr
