"""A real Prometheus server scrapes a running policy server; the counter comes back through
Prometheus's HTTP API."""

import shutil
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import EXAMPLE, EXAMPLE_KEY, free_port, serving, stop

OBSERVATION = {
    "cart_position": 0.0,
    "cart_velocity": 0.1,
    "pole_angle": 0.0,
    "pole_angular_velocity": 0.0,
}


def test_prometheus_scrapes_the_request_counter(cache_dir: Path, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is missing: `make test` installs Debian's prometheus package"
    metrics_port, prometheus_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: policy-server\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    log = tmp_path / "prometheus.log"
    flags = ("--metrics-port", str(metrics_port))
    with (
        serving(EXAMPLE, cache_dir, tmp_path, EXAMPLE_KEY, *flags) as server,
        log.open("wb") as sink,
    ):
        prometheus = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
        try:
            with server.client() as client:
                for _ in range(25):
                    assert client.post("/predict", json=OBSERVATION).status_code == 200
            query = 'sum(policy_server_requests_total{route="/predict",status="200"})'
            value = None
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                try:
                    answer = httpx.get(
                        f"http://127.0.0.1:{prometheus_port}/api/v1/query", params={"query": query}
                    ).json()
                    result = answer["data"]["result"]
                    if result and float(result[0]["value"][1]) >= 25:
                        value = float(result[0]["value"][1])
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            assert value == 25, log.read_text()[-2000:]
        finally:
            stop(prometheus)
