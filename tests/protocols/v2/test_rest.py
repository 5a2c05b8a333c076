"""The V2 REST routes byte by byte: the binary tensor extension, every refusal, masks,
canaries, the OpenAPI document and the metrics, over a real server."""

from __future__ import annotations

import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from tests.policies import EXAMPLE, EXAMPLE_KEY
from tests.servers import RunningServer, free_port, serving
from tests.test_metrics import samples

INFER = "/v2/models/cartpole/infer"
ROWS = np.array([[0.0, 0.1, 0.05, 0.2], [0.02, -0.3, -0.1, 0.4]], dtype=np.float32)


def binary_request(
    inputs: list[tuple[str, str, list[int], bytes]], **document: Any
) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps(
        document
        | {
            "inputs": [
                {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                for n, d, s, b in inputs
            ]
        }
    )
    body = header + b"".join(b for *_, b in inputs)
    return body, {"inference-header-content-length": str(len(header))}


def read_binary(response: httpx.Response) -> tuple[dict[str, Any], dict[str, bytes]]:
    length = int(response.headers["inference-header-content-length"])
    document = orjson.loads(response.content[:length])
    blobs, offset = {}, length
    for output in document["outputs"]:
        if "data" in output:
            continue
        size = output["parameters"]["binary_data_size"]
        blobs[output["name"]] = response.content[offset : offset + size]
        offset += size
    assert offset == len(response.content)
    return document, blobs


def test_binary_tensors_in_and_out_without_a_content_type(example_server: RunningServer) -> None:
    body, headers = binary_request(
        [("observations", "FP32", [2, 4], ROWS.tobytes())],
        parameters={"binary_data_output": True, "deterministic": True},
        outputs=[{"name": "actions"}, {"name": "decision_id"}, {"name": "probability"}],
    )
    with example_server.client() as http:
        response = http.post(INFER, content=body, headers=headers)
        modes = [http.post("/predict_deterministic", json={"obs": r.tolist()}).json() for r in ROWS]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    document, blobs = read_binary(response)
    assert document["model_name"] == "cartpole"
    assert [o["name"] for o in document["outputs"]] == ["actions", "decision_id", "probability"]
    actions = np.frombuffer(blobs["actions"], dtype="<i8").reshape(2, 1)
    assert actions.tolist() == [mode["actions"] for mode in modes]
    raw = blobs["decision_id"]
    (first,) = struct.unpack_from("<I", raw)
    assert len(raw) == 2 * (4 + first) and first == 36  # two length-prefixed UUIDs
    assert np.frombuffer(blobs["probability"], dtype="<f4") == pytest.approx(
        [mode["probability"] for mode in modes], rel=1e-6
    )


def test_a_per_output_binary_data_overrides_the_request(example_server: RunningServer) -> None:
    body, headers = binary_request(
        [("observations", "FP32", [1, 4], ROWS[:1].tobytes())],
        parameters={"binary_data_output": True},
        outputs=[{"name": "actions", "parameters": {"binary_data": False}}, {"name": "value"}],
    )
    headers["content-type"] = "application/octet-stream"  # as the KServe SDK sends it
    with example_server.client() as http:
        response = http.post(INFER, content=body, headers=headers)
    document, blobs = read_binary(response)
    assert "data" in document["outputs"][0] and set(blobs) == {"value"}


def test_typed_fields_in_json_with_a_mask(example_server: RunningServer) -> None:
    names = ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"]
    inputs = [
        {"name": n, "datatype": "FP32", "shape": [2], "data": ROWS[:, i].tolist()}
        for i, n in enumerate(names)
    ]
    mask = {"name": "action_mask", "datatype": "BOOL", "shape": [2, 2], "data": [[True, False]] * 2}
    with example_server.client() as http:
        answer = http.post(INFER, json={"inputs": [*inputs, mask], "id": "r-1"}).json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert answer["id"] == "r-1"
    assert outputs["actions"]["data"] == [0, 0]
    assert outputs["probabilities"]["data"][1::2] == [0.0, 0.0]
    assert outputs["probability"]["data"] == [1.0, 1.0]


def refusal(server: RunningServer, body: Any, status: int, *words: str, **kw: Any) -> None:
    with server.client() as http:
        if isinstance(body, bytes):
            response = http.post(kw.pop("path", INFER), content=body, **kw)
        else:
            response = http.post(kw.pop("path", INFER), json=body, **kw)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str)
    for word in words:
        assert word in message, message


def observations(data: Any, shape: list[int], datatype: str = "FP32") -> dict[str, Any]:
    return {"name": "observations", "datatype": datatype, "shape": shape, "data": data}


def test_every_bad_request_is_a_400_naming_what_is_wrong(example_server: RunningServer) -> None:
    good = observations([0.0, 0.1, 0.05, 0.2], [1, 4])
    cases: list[tuple[Any, ...]] = [
        (b"{not json", "not valid JSON"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [observations([0.0] * 4, [1, 4], "FP64")]}, "observations", "FP32"),
        ({"inputs": [observations([0.0] * 3, [1, 4])]}, "observations", "3 values"),
        ({"inputs": [observations([0.0] * 4, [1, 4], "TENSOR")]}, "datatype"),
        (
            {"inputs": [{"name": "pole_angle", "datatype": "FP32", "shape": [1], "data": [0]}]},
            "cart_position",
        ),
        ({"inputs": [good, {**good, "name": "extra"}]}, "extra"),
        ({"inputs": [good], "outputs": [{"name": "nothing"}]}, "nothing"),
        ({"inputs": [good], "parameters": {"temperature": 2}}, "temperature"),
        ({"inputs": [good], "parameters": {"seed": -1}}, "seed"),
        ({"inputs": [good], "parameters": {"deterministic": "yes"}}, "deterministic"),
        (
            {
                "inputs": [observations([0.0] * 8, [2, 4])],
                "parameters": {"sequence_id": 3},
            },
            "one observation",
        ),
        (
            {
                "inputs": [
                    good,
                    {"name": "action_mask", "datatype": "BOOL", "shape": [1, 2], "data": [0, 0]},
                ]
            },
            "action_mask",
        ),
        (
            {
                "inputs": [
                    good,
                    {
                        "name": "action_mask",
                        "datatype": "BOOL",
                        "shape": [1, 2],
                        "data": [False, False],
                    },
                ]
            },
            "action_mask",
            "masks every action",
        ),
    ]
    for body, *words in cases:
        refusal(example_server, body, 400, *words)
    # A binary size beyond the body, and bytes that no input claims.
    body, headers = binary_request([("observations", "FP32", [1, 4], ROWS[0].tobytes())])
    refusal(example_server, body[:-4], 400, "binary_data_size", headers=headers)
    refusal(example_server, body + b"xx", 400, "2 bytes", headers=headers)
    nan = np.full((1, 4), np.nan, dtype=np.float32).tobytes()  # JSON cannot carry a NaN
    body, headers = binary_request([("observations", "FP32", [1, 4], nan)])
    refusal(example_server, body, 400, "observations", "NaN", headers=headers)


def test_keys_models_and_versions(example_server: RunningServer) -> None:
    body = {"inputs": [observations([0.0, 0.1, 0.05, 0.2], [1, 4])]}
    with httpx.Client(base_url=example_server.url) as http:
        assert http.post(INFER, json=body).status_code == 401
        wrong = http.post(INFER, json=body, headers={"access-token": "nope"})
        assert (wrong.status_code, wrong.json()) == (403, {"error": "wrong API key"})
    refusal(example_server, body, 404, "nowhere", path="/v2/models/nowhere/infer")
    refusal(example_server, body, 404, "9", path="/v2/models/cartpole/versions/9/infer")
    with example_server.client() as http:
        assert http.get("/v2/models/cartpole/versions/9").status_code == 404
        assert http.get("/v2/models/cartpole/versions/9/ready").status_code == 404
        version = http.get("/schema").json()["version"]
        assert http.get(f"/v2/models/cartpole/versions/{version}/ready").json() == {
            "name": "cartpole",
            "ready": True,
        }
        pinned = http.post(f"/v2/models/cartpole/versions/{version}/infer", json=body).json()
    assert pinned["model_version"] == version


def test_openapi_lists_the_v2_routes_with_stable_ids(example_server: RunningServer) -> None:
    document = httpx.get(example_server.url + "/openapi.json").json()
    ids = {
        operation["operationId"]
        for path, item in document["paths"].items()
        if path.startswith("/v2")
        for operation in item.values()
    }
    assert ids == {
        "v2_server_metadata",
        "v2_server_live",
        "v2_server_ready",
        "v2_model_metadata",
        "v2_model_version_metadata",
        "v2_model_ready",
        "v2_model_version_ready",
        "v2_model_infer",
        "v2_model_version_infer",
    }
    infer = document["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert infer["security"] and {"400", "401", "403", "404"} <= set(infer["responses"])


def test_metrics_and_logs_name_the_protocol(
    example_with_metrics: tuple[RunningServer, str],
) -> None:
    server, metrics_url = example_with_metrics
    body = {"inputs": [observations([0.0, 0.1, 0.05, 0.2], [1, 4])]}
    with server.client() as http:
        for _ in range(3):
            assert http.post(INFER, json=body).status_code == 200
        version = http.get("/schema").json()["version"]
    values = samples(httpx.get(metrics_url).text)
    labels = (
        f'code="200",method="POST",policy="cartpole",protocol="v2",'
        f'route="/v2/models/{{model_name}}/infer",version="{version}"'
    )
    assert values[f"policy_server_requests_total{{{labels}}}"] == 3
    lines = [orjson.loads(line) for line in server.output().splitlines() if '"request"' in line]
    assert any(line.get("protocol") == "v2" and line["status"] == 200 for line in lines)


@pytest.fixture(scope="module")
def canary(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("canary") / "policies"
    for version in ("1", "2"):
        shutil.copytree(EXAMPLE, repository / "cartpole" / version)
    (repository / "repository.yaml").write_text(
        'policies:\n  cartpole:\n    traffic: {"1": 50, "2": 50}\n    shadow: "2"\n'
    )
    tmp = tmp_path_factory.mktemp("canary-run")
    port = free_port()
    with serving(repository, cache_dir, tmp, EXAMPLE_KEY, "--metrics-port", str(port)) as server:
        server.metrics = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
        yield server


def test_episodes_keep_one_canary_version_and_a_shadow_scores_them(canary: RunningServer) -> None:
    body = {"inputs": [observations([0.0, 0.1, 0.05, 0.2], [1, 4])]}
    seen: dict[str, set[str]] = {}
    with canary.client() as http:
        for episode in range(12):
            for step in range(3):
                parameters = {"episode_id": f"e{episode}"} | ({"reward": 1.0} if step else {})
                answer = http.post(INFER, json=body | {"parameters": parameters}).json()
                assert answer["parameters"] == {"episode_id": f"e{episode}", "step": step}
                seen.setdefault(f"e{episode}", set()).add(answer["model_version"])
        metadata = http.get("/v2/models/cartpole").json()
    assert all(len(versions) == 1 for versions in seen.values())
    assert set().union(*seen.values()) == {"1", "2"}
    assert metadata["versions"] == ["1", "2"]
    # Version 2 shadows the answers of version 1, off the request path, as on /predict.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        values = samples(httpx.get(canary.metrics).text)  # type: ignore[attr-defined]
        compared = sum(
            v for k, v in values.items() if k.startswith("policy_server_shadow_comparisons_total{")
        )
        if compared:
            break
        time.sleep(0.2)
    assert compared > 0
