"""The Ray Serve backend: the same FastAPI app, with each model call sent to a Ray Serve
deployment. The deployment batches with Ray Serve's own `serve.batch`, using the in-process
batcher's maximum batch size and wait; sampling stays in the HTTP process, so that every
backend gives the same distribution.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.errors import BackendUnavailable, PolicyLoadError
from policy_server.registry import LoadedPolicy
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

    def __init__(self, settings: dict[str, Any]) -> None:
        from policy_server.loader import load_policy

        self._settings = Settings.model_validate(settings)
        self._runtime = load_policy(self._settings).runtime
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


def deploy(settings: Settings, policy: LoadedPolicy, on_replica: Any = None) -> RayForward:
    """Join the cluster at --ray-address (or start a local Ray) and run the deployment."""
    global _started_ray
    if not ray.is_initialized():
        address = settings.ray_address or None
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        _started_ray = address is None
    serve.start(proxy_location="Disabled")
    app = PolicyDeployment.options(**deployment_options(settings)).bind(  # type: ignore[attr-defined]
        settings.model_dump(mode="json", exclude={"api_key"})
    )
    application = f"policy-{policy.name}"
    handle = serve.run(app, name=application, route_prefix=None)
    logger.info("policy %s deployed on Ray Serve (%s)", policy.name, deployment_options(settings))
    return RayForward(handle, application, on_replica)


def shutdown(application: str) -> None:
    """Stop the local Ray instance this process started, with every process it owns; on a
    cluster we joined, remove only our application and leave Serve to the others."""
    global _started_ray
    if not ray.is_initialized():
        return
    if _started_ray:
        ray.shutdown()
        _started_ray = False
    else:
        serve.delete(application)


@serve.deployment(name="api")
@serve.ingress()
class ApiIngress:
    """The HTTP API as a Ray Serve ingress, for `serve deploy` (see `policy-server ray-config`):
    the same app as `policy-server serve`, built inside the replica around the policy handle."""

    def __init__(self, settings: dict[str, Any], policy: Any) -> None:
        self._settings = Settings.model_validate(settings)
        self._policy = policy

    def __serve_build_asgi_app__(self) -> Any:
        from policy_server.server import build_app

        def callers(registry: Any, metrics: Any) -> dict[tuple[str, str], RayForward]:
            return {
                (p.name, p.version): RayForward(
                    self._policy, None, metrics.replica_observer(p.name)
                )
                for p in registry
            }

        return build_app(self._settings, callers)


def application(args: dict[str, Any]) -> Any:
    """Ray Serve application builder: `import_path: policy_server.ray_backend:application`."""
    settings = Settings.model_validate(args)
    shared = settings.model_dump(mode="json", exclude={"api_key"})
    policy = PolicyDeployment.options(**deployment_options(settings)).bind(shared)  # type: ignore[attr-defined]
    return ApiIngress.bind(shared, policy)  # type: ignore[attr-defined]


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
