"""Start-up: settings -> policy folders -> registry and manager -> FastAPI app -> uvicorn."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from policy_server.experience.log import DecisionLog
from policy_server.hosting.startup import (
    warn_demo_key,
)
from policy_server.metrics import Metrics
from policy_server.protocols.auth import KeyRing
from policy_server.protocols.rest.app import Service, create_app
from policy_server.protocols.v2.dataplane import DataPlane
from policy_server.protocols.v2.routes import v2_routes
from policy_server.serving.episodes import EpisodeStore, LocalEpisodes
from policy_server.serving.lifecycle import PolicyManager
from policy_server.serving.observers import ActionMetrics, DecisionLogger
from policy_server.serving.registry import PolicyRegistry, PolicyVersion
from policy_server.serving.rollout.controller import RolloutController
from policy_server.serving.service import ModelCaller, Observer, PolicyService, local_caller
from policy_server.serving.shadow import ShadowScorer
from policy_server.settings import Settings

CallerHook = Callable[[PolicyVersion, Metrics], Awaitable[ModelCaller]]
ManagerFactory = Callable[[Settings, PolicyRegistry, Metrics], PolicyManager]


def build_app(
    settings: Settings,
    callers: CallerHook | None = None,
    *,
    worker: str = "0",
    managers: ManagerFactory = PolicyManager,
    episodes: EpisodeStore | None = None,
    grpc: bool = False,
    worker_header: bool = False,
) -> FastAPI:
    """The whole server for `settings`; `callers` overrides how model calls are made (the
    Ray Serve ingress passes its deployment handle). A worker of `serve --workers N` passes
    its name (its decision-log stream), a manager that follows the other workers, and the
    episode store all workers share. `grpc`: serve the gRPC port of the settings too (the
    `serve` command does; an app imported by uvicorn or Ray Serve does not). `worker_header`:
    name the worker in the header `policy-server-worker` of every answer."""
    metrics = Metrics()
    registry = PolicyRegistry()
    manager = managers(settings, registry, metrics)
    manager.load_initial()
    shadow = ShadowScorer(registry, metrics, settings.shadow_queue)
    observers: list[Observer] = [ActionMetrics(metrics), shadow]
    log = _decision_log(settings, metrics, worker)
    closing = [shadow.close]
    if log is not None:
        logger = DecisionLogger(log, worker, registry)
        observers.append(logger)
        shadow.sinks.append(logger.shadow_answer)
        closing.append(log.close)  # after the shadow thread, which writes to it
    store = episodes
    if store is None:
        store = LocalEpisodes(
            settings.max_episodes, settings.episode_idle_s, state_secret(settings)
        )
    closing.append(store.close)
    rollouts = RolloutController(registry, manager, settings, metrics, log)
    observers.append(rollouts)
    closing.append(rollouts.close)  # after the log, whose last records it still counts
    service = PolicyService(registry, observers, store)
    service.failures.append(rollouts.failed)
    _install_hooks(settings, registry, service, metrics, callers)
    keys = KeyRing(
        settings.api_keys, settings.secret("admin_key"), settings.no_auth, settings.api_key_file
    )
    warn_demo_key(settings, registry, keys)
    plane = DataPlane(service, keys, log)
    services = [_grpc_server(settings, plane, metrics)] if grpc and settings.grpc_port else []
    app = create_app(
        service,
        manager,
        settings,
        keys,
        metrics,
        log,
        closing,
        rollouts,
        routes=v2_routes(plane),
        services=services,
        worker=worker if worker_header else None,
    )
    freeze_garbage()
    return app


def state_secret(settings: Settings) -> bytes | None:
    secret = settings.secret("state_secret")
    return None if secret is None else secret.encode()


def _decision_log(settings: Settings, metrics: Metrics, worker: str) -> DecisionLog | None:
    if settings.decision_log is None:
        return None
    return DecisionLog(
        settings.decision_log,
        worker=worker,
        sync=settings.decision_log_sync,
        max_queue=settings.decision_log_queue,
        rotate_bytes=int(settings.decision_log_rotate_mb * 1024 * 1024),
        rotate_seconds=settings.decision_log_rotate_s,
        registry=metrics.registry,
    )


def _grpc_server(settings: Settings, plane: DataPlane, metrics: Metrics) -> Service:
    from policy_server.protocols.grpc.service import GrpcServer

    return GrpcServer(
        plane,
        metrics,
        settings.host,
        settings.grpc_port,
        shared_port=settings.resolved_workers > 1,
        max_message_bytes=settings.max_body_bytes,
        grace_s=settings.graceful_shutdown_s,
    )


def freeze_garbage() -> None:
    """Everything loaded so far lives until a reload replaces it: keep the cyclic garbage
    collector from walking it again and again, which shows up as tail latency. Reloads
    unfreeze first, so that replaced versions can be collected."""
    gc.collect()
    gc.freeze()


def _install_hooks(
    settings: Settings,
    registry: PolicyRegistry,
    service: PolicyService,
    metrics: Metrics,
    callers: CallerHook | None,
) -> None:
    async def attach(version: PolicyVersion) -> None:
        if callers is not None:
            version.caller = await callers(version, metrics)
        elif settings.resolved_backend == "ray":
            from policy_server.serving.ray_backend import deploy_version

            entry = registry.entry(version.name)
            version.caller = await deploy_version(settings, version, metrics, entry.settings)
        else:
            entry = registry.entry(version.name)
            observer = metrics.batch_observer(version.name, version.version)
            version.caller = local_caller(version, entry.settings, observer)

    async def detach(version: PolicyVersion) -> None:
        if version.caller is not None:
            await version.caller.close()
        metrics.policy_unloaded(version.name, version.version)
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    registry.on_ready.append(attach)
    registry.on_unload.append(detach)
    service.attach = attach
