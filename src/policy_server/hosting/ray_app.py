"""The server as one Ray Serve application, for `serve deploy` on a Ray cluster or KubeRay's
RayService: one policy deployment per version found in the policy folders, behind an ingress
that runs the same FastAPI app as `policy-server serve`. `serve_config` writes its config
(`policy-server ray-config`).
"""

from __future__ import annotations

from typing import Any

from policy_server.errors import PolicyLoadError
from policy_server.extras import missing_extra
from policy_server.hosting.app import build_app
from policy_server.loading.repository import Scan, Scanner
from policy_server.logs import configure_logging
from policy_server.metrics import Metrics
from policy_server.serving.ray_backend import (
    RayForward,
    bind_version,
    deployment_options,
    replica_settings,
    serve_name,
)
from policy_server.serving.registry import PolicyVersion
from policy_server.serving.service import ModelCaller, local_caller
from policy_server.settings import PolicySettings, Settings

try:
    from ray import serve
except ImportError as error:  # pragma: no cover - the message is the point
    raise missing_extra("ray", "`serve deploy`", PolicyLoadError, cause=error) from None

IMPORT_PATH = "policy_server.hosting.ray_app:application"
INGRESS = "api"


@serve.deployment(name=INGRESS)
@serve.ingress()
class ApiIngress:
    """The HTTP API, built inside the replica around the handles of the version deployments."""

    def __init__(self, settings: dict[str, Any], handles: dict[str, Any]) -> None:
        self._settings = Settings.model_validate(settings)
        configure_logging(self._settings.log_level)
        self._handles = handles

    def __serve_build_asgi_app__(self) -> Any:
        async def callers(version: PolicyVersion, metrics: Metrics) -> ModelCaller:
            handle = self._handles.get(f"{version.name}/{version.version}")
            if handle is None:  # a version that appeared after `serve deploy`: in-process
                policy = PolicySettings.from_server(self._settings)
                return local_caller(version, policy)
            return RayForward(handle, None, metrics.replica_observer(version.name))

        return build_app(self._settings, callers)


def _policy_settings(settings: Settings, scan: Scan, name: str) -> PolicySettings:
    config = scan.config.policies.get(name)
    return PolicySettings.from_server(settings, config.settings if config else None)


def application(args: dict[str, Any]) -> Any:
    """Ray Serve application builder (`import_path: policy_server.hosting.ray_app:application`):
    one policy deployment per version found in the policy folders, behind one ingress."""
    settings = Settings.model_validate(args)
    scan = Scanner(settings.policy_paths, settings.policy_name).scan()
    handles = {}
    for name, versions in scan.versions.items():
        policy = _policy_settings(settings, scan, name)
        for source in versions.values():
            deployment = serve_name(name, source.version)
            handles[f"{name}/{source.version}"] = bind_version(
                settings, policy, name, source.version, source.folder, deployment
            )
    return ApiIngress.bind(replica_settings(settings), handles)  # type: ignore[attr-defined]


def serve_config(settings: Settings) -> dict[str, Any]:
    """A config that `serve deploy` accepts, listing one deployment per version found now,
    whose replicas can be tuned there one by one."""
    defaults = Settings.model_construct().model_dump(mode="json")
    skipped = {"api_key", "admin_key", "use_ray", "backend", "ray_address"}
    args = {
        name: value
        for name, value in settings.model_dump(mode="json", exclude=skipped).items()
        if value != defaults.get(name)
    }
    args["policy_path"] = str(settings.policy_path.resolve())
    if settings.extra_policy_paths:
        args["extra_policy_paths"] = [str(p.resolve()) for p in settings.extra_policy_paths]
    scan = Scanner(settings.policy_paths, settings.policy_name).scan()
    deployments = [
        {"name": serve_name(name, version)}
        | deployment_options(settings, _policy_settings(settings, scan, name))
        for name, versions in scan.versions.items()
        for version in versions
    ]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [
            {
                "name": f"policy-{settings.resolved_policy_name}",
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": args,
                "deployments": [*deployments, {"name": INGRESS}],
            }
        ],
    }
