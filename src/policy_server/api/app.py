"""Build the FastAPI application around a registry of loaded policies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from policy_server import __version__
from policy_server.api.auth import require_api_key
from policy_server.api.clients import add_client_routes
from policy_server.api.errors import install_error_handlers
from policy_server.api.limits import BodySizeLimit
from policy_server.api.observability import RequestObserver
from policy_server.api.routes import FastJSONRoute, add_policy_routes
from policy_server.clients import ClientBuilder
from policy_server.metrics import Metrics
from policy_server.service import PolicyService
from policy_server.settings import Settings

_DESCRIPTION = """\
Serves the reinforcement-learning policy **{name}** (version `{version}`, {runtime} runtime).

`/predict` takes a typed observation and samples the policy's action; `/predict_raw` takes the
raw input vector; `/predict_deterministic` and `/distribution` give the most likely action and
the exact action probabilities. Send the API key as header `access-token`.
"""


def create_app(
    service: PolicyService, settings: Settings, api_key: str | None, metrics: Metrics
) -> FastAPI:
    """The HTTP API; `api_key` None means no authentication (only with `--no-auth`)."""
    registry = service.registry
    default = registry.get()

    builder = ClientBuilder(
        lambda: app.openapi(), settings.cache_dir, settings.languages, settings.java
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.metrics_port:
            metrics.serve(settings.host, settings.metrics_port)
        if builder.languages:
            builder.start()
        yield
        await service.close()

    app = FastAPI(
        lifespan=lifespan,
        title=f"Policy server: {default.name}",
        version=__version__,
        description=_DESCRIPTION.format(
            name=default.name, version=default.version, runtime=default.runtime.name
        ),
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestObserver, metrics=metrics, policy=default.name)
    dependencies = [Depends(require_api_key(api_key))] if api_key is not None else []
    app.router.route_class = FastJSONRoute
    for policy in registry:
        add_policy_routes(
            app.router, service, policy, settings.max_batch_observations, dependencies
        )

    if builder.languages:
        add_client_routes(app.router, builder, dependencies)

    @app.get("/", operation_id="health", tags=["health"], summary='Liveness: answers "ok"')
    async def health() -> str:
        return "ok"

    return app
