"""Start-up: settings -> loaded policy -> registry -> FastAPI app -> uvicorn."""

from __future__ import annotations

import logging
import sys

from fastapi import FastAPI

from policy_server.api.app import create_app
from policy_server.errors import PolicyLoadError
from policy_server.loader import load_policy
from policy_server.registry import LoadedPolicy, PolicyRegistry
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


def build_app(settings: Settings) -> FastAPI:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    policy = load_policy(settings)
    registry = PolicyRegistry()
    registry.add(policy)
    return create_app(registry, settings, resolve_api_key(settings, policy))


def serve(settings: Settings) -> None:
    import uvicorn

    app = build_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


def app_from_environment() -> FastAPI:
    """The app for `uvicorn app:app`: the policy in BASE_PATH (default: the working folder).

    A policy that cannot be served stops the process with the reason, not a traceback.
    """
    try:
        return build_app(Settings())
    except PolicyLoadError as error:
        print(f"policy-server: cannot serve: {error}", file=sys.stderr)
        raise SystemExit(2) from None
