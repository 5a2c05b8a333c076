"""The Ray Serve backend: the same FastAPI app, with each model call sent to a Ray Serve
deployment. The deployment batches with Ray Serve's own `serve.batch`, using the in-process
batcher's maximum batch size and wait; sampling stays in the HTTP process, so that every
backend gives the same distribution.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.errors import BackendUnavailable, PolicyLoadError
from policy_server.registry import PolicyVersion
from policy_server.runtime.base import ModelOutputs
from policy_server.settings import Settings

try:
    import ray
    from ray import serve
except ImportError:  # pragma: no cover - the message is the point
    raise PolicyLoadError(
        "the Ray backend needs Ray Serve: pip install 'policy-server[ray]'"
    ) from None

logger = logging.getLogger(__name__)


@serve.deployment(name="policy")
class PolicyDeployment:
    """One replica: the policy's runtime behind Ray Serve's batching."""

    def __init__(self, settings: dict[str, Any], source: dict[str, str]) -> None:
        from policy_server.loader import load_folder

        self._settings = Settings.model_validate(settings)
        self._runtime = load_folder(
            Path(source["folder"]), source["name"], source["version"], self._settings
        ).runtime
        self.forward.set_max_batch_size(self._settings.max_batch_size)  # type: ignore[attr-defined]
        wait = self._settings.max_batch_wait_ms / 1000.0
        self.forward.set_batch_wait_timeout_s(wait)  # type: ignore[attr-defined]
        self._replica = serve.get_replica_context().replica_id.unique_id

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def forward(
        self, requests: list[npt.NDArray[np.float32]]
    ) -> list[tuple[Any, Any, str, int]]:
        rows = requests[0] if len(requests) == 1 else np.concatenate(requests)
        outputs = self._runtime.forward(rows)
        answers, start = [], 0
        for request in requests:
            end = start + len(request)
            value = None if outputs.value is None else outputs.value[start:end]
            answers.append((outputs.logits[start:end], value, self._replica, os.getpid()))
            start = end
        return answers


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Replicas: a fixed count, or Ray Serve's autoscaling between MIN and MAX."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.ray_replica_cpus},
        # Serve's default (5 in flight per replica) would keep serve.batch from ever filling
        # a batch: requests wait in the router instead, and throughput collapses under load.
        "max_ongoing_requests": max(2 * settings.max_batch_size, 32),
    }
    if settings.autoscale:
        low, high = (int(part) for part in settings.autoscale.split(":"))
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high}
    else:
        options["num_replicas"] = settings.replicas
    return options


class RayForward:
    """The service's forward pass for one policy, answered by the Ray Serve deployment."""

    def __init__(self, handle: Any, application: str | None = None, on_replica: Any = None) -> None:
        self._handle = handle
        self._application = application
        self._on_replica = on_replica

    async def forward(self, rows: npt.NDArray[np.float32]) -> ModelOutputs:
        try:
            logits, value, replica, _ = await self._handle.forward.remote(rows)
        except Exception as error:  # a replica died or is restarting: ask the client to retry
            logger.warning("Ray Serve request failed: %s", error)
            raise BackendUnavailable(
                "the model replica is unavailable; retry shortly", headers={"Retry-After": "1"}
            ) from None
        if self._on_replica is not None:
            self._on_replica(replica)
        return ModelOutputs(logits, value)

    async def close(self) -> None:
        if self._application is not None:  # only the process that deployed it removes it
            await asyncio.to_thread(shutdown, self._application)


_started_ray = False
_deployed: set[str] = set()


def _source(version: PolicyVersion) -> dict[str, str]:
    return {
        "folder": str(version.folder.resolve()),
        "name": version.name,
        "version": version.version,
    }


def _shared(settings: Settings) -> dict[str, Any]:
    return settings.model_dump(mode="json", exclude={"api_key", "admin_key"})


def application_name(version: PolicyVersion) -> str:
    return f"policy-{version.name}-{version.version}"


async def deploy_version(settings: Settings, version: PolicyVersion, metrics: Any) -> RayForward:
    """Run one policy version as its own Ray Serve application (a local Ray, or the cluster
    at --ray-address); its caller removes it again when the version is unloaded."""
    return await asyncio.to_thread(_deploy, settings, version, metrics)


def _deploy(settings: Settings, version: PolicyVersion, metrics: Any) -> RayForward:
    global _started_ray
    if not ray.is_initialized():
        address = settings.ray_address or None
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        _started_ray = address is None
    serve.start(proxy_location="Disabled")
    options = deployment_options(settings)
    app = PolicyDeployment.options(**options).bind(_shared(settings), _source(version))  # type: ignore[attr-defined]
    name = application_name(version)
    handle = serve.run(app, name=name, route_prefix=None)
    _deployed.add(name)
    logger.info("policy %s/%s deployed on Ray Serve (%s)", version.name, version.version, options)
    return RayForward(handle, name, metrics.replica_observer(version.name))


def shutdown(application: str) -> None:
    """Remove one version's application; when the last one goes, stop the local Ray instance
    this process started, with every process it owns. On a cluster we joined, only our
    applications are removed."""
    global _started_ray
    _deployed.discard(application)
    if not ray.is_initialized():
        return
    if _started_ray and not _deployed:
        ray.shutdown()
        _started_ray = False
    else:
        serve.delete(application)


@serve.deployment(name="api")
@serve.ingress()
class ApiIngress:
    """The HTTP API as a Ray Serve ingress, for `serve deploy` (see `policy-server ray-config`):
    the same app as `policy-server serve`, built inside the replica around the policy handle."""

    def __init__(self, settings: dict[str, Any], handles: dict[str, Any]) -> None:
        self._settings = Settings.model_validate(settings)
        self._handles = handles

    def __serve_build_asgi_app__(self) -> Any:
        from policy_server.server import build_app
        from policy_server.service import ModelCaller, local_caller
        from policy_server.settings import PolicySettings

        async def callers(version: PolicyVersion, metrics: Any) -> ModelCaller:
            handle = self._handles.get(f"{version.name}/{version.version}")
            if handle is None:  # a version that appeared after `serve deploy`: in-process
                return local_caller(version, PolicySettings.from_server(self._settings))
            return RayForward(handle, None, metrics.replica_observer(version.name))

        return build_app(self._settings, callers)


def application(args: dict[str, Any]) -> Any:
    """Ray Serve application builder: `import_path: policy_server.ray_backend:application`.
    One policy deployment per version found in the policy folders, behind one ingress."""
    from policy_server.repository import Scanner

    settings = Settings.model_validate(args)
    shared = _shared(settings)
    scan = Scanner(settings.policy_paths, settings.policy_name).scan()
    handles = {}
    for name, versions in scan.versions.items():
        for source in versions.values():
            options = deployment_options(settings) | {"name": f"policy-{name}-{source.version}"}
            folder = {
                "folder": str(source.folder.resolve()),
                "name": name,
                "version": source.version,
            }
            handles[f"{name}/{source.version}"] = PolicyDeployment.options(**options).bind(  # type: ignore[attr-defined]
                shared, folder
            )
    return ApiIngress.bind(shared, handles)  # type: ignore[attr-defined]


def serve_config(settings: Settings) -> dict[str, Any]:
    """A config file that `serve deploy` accepts, for a Ray cluster or KubeRay's RayService."""
    defaults = Settings.model_construct().model_dump(mode="json")
    skipped = {"api_key", "use_ray", "backend", "ray_address"}  # secrets, and this process's
    args = {
        name: value
        for name, value in settings.model_dump(mode="json", exclude=skipped).items()
        if value != defaults.get(name)
    }
    args["policy_path"] = str(settings.policy_path.resolve())
    if settings.extra_policy_paths:
        args["extra_policy_paths"] = [str(p.resolve()) for p in settings.extra_policy_paths]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [
            {
                "name": f"policy-{settings.resolved_policy_name}",
                "route_prefix": "/",
                "import_path": "policy_server.ray_backend:application",
                "args": args,
            }
        ],
    }
