"""Generated SDKs: the Python client, installed into a fresh virtual environment, talks to
the live server; the Java, Scala and R clients hold the observation model and the predict
operation (compiling them needs registries our machines cannot reach)."""

import asyncio
import io
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from policy_server.errors import ClientsNotReady
from policy_server.protocols.rest.sdks import ClientBuilder
from tests.policies import EXAMPLE, EXAMPLE_KEY
from tests.servers import RunningServer, serving

FIELDS = ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"]

CLIENT_SCRIPT = """
import json, sys
import policy_client
from policy_client.models.observation import Observation
from policy_client.models.predict_request import PredictRequest

url, key = sys.argv[1], sys.argv[2]
observation = PredictRequest(
    Observation(cart_position=0.0, cart_velocity=0.0, pole_angle=0.1, pole_angular_velocity=0.5)
)

def api(token):
    configuration = policy_client.Configuration(host=url, api_key={"APIKeyHeader": token})
    return policy_client.PredictionsApi(policy_client.ApiClient(configuration))

prediction = api(key).predict(observation)
try:
    api(key + "-wrong").predict(observation)
    status = None
except policy_client.ApiException as error:
    status = error.status
print(json.dumps({"actions": prediction.actions, "probability": prediction.probability,
                  "wrong_key_status": status}))
"""


@pytest.fixture(scope="module")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("clients")
    flags = ("--client-languages", "python,java,scala,r")
    with serving(EXAMPLE, cache_dir, tmp, EXAMPLE_KEY, *flags) as running:
        yield running


def wait_for_clients(server: RunningServer) -> bytes:
    """GET /clients, which waits for the generation in progress; predictions go on meanwhile."""
    with ThreadPoolExecutor(1) as pool, server.client() as client:
        download = pool.submit(client.get, "/clients", timeout=300)
        while not download.done():
            assert client.post("/predict_raw", json={"obs": [0, 0, 0, 0]}).status_code == 200
            time.sleep(0.2)
        response = download.result()
    assert response.status_code == 200, response.text
    return response.content


def extract(archive: bytes, into: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
        bundle.extractall(into)
    return into


def test_python_client_predicts_with_the_key(server: RunningServer, tmp_path: Path) -> None:
    bundle = zipfile.ZipFile(io.BytesIO(wait_for_clients(server)))
    assert {name.split("/")[0] for name in bundle.namelist()} == {"python", "java", "scala", "r"}
    assert "python/policy_client/models/observation.py" in bundle.namelist()
    with server.client() as client:
        python_zip = client.get("/clients/python")
        assert client.get("/clients/cobol").status_code == 422
    assert python_zip.headers["content-type"] == "application/zip"
    source = extract(python_zip.content, tmp_path / "sdk") / "python"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", CLIENT_SCRIPT, server.url, EXAMPLE_KEY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)
    assert answer["actions"] in ([0], [1]) and 0 < answer["probability"] <= 1
    assert answer["wrong_key_status"] == 403


@pytest.mark.parametrize(
    ("language", "model_file", "api_file", "operation"),
    [
        ("java", "Observation.java", "PredictionsApi.java", "predict("),
        ("scala", "Observation.scala", "PredictionsApi.scala", "def predict("),
        ("r", "observation.R", "predictions_api.R", "Predict = function("),
    ],
)
def test_other_clients_hold_the_observation_and_predict(
    server: RunningServer,
    tmp_path: Path,
    language: str,
    model_file: str,
    api_file: str,
    operation: str,
) -> None:
    wait_for_clients(server)
    with server.client() as client:
        archive = client.get(f"/clients/{language}")
    assert archive.status_code == 200
    root = extract(archive.content, tmp_path) / language
    [model] = [p for p in root.rglob(model_file) if "test" not in p.parts and "docs" not in p.parts]
    text = model.read_text().lower().replace("_", "")
    for field in FIELDS:
        assert field.replace("_", "") in text, (field, model)
    [api] = [p for p in root.rglob(api_file) if "test" not in p.parts and "docs" not in p.parts]
    assert operation in api.read_text()


def test_openapi_document_makes_good_sdks(server: RunningServer) -> None:
    document = httpx.get(server.url + "/openapi.json").json()
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    assert {
        "predict",
        "predictRaw",
        "predictDeterministic",
        "distribution",
        "predictBatch",
        "predictRawBatch",
        "getSchema",
        "health",
        "downloadClients",
        "downloadClient",
    } <= operations
    observation = document["components"]["schemas"]["Observation"]
    assert list(observation["properties"]) == FIELDS
    assert observation["properties"]["pole_angle"]["maximum"] == 0.42
    assert "description" in observation["properties"]["cart_velocity"]
    assert observation["examples"]
    assert "APIKeyHeader" in document["components"]["securitySchemes"]


def test_clients_command_generates_offline(tmp_path: Path, cache_dir: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policy_server.hosting.cli",
            "clients",
            str(EXAMPLE),
            "--out",
            str(tmp_path / "sdk"),
            "--lang",
            "python",
            "--cache-dir",
            str(cache_dir),
            "--log-level",
            "warning",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "[1/1] generating the python client" in result.stdout
    assert (tmp_path / "sdk" / "python" / "policy_client" / "models" / "observation.py").is_file()


def test_a_missing_java_runtime_is_a_clear_503(tmp_path: Path, cache_dir: Path) -> None:
    flags = ("--client-languages", "python", "--java", str(tmp_path / "no-java"))
    with (
        serving(EXAMPLE, tmp_path / "fresh-cache", tmp_path, EXAMPLE_KEY, *flags) as running,
        running.client() as client,
    ):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            response = client.get("/clients/python")
            if response.json()["error"]["code"] != "clients_not_ready":
                break
            time.sleep(0.2)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "clients_unavailable"
    assert "no Java runtime" in response.json()["error"]["message"]


def test_a_download_waits_up_to_its_limit_then_is_told_to_retry(
    server: RunningServer, tmp_path: Path
) -> None:
    document = httpx.get(server.url + "/openapi.json").json()
    builder = ClientBuilder(lambda: document, tmp_path, ["python"], wait_s=0)
    with pytest.raises(ClientsNotReady) as not_ready:
        asyncio.run(builder.archive("python"))
    assert not_ready.value.headers is not None
    assert int(not_ready.value.headers["Retry-After"]) > 0

    async def download_while_the_loop_runs() -> tuple[bytes, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        archive = await builder.archive("python")
        ticker.cancel()
        return archive, ticks

    builder.wait_s = 300
    archive, ticks = asyncio.run(download_while_the_loop_runs())
    assert ticks > 10, "the wait never blocks the event loop"
    assert (
        "python/policy_client/api/predictions_api.py"
        in zipfile.ZipFile(io.BytesIO(archive)).namelist()
    )
