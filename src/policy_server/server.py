"""Start-up: settings -> loaded policy -> registry -> FastAPI app -> uvicorn."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Mapping

from fastapi import FastAPI

from policy_server.api.app import create_app
from policy_server.errors import PolicyLoadError
from policy_server.loader import load_policy
from policy_server.logs import configure_logging
from policy_server.metrics import Metrics
from policy_server.registry import LoadedPolicy, PolicyRegistry
from policy_server.service import ModelCaller, PolicyService, local_callers
from policy_server.settings import Settings


def resolve_api_key(settings: Settings, policy: LoadedPolicy) -> str | None:
    """The key clients must send: --api-key / environment first, then schema.yaml."""
    if settings.api_key is not None and settings.api_key.get_secret_value():
        return settings.api_key.get_secret_value()
    if policy.schema.parameters.api_key:
        return policy.schema.parameters.api_key
    if settings.no_auth:
        return None
    raise PolicyLoadError(
        "no API key configured: set parameters.api_key in schema.yaml, the environment "
        "variable POLICY_SERVER_API_KEY or --api-key, or serve without auth with --no-auth"
    )


CallerFactory = Callable[[PolicyRegistry, Metrics], Mapping[tuple[str, str], ModelCaller]]


def build_app(settings: Settings, callers: CallerFactory | None = None) -> FastAPI:
    """The whole server for `settings`; `callers` overrides how model calls are made (the
    Ray Serve ingress passes its deployment handle)."""
    configure_logging(settings.log_level)
    metrics = Metrics()
    started = time.perf_counter()
    policy = load_policy(settings)
    metrics.policy_loaded(
        policy.name, policy.version, policy.runtime.name, time.perf_counter() - started
    )
    registry = PolicyRegistry()
    registry.add(policy)
    api_key = resolve_api_key(settings, policy)
    make_callers = callers or (lambda r, m: _model_callers(r, settings, m))
    service = PolicyService(registry, make_callers(registry, metrics), metrics)
    app = create_app(service, settings, api_key, metrics)
    # Everything loaded so far lives as long as the process: keep the cyclic garbage
    # collector from walking it again and again, which shows up as tail latency.
    gc.collect()
    gc.freeze()
    return app


def _model_callers(
    registry: PolicyRegistry, settings: Settings, metrics: Metrics
) -> dict[tuple[str, str], ModelCaller]:
    if settings.resolved_backend != "ray":
        return local_callers(registry, settings, metrics)
    from policy_server.ray_backend import deploy

    return {
        (policy.name, policy.version): deploy(
            settings, policy, metrics.replica_observer(policy.name)
        )
        for policy in registry
    }


def serve(settings: Settings) -> None:
    import uvicorn

    app = build_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
    )


def app_from_environment() -> FastAPI:
    """The app for `uvicorn app:app`: the policy in BASE_PATH (default: the working folder).

    A policy that cannot be served stops the process with the reason, not a traceback.
    """
    try:
        return build_app(Settings())
    except PolicyLoadError as error:
        print(f"policy-server: cannot serve: {error}", file=sys.stderr)
        raise SystemExit(2) from None
