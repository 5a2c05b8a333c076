"""The Kubernetes and KServe manifests: each object against its schema (Kubernetes' own,
from kubernetes-validate; KServe's, from the KServe SDK's models of its CRDs), and what they
say of the server against what the server does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from policy_server.hosting.cli import build_parser, settings_from
from tests.oip import client_python
from tests.policies import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes" / "policy-server.yaml"
KSERVE = ROOT / "deploy" / "kserve" / "policy-server.yaml"
KUBERNETES_VERSION = "1.33.0"


def objects(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}


def settings_of(container: dict[str, Any]) -> Any:
    """The settings the container's command line gives, parsed by our own CLI."""
    arguments = container["args"]
    assert arguments[:2] == ["policy-server", "serve"]
    return settings_from(build_parser().parse_args(arguments[1:]))


@pytest.mark.parametrize("kind", ["ConfigMap", "Secret", "Deployment", "Service"])
def test_kubernetes_objects_match_the_kubernetes_schemas(kind: str) -> None:
    document = objects(KUBERNETES)[kind]
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_a_bad_object_is_refused_by_the_same_check() -> None:
    service = objects(KUBERNETES)["Service"]
    service["spec"]["ports"][0]["targetPorts"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def test_the_deployment_serves_both_protocols_with_keyless_probes() -> None:
    found = objects(KUBERNETES)
    pod = found["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    settings = settings_of(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": settings.port,
        "grpc": settings.grpc_port,
        "metrics": settings.metrics_port,
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    key = container["env"][0]
    assert key["name"] == "POLICY_SERVER_API_KEY"
    secret = key["valueFrom"]["secretKeyRef"]
    assert secret["name"] == found["Secret"]["metadata"]["name"]
    assert secret["key"] in found["Secret"]["stringData"]
    repository = next(v for v in pod["volumes"] if "configMap" in v)
    assert repository["configMap"]["name"] == found["ConfigMap"]["metadata"]["name"]
    assert yaml.safe_load(found["ConfigMap"]["data"]["repository.yaml"])["policies"]
    service_ports = {p["name"]: p["targetPort"] for p in found["Service"]["spec"]["ports"]}
    assert service_ports == {"http": "http", "grpc": "grpc", "metrics": "metrics"}


def test_the_service_monitor_scrapes_the_metrics_port() -> None:
    # A Prometheus Operator object, whose schema kubernetes-validate does not ship.
    found = objects(KUBERNETES)
    monitor = found["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = found["Service"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_kserve_objects_match_the_kserve_crds() -> None:
    python = client_python("kserve")
    script = ROOT / "tests" / "deploy" / "kserve_objects.py"
    result = subprocess.run(
        [str(python), str(script), str(KSERVE)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    checked = json.loads(result.stdout)
    assert checked == {"objects": ["ServingRuntime", "InferenceService"], "errors": []}


def test_kserve_objects_refuse_what_the_crds_do_not_have(tmp_path: Path) -> None:
    service = objects(KSERVE)["InferenceService"]
    service["spec"]["predictor"]["model"]["storageUrl"] = "s3://typo"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(service))
    script = ROOT / "tests" / "deploy" / "kserve_objects.py"
    result = subprocess.run(
        [str(client_python("kserve")), str(script), str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "storageUrl: not a field" in json.loads(result.stdout)["errors"][0]


def test_the_serving_runtime_serves_the_inference_service() -> None:
    found = objects(KSERVE)
    runtime, service = found["ServingRuntime"], found["InferenceService"]
    assert {"v1", "v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    container = runtime["spec"]["containers"][0]
    settings = settings_of(container)
    assert str(settings.policy_path) == "/mnt/models"  # where KServe puts the storageUri
    ports = {p["containerPort"]: p.get("name") for p in container["ports"]}
    assert ports == {settings.port: None, settings.grpc_port: "h2c"}  # KServe's gRPC name
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    key = container["env"][0]["valueFrom"]["secretKeyRef"]
    assert (container["env"][0]["name"], key["name"]) == (
        "POLICY_SERVER_API_KEY",
        "policy-server-keys",
    )
