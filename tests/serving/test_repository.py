"""Several policies and versions in one server, on the real Pathmind policies: every route of
each, the OpenAPI document per policy, hot reloads under load, the traffic split, sticky
episodes and a shadow version off the request path."""

import asyncio
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.policies import EXAMPLE, EXAMPLE_KEY, PATHMIND_KEY, shared_model, slow_onnx_policy
from tests.servers import RunningServer, free_port, serving

pytestmark = pytest.mark.models

ADMIN = {"access-token": "admin-secret"}
MOUSE = {
    "mouse_row": 1,
    "mouse_col": 2,
    "mouse_row_distance": 1,
    "mouse_col_distance": -1,
    "cheese_row": 2,
    "cheese_col": 1,
}
SCHEDULING = {
    "total_products_processed": 12,
    "machine1_seized": 1,
    "machine2_seized": 0,
    "seizeDelayStage1_queue": 3,
    "seizeDelayStage2_queue": 1,
    "seizeDelayStage3_queue": 2,
}
CONFIG = """\
default: mouse
policies:
  mouse:
    traffic: {"1": 80, "2": 20}
"""


def copy_policy(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for name in ("schema.yaml", "saved_model.zip"):
        shutil.copyfile(source / name, target / name)


def build_repository(root: Path) -> Path:
    """Three policies, one of them in two versions, with an 80/20 split between those."""
    mouse = shared_model("mouse_and_cheese")
    copy_policy(mouse, root / "mouse" / "1")
    copy_policy(mouse, root / "mouse" / "2")
    copy_policy(shared_model("simple_scheduling"), root / "scheduling")
    copy_policy(shared_model("stock"), root / "stock")
    (root / "repository.yaml").write_text(CONFIG)
    return root


@contextmanager
def repository_server(root: Path, cache: Path, tmp: Path) -> Iterator[RunningServer]:
    flags = ("--admin-key", "admin-secret", "--poll-interval-s", "0")
    with serving(root, cache, tmp, PATHMIND_KEY, *flags) as running:
        yield running


@pytest.fixture(scope="module")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The repository as built, for the tests that only read: none changes its folders,
    traffic or versions."""
    root = build_repository(tmp_path_factory.mktemp("repository"))
    with repository_server(root, cache_dir, tmp_path_factory.mktemp("repo")) as running:
        yield running


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A repository of this test's own, which it may change."""
    return build_repository(tmp_path / "repository")


@pytest.fixture
def own_server(repository: Path, cache_dir: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """A server of this test's own, on its own repository."""
    with repository_server(repository, cache_dir, tmp_path) as running:
        yield running


def test_policies_lists_versions_states_and_traffic(server: RunningServer) -> None:
    with server.client() as client:
        listing = client.get("/policies").json()
        assert httpx.get(server.url + "/policies").status_code == 403
        assert client.get("/ready").json() == {"ready": True, "waiting": []}
    assert listing["default"] == "mouse"
    policies = {p["name"]: p for p in listing["policies"]}
    assert set(policies) == {"mouse", "scheduling", "stock"}
    versions = {v["version"]: v for v in policies["mouse"]["versions"]}
    assert {v: versions[v]["traffic"] for v in versions} == {"1": 80.0, "2": 20.0}
    assert all(v["state"] == "ready" and v["runtime"] == "onnx" for v in versions.values())
    [scheduling] = policies["scheduling"]["versions"]
    assert scheduling["action_space"] == {"type": "MultiDiscrete", "nvec": [6, 6, 6]}
    assert scheduling["traffic"] == 100.0


@pytest.mark.parametrize(
    ("name", "body", "raw"),
    [
        ("mouse", MOUSE, list(MOUSE.values())),
        ("scheduling", SCHEDULING, list(SCHEDULING.values())),
        ("stock", None, [0.5, -1.0, 2.0]),
    ],
)
def test_every_route_of_every_policy(
    server: RunningServer, name: str, body: dict[str, Any] | None, raw: list[float]
) -> None:
    with server.client() as client:
        listing = {p["name"]: p for p in client.get("/policies").json()["policies"]}
        versions = [v["version"] for v in listing[name]["versions"]]
        for base in [f"/policies/{name}"] + [f"/policies/{name}/versions/{v}" for v in versions]:
            pinned = base.rsplit("/", 1)[-1] if "/versions/" in base else None
            answers = [
                client.post(base + "/predict_raw", json={"obs": raw}),
                client.post(base + "/predict_raw_batch", json={"observations": [raw, raw]}),
                client.post(base + "/predict_deterministic", json={"obs": raw}),
            ]
            distribution = client.post(base + "/distribution", json={"obs": raw})
            schema = client.get(base + "/schema")
            if body is not None:
                answers.append(client.post(base + "/predict", json=body))
                answers.append(client.post(base + "/predict_batch", json={"observations": [body]}))
                typed = client.post(base + "/distribution", json=body).json()
                same = {k: v for k, v in typed.items() if k != "version"}
                assert same == {k: v for k, v in distribution.json().items() if k != "version"}
            else:
                assert client.post(base + "/predict", json={"obs": raw}).status_code == 404
            for response in [*answers, distribution, schema]:
                assert response.status_code == 200, (base, response.text)
            single = [a.json() for a in answers if "predictions" not in a.json()]
            batched = [
                p for a in answers if "predictions" in a.json() for p in a.json()["predictions"]
            ]
            for answer in [*single, *batched, distribution.json()]:
                assert answer["policy"] == name
                assert pinned is None or answer["version"] == pinned
            assert schema.json()["name"] == name
            assert len({a["decision_id"] for a in single + batched}) == len(single + batched)


def test_openapi_names_each_policy_apart(server: RunningServer) -> None:
    document = httpx.get(server.url + "/openapi.json").json()
    components = set(document["components"]["schemas"])
    assert {"MouseObservation", "SchedulingObservation", "StockRawObservation"} <= components
    assert {"Observation", "Prediction", "ActionDistribution"} <= components
    operations = {
        op["operationId"]: path for path, item in document["paths"].items() for op in item.values()
    }
    assert operations["predict"] == "/predict"
    assert operations["mousePredict"] == "/policies/mouse/predict"
    assert operations["mousePredictVersion"] == "/policies/mouse/versions/{version}/predict"
    assert operations["schedulingDistribution"] == "/policies/scheduling/distribution"
    assert operations["stockPredictRaw"] == "/policies/stock/predict_raw"
    assert "stockPredict" not in operations, "stock has no observations: raw routes only"
    scheduling = document["components"]["schemas"]["SchedulingObservation"]
    assert list(scheduling["properties"]) == list(SCHEDULING)
    again = httpx.get(server.url + "/openapi.json").json()
    assert again == document, "the document is stable"


async def versions_answering(
    server: RunningServer, count: int, episode: str | None = None
) -> Counter[str]:
    body: dict[str, Any] = {"obs": list[Any](MOUSE.values())}
    if episode is not None:
        body = {"observation": body, "episode_id": episode}
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
        semaphore = asyncio.Semaphore(32)

        async def one() -> str:
            async with semaphore:
                response = await client.post("/policies/mouse/predict_raw", json=body)
                return str(response.json()["version"])

        return Counter(await asyncio.gather(*(one() for _ in range(count))))


def test_traffic_follows_the_weights(server: RunningServer) -> None:
    draws = 2000
    counts = asyncio.run(versions_answering(server, draws))
    share = counts["2"] / draws
    tolerance = 5 * np.sqrt(0.2 * 0.8 / draws)
    assert abs(share - 0.2) < tolerance, counts


def test_an_episode_stays_on_its_version(server: RunningServer) -> None:
    chosen: dict[str, str] = {}
    for index in range(200):
        counts = asyncio.run(versions_answering(server, 4, episode=f"episode-{index}"))
        assert len(counts) == 1, f"episode-{index} was answered by {counts}"
        chosen[f"episode-{index}"] = next(iter(counts))
    share = sum(v == "2" for v in chosen.values()) / len(chosen)
    assert 0.05 < share < 0.4, "episodes are spread by the weights"
    with httpx.Client(base_url=server.url, headers=server.headers) as client:
        steps = [
            client.post(
                "/predict",
                json={"observation": MOUSE, "episode_id": "counted"},
            ).json()["step"]
            for _ in range(3)
        ]
    assert steps == [0, 1, 2]


async def load(server: RunningServer, stop: asyncio.Event, failures: list[str]) -> int:
    """32 clients sending unpinned predictions until `stop`; returns how many answered."""
    routes = [
        ("/policies/mouse/predict_raw", {"obs": list(MOUSE.values())}),
        ("/predict", MOUSE),
        ("/policies/stock/predict_raw", {"obs": [0.1, 0.2, 0.3]}),
    ]
    answered = 0

    async def client_loop(index: int) -> None:
        nonlocal answered
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=60
        ) as client:
            while not stop.is_set():
                path, body = routes[index % len(routes)]
                response = await client.post(path, json=body)
                if response.status_code != 200:
                    failures.append(f"{path}: {response.status_code} {response.text}")
                answered += 1

    await asyncio.gather(*(client_loop(i) for i in range(32)))
    return answered


async def reload(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_reloads_under_load_fail_no_request(own_server: RunningServer, repository: Path) -> None:
    """A version added, a version removed, a broken version and a new policy, while 32
    clients keep sending."""
    server = own_server

    async def scenario() -> tuple[int, list[str], list[dict[str, Any]]]:
        stop, failures = asyncio.Event(), list[str]()
        traffic = asyncio.create_task(load(server, stop, failures))
        reports = []
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=120
        ) as client:
            await asyncio.sleep(0.5)
            copy_policy(shared_model("mouse_and_cheese"), repository / "mouse" / "3")
            reports.append(await reload(client))
            shutil.rmtree(repository / "mouse" / "1")
            reports.append(await reload(client))
            add_broken_version(repository, "4")
            reports.append(await reload(client))
            copy_policy(shared_model("deployment_test"), repository / "deployment")
            reports.append(await reload(client))
            await asyncio.sleep(0.5)
        stop.set()
        return await traffic, failures, reports

    answered, failures, reports = asyncio.run(scenario())
    assert failures == [], failures[:5]
    assert answered > 100
    assert reports[0]["loaded"] == ["mouse/3"]
    assert reports[1]["unloaded"] == ["mouse/1"]
    assert list(reports[2]["failed"]) == ["mouse/4"]
    assert "discrete" in reports[2]["failed"]["mouse/4"]
    assert reports[3]["loaded"] == ["deployment/1"] or reports[3]["loaded"][0].startswith(
        "deployment/"
    )
    with server.client() as client:
        listing = {p["name"]: p for p in client.get("/policies").json()["policies"]}
        mouse = {v["version"]: v for v in listing["mouse"]["versions"]}
        pinned = client.post("/policies/mouse/versions/3/predict", json=MOUSE)
        gone = client.post("/policies/mouse/versions/1/predict", json=MOUSE)
        added = client.post(
            "/policies/deployment/predict",
            json={"minute": 30, "hour": 12, "day": 3, "month": 6, "price": 101.5},
        )
        document = client.get("/openapi.json").json()
    assert set(mouse) == {"2", "3", "4"}
    assert mouse["4"]["state"] == "failed" and "discrete" in mouse["4"]["reason"]
    assert mouse["2"]["traffic"] == 100.0, "the named version still ready takes the traffic"
    assert mouse["3"]["traffic"] == 0.0, "a version not named in the weights gets none"
    assert pinned.status_code == 200 and pinned.json()["version"] == "3"
    assert gone.status_code == 404
    assert added.status_code == 200 and added.json()["policy"] == "deployment"
    assert "DeploymentObservation" in document["components"]["schemas"]


def add_broken_version(repository: Path, version: str) -> None:
    broken = repository / "mouse" / version
    copy_policy(shared_model("mouse_and_cheese"), broken)
    (broken / "schema.yaml").write_text("parameters: {discrete: maybe}\n")


def test_traffic_changes_through_the_admin_route_and_repository_yaml(
    own_server: RunningServer, repository: Path
) -> None:
    """Mouse in versions 2 and 3 (and 4, failed): the admin route, then repository.yaml."""
    server = own_server
    shutil.rmtree(repository / "mouse" / "1")
    copy_policy(shared_model("mouse_and_cheese"), repository / "mouse" / "3")
    add_broken_version(repository, "4")
    with server.client() as client:
        assert client.post("/admin/reload", headers=ADMIN).status_code == 200
    with server.client() as client:
        change = client.put(
            "/admin/policies/mouse/traffic",
            json={"traffic": {"2": 0, "3": 100}, "shadow": "2"},
            headers=ADMIN,
        )
        assert change.status_code == 200, change.text
        assert {v["version"]: v["traffic"] for v in change.json()["versions"]} == {
            "2": 0.0,
            "3": 100.0,
            "4": 0.0,
        }
        assert change.json()["shadow"] == "2"
        assert asyncio.run(versions_answering(server, 50)) == Counter({"3": 50})
        unknown = client.put(
            "/admin/policies/mouse/traffic", json={"traffic": {"9": 1}}, headers=ADMIN
        )
        assert unknown.status_code == 404
        (repository / "repository.yaml").write_text(
            CONFIG.replace('traffic: {"1": 80, "2": 20}', 'traffic: {"2": 100}')
        )
        assert client.post("/admin/reload", headers=ADMIN).status_code == 200
        listing = {p["name"]: p for p in client.get("/policies").json()["policies"]}
    assert listing["mouse"]["traffic"] == {"2": 100.0}, "the newer change, the file's, wins"
    assert listing["mouse"]["shadow"] is None
    assert asyncio.run(versions_answering(server, 50)) == Counter({"2": 50})


def test_admin_routes_need_the_admin_key(server: RunningServer) -> None:
    with server.client() as client:
        assert client.post("/admin/reload").status_code == 403
        change = client.put("/admin/policies/stock/traffic", json={"traffic": None})
        assert change.status_code == 403
        assert httpx.post(server.url + "/admin/reload").status_code == 403


@pytest.fixture(scope="module")
def shadowed(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, str]]:
    """The bundled example answering, and a much slower model of the same layout shadowing."""
    root = tmp_path_factory.mktemp("shadow")
    copy_policy(EXAMPLE, root / "rail" / "1")
    slow = root / "rail" / "2"
    slow.mkdir()
    slow_onnx_policy(slow / "model.onnx", width=4, actions=2)
    (slow / "schema.yaml").write_text(
        (EXAMPLE / "schema.yaml").read_text()
        + "  action_space: {type: Discrete, n: 2}\n"
        + "  logits_output: logits\n  value_output: value\n"
    )
    (root / "repository.yaml").write_text(
        'policies:\n  rail:\n    traffic: {"1": 100}\n    shadow: "2"\n'
    )
    port = free_port()
    flags = ("--metrics-port", str(port), "--admin-key", "admin-secret")
    with serving(root, cache_dir, tmp_path_factory.mktemp("sh"), EXAMPLE_KEY, *flags) as server:
        yield server, f"http://127.0.0.1:{port}/metrics"


def median_ms(client: httpx.Client, path: str, body: dict[str, Any], count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        assert client.post(path, json=body).status_code == 200
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def test_a_slow_shadow_stays_off_the_request_path(shadowed: tuple[RunningServer, str]) -> None:
    server, metrics_url = shadowed
    body = {"obs": [0.0, 0.1, 0.02, -0.1]}
    with server.client() as client:
        shadow_ms = median_ms(client, "/policies/rail/versions/2/predict_raw", body, 20)
        primary_ms = median_ms(client, "/policies/rail/predict_raw", body, 100)
        answered = {client.post("/predict_raw", json=body).json()["version"] for _ in range(20)}
    # Were the shadow on the request path, every answer would take at least its time.
    assert primary_ms < shadow_ms / 2, (primary_ms, shadow_ms)
    assert answered == {"1"}
    # 120 answers, each scored by the shadow in its own thread, at its own (slow) pace.
    deadline = time.monotonic() + 120
    scored = 0.0
    while time.monotonic() < deadline and scored < 120:
        text = httpx.get(metrics_url).text
        scored = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("policy_server_shadow_comparisons_total{")
        )
        time.sleep(0.2)
    assert scored == 120, "the shadow scored every observation the primary answered"
    assert 'shadow="2"' in text and 'version="1"' in text
