"""A real Prometheus server scrapes a running policy server; what the dashboard shows comes
back through Prometheus's HTTP API."""

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.policies import EXAMPLE, EXAMPLE_KEY, PATHMIND_KEY, ROOT, shared_model
from tests.servers import free_port, serving, stop

OBSERVATION = {
    "cart_position": 0.0,
    "cart_velocity": 0.1,
    "pole_angle": 0.0,
    "pole_angular_velocity": 0.0,
}
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "policy-server.json"


@dataclass
class Prometheus:
    url: str

    def query(self, expression: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}).json()
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's label_values(match, label) variable offers."""
        answer = httpx.get(f"{self.url}/api/v1/label/{label}/values", params={"match[]": match})
        return sorted(answer.json()["data"])

    def eventually(
        self, expression: str, done: Callable[[list[dict[str, Any]]], bool]
    ) -> list[dict[str, Any]]:
        """The query's result once `done` holds of it (Prometheus scrapes every second)."""
        result: list[dict[str, Any]] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                result = self.query(expression)
                if done(result):
                    return result
            except (httpx.TransportError, ValueError):  # not up yet: no answer, or no JSON
                pass
            time.sleep(0.5)
        raise AssertionError(f"{expression} never gave the expected answer: {result}")


@contextmanager
def prometheus(metrics_port: int, tmp_path: Path) -> Iterator[Prometheus]:
    """A Prometheus server scraping `metrics_port` every second."""
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is missing: `make test` installs Debian's prometheus package"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: policy-server\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        yield Prometheus(f"http://127.0.0.1:{port}")
    finally:
        stop(process)


def value(result: list[dict[str, Any]]) -> float:
    return float(result[0]["value"][1]) if result else float("nan")


def reaches(total: float) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda result: value(result) >= total


def test_prometheus_scrapes_the_request_counter(cache_dir: Path, tmp_path: Path) -> None:
    metrics_port = free_port()
    flags = ("--metrics-port", str(metrics_port))
    with (
        serving(EXAMPLE, cache_dir, tmp_path, EXAMPLE_KEY, *flags) as server,
        prometheus(metrics_port, tmp_path) as scraper,
    ):
        with server.client() as client:
            for _ in range(25):
                assert client.post("/predict", json=OBSERVATION).status_code == 200
        expression = 'sum(policy_server_requests_total{route="/predict",code="200"})'
        assert value(scraper.eventually(expression, reaches(25))) == 25
        # Prometheus' own conventions: process and Python runtime metrics beside ours.
        for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"):
            assert scraper.query(name), name


def action_panel() -> dict[str, Any]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return next(p for p in panels if "policy_server_actions_total" in p["targets"][0]["expr"])


def test_the_action_panel_shows_each_component_of_a_tuple_policy_as_its_own_100_percent(
    cache_dir: Path, tmp_path: Path
) -> None:
    folder = shared_model("simple_scheduling")  # three components of six actions each
    metrics_port = free_port()
    flags = ("--metrics-port", str(metrics_port))
    panel = action_panel()
    assert panel["repeat"] == "component"  # one panel per value of $component
    with (
        serving(folder, cache_dir, tmp_path, PATHMIND_KEY, *flags) as server,
        prometheus(metrics_port, tmp_path) as scraper,
    ):
        counted = 'sum(policy_server_actions_total{policy="simple_scheduling"})'
        with server.client() as client:
            # Two rounds, each scraped: rate() needs the counters to grow between samples.
            for rounds in (1, 2):
                for step in range(30):
                    body = {"obs": [float(step), 1.0, 0.0, 3.0, float(step % 2), 2.0]}
                    assert client.post("/predict_raw", json=body).status_code == 200
                assert value(scraper.eventually(counted, reaches(90 * rounds))) == 90 * rounds
        served = 'policy_server_actions_total{policy="simple_scheduling"}'
        components = scraper.label_values("component", served)
        assert components == ["0", "1", "2"]
        for component in components:
            expression = (
                panel["targets"][0]["expr"]
                .replace("$policy", "simple_scheduling")
                .replace("$component", component)
            )
            shares = scraper.eventually(expression, bool)
            assert all(set(share["metric"]) == {"action"} for share in shares)
            assert sum(float(share["value"][1]) for share in shares) == pytest.approx(1.0)
