"""The deployment files: what can be checked without a Docker engine."""

import json
import re
import shutil
import subprocess
from typing import Any

import httpx
import yaml

from tests.policies import ROOT
from tests.servers import RunningServer

DEPLOY = ROOT / "deploy"


def test_compose_file_is_valid() -> None:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is missing: `make test` installs Debian's package"
    result = subprocess.run(
        [compose, "-f", str(DEPLOY / "docker-compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())["services"]
    assert {"policy-server", "prometheus", "grafana"} <= set(services)
    assert "8080:8080" in services["policy-server"]["ports"]


def test_prometheus_config_scrapes_the_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["policy-server:8080"]


def test_image_runs_the_readme_command_as_a_non_root_user() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    command = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    assert " ".join(command) in (ROOT / "README.md").read_text()
    assert re.search(r"^USER policy$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile
    assert not re.search(r"^(ENV|ARG)\b.*API_KEY", dockerfile, re.M | re.I), "no key baked in"
    assert dockerfile.count("FROM ") >= 2, "multi-stage build"


def test_every_metric_the_dashboard_queries_is_exported(
    example_with_metrics: tuple[RunningServer, str],
) -> None:
    server, metrics_url = example_with_metrics
    with server.client() as client:
        client.post("/predict_raw", json={"obs": [0.0, 0.0, 0.1, 0.0]})
        client.post("/predict_raw", json={"obs": [0.0]})
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in httpx.get(metrics_url).text.splitlines()
        if line and not line.startswith("#")
    }
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "policy-server.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"policy_server_[a-z_]+", target["expr"])
    }
    assert len(queried) >= 5
    # A rollout's series exist only while a policy has one (tests/serving/test_rollout.py).
    queried = {name for name in queried if not name.startswith("policy_server_rollout_")}
    assert queried <= exported, queried - exported
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    assert all(panel["datasource"]["uid"] == uid for panel in dashboard["panels"])


def dashboard_panels() -> list[dict[str, Any]]:
    return list(
        json.loads((DEPLOY / "grafana" / "dashboards" / "policy-server.json").read_text())["panels"]
    )


def test_dashboard_queries_use_the_request_counter_labels() -> None:
    labels = {"route", "method", "code", "policy", "version", "le"}
    for panel in dashboard_panels():
        for target in panel["targets"]:
            for selector in re.findall(r"policy_server_requests_total\{([^}]*)\}", target["expr"]):
                used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
                assert used <= labels, (panel["title"], used - labels)


def test_the_action_distribution_is_one_panel_per_component_of_one_policy() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "policy-server.json").read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert not variables["policy"]["multi"] and not variables["policy"]["includeAll"]
    assert "$policy" in variables["component"]["definition"]
    (panel,) = [p for p in dashboard["panels"] if p.get("repeat")]
    assert panel["repeat"] == "component"
    expression = panel["targets"][0]["expr"]
    assert expression.count('policy="$policy",component="$component"') == 2
    # Shares of the component's actions, stacked to 100% within the panel.
    assert expression.startswith("sum by (action) (rate(policy_server_actions_total")
    assert panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert panel["fieldConfig"]["defaults"]["max"] == 1
