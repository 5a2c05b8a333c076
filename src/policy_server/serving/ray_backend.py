"""The Ray Serve backend: each policy version's model calls go to its own Ray Serve deployment.

The deployment batches with Ray Serve's own `serve.batch`, using the policy's maximum batch
size and wait; sampling stays in the HTTP process, so that every backend gives the same
distribution. `policy-server serve --backend ray` runs each ready version as its own Serve
application (`deploy_version`); `ray_app.py` builds the same deployments for `serve deploy`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.errors import BackendUnavailable, PolicyLoadError
from policy_server.extras import missing_extra
from policy_server.runtime.base import ModelOutputs, StepInputs
from policy_server.serving.registry import PolicyVersion
from policy_server.settings import PolicySettings, Settings

try:
    import ray
    from ray import serve
except ImportError as error:  # pragma: no cover - the message is the point
    raise missing_extra("ray", "the Ray backend", PolicyLoadError, cause=error) from None

logger = logging.getLogger(__name__)


@serve.deployment(name="policy")
class PolicyDeployment:
    """One replica: one policy version's runtime behind Ray Serve's batching."""

    def __init__(
        self, settings: dict[str, Any], source: dict[str, str], policy: dict[str, Any]
    ) -> None:
        from policy_server.loading.loader import load_folder

        server_settings = Settings.model_validate(settings)
        policy_settings = PolicySettings.model_validate(policy)
        self._runtime = load_folder(
            Path(source["folder"]),
            source["name"],
            source["version"],
            server_settings,
            policy_settings,
        ).runtime
        self.forward.set_max_batch_size(policy_settings.max_batch_size)
        wait = policy_settings.max_batch_wait_ms / 1000.0
        self.forward.set_batch_wait_timeout_s(wait)
        self._replica = serve.get_replica_context().replica_id.unique_id

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)  # type: ignore[untyped-decorator]
    async def forward(
        self, requests: list[tuple[npt.NDArray[np.float32], StepInputs | None]]
    ) -> list[tuple[Any, Any, Any, str]]:
        """Each request is its rows and, for a recurrent policy, what they feed besides:
        the state travels with the call, so any replica answers any episode's step."""
        parts = [rows for rows, _ in requests]
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        steps = [step for _, step in requests if step is not None]
        outputs = self._runtime.forward(rows, StepInputs.concatenate(steps) if steps else None)
        answers, start = [], 0
        for request, _ in requests:
            end = start + len(request)
            part = outputs.rows(start, end)
            answers.append((part.logits, part.value, part.state, self._replica))
            start = end
        return answers


def deployment_options(settings: Settings, policy: PolicySettings) -> dict[str, Any]:
    """Replicas: a fixed count, or Ray Serve's autoscaling between MIN and MAX."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.ray_replica_cpus},
        # Serve's default (5 in flight per replica) would keep serve.batch from ever filling
        # a batch: requests wait in the router instead, and throughput collapses under load.
        "max_ongoing_requests": max(2 * policy.max_batch_size, 32),
    }
    if settings.autoscale:
        low, high = (int(part) for part in settings.autoscale.split(":"))
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high}
    else:
        options["num_replicas"] = settings.replicas
    return options


def bind_version(
    settings: Settings,
    policy: PolicySettings,
    name: str,
    version: str,
    folder: Path,
    deployment: str = "policy",
) -> Any:
    """One version's deployment, bound to what its replicas load (a Serve `Application`)."""
    options = deployment_options(settings, policy) | {"name": deployment}
    source = {"folder": str(folder.resolve()), "name": name, "version": version}
    return PolicyDeployment.options(**options).bind(  # type: ignore[attr-defined]
        replica_settings(settings), source, policy.model_dump(mode="json")
    )


def replica_settings(settings: Settings) -> dict[str, Any]:
    """The settings a replica is built with: no secrets, which it never needs."""
    return settings.model_dump(mode="json", exclude={"api_key", "admin_key"})


class RayForward:
    """The service's forward pass for one version, answered by its Ray Serve deployment."""

    def __init__(self, handle: Any, application: str | None = None, on_replica: Any = None) -> None:
        self._handle = handle
        self._application = application
        self._on_replica = on_replica

    async def forward(
        self,
        rows: npt.NDArray[np.float32],
        step: StepInputs | None = None,
        timeout_s: float | None = None,
    ) -> ModelOutputs:
        try:
            async with asyncio.timeout(timeout_s):
                logits, value, state, replica = await self._handle.forward.remote((rows, step))
        except TimeoutError:
            raise
        except Exception as error:  # a replica died or is restarting: ask the client to retry
            logger.warning("Ray Serve request failed: %s", error)
            raise BackendUnavailable(
                "the model replica is unavailable; retry shortly", headers={"Retry-After": "1"}
            ) from None
        if self._on_replica is not None:
            self._on_replica(replica)
        return ModelOutputs(logits, value, state)

    async def close(self) -> None:
        if self._application is not None:  # only the process that deployed it removes it
            await asyncio.to_thread(shutdown, self._application)


_started_ray = False
_deployed: set[str] = set()


def serve_name(name: str, version: str) -> str:
    """What a version is called in Ray Serve: its application here, its deployment in the
    `serve deploy` application."""
    return f"policy-{name}-{version}"


async def deploy_version(
    settings: Settings,
    version: PolicyVersion,
    metrics: Any,
    policy: PolicySettings | None = None,
) -> RayForward:
    """Run one policy version as its own Ray Serve application (a local Ray, or the cluster
    at --ray-address); its caller removes it again when the version is unloaded. `policy`
    holds the policy's own settings (repository.yaml), the server's by default."""
    policy = policy or PolicySettings.from_server(settings)
    caller = await asyncio.to_thread(_deploy, settings, policy, version, metrics)
    _restore_sigterm_handler()
    return caller


def _restore_sigterm_handler() -> None:
    """`ray.init` gives SIGTERM to abseil's failure handler, which chains to ours but also
    aborts the process 3 s later (ray-project/ray#37288), before a graceful shutdown that
    removes several applications is done. Give SIGTERM back to the handler Python (uvicorn)
    installed; that is possible only from the main thread, where the event loop runs."""
    handler = signal.getsignal(signal.SIGTERM)
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _deploy(
    settings: Settings, policy: PolicySettings, version: PolicyVersion, metrics: Any
) -> RayForward:
    global _started_ray
    if not ray.is_initialized():
        address = settings.ray_address or None
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        _started_ray = address is None
        serve.start(proxy_location="Disabled")  # handles only: the HTTP API is ours
    app = bind_version(settings, policy, version.name, version.version, version.folder)
    name = serve_name(version.name, version.version)
    handle = serve.run(app, name=name, route_prefix=None)
    _deployed.add(name)
    logger.info("policy %s/%s deployed on Ray Serve as %s", version.name, version.version, name)
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
        logger.info("Ray Serve application %s removed", application)
