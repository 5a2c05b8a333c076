"""Build the FastAPI application around the registry of policies.

The prediction routes are generated from the policies being served and rebuilt whenever
that set or a policy's schema changes (a reload), with the OpenAPI document rebuilt too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Protocol

from fastapi import Depends, FastAPI, Security
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from policy_server import __version__
from policy_server.experience.log import DecisionLog, DecisionLogClosed
from policy_server.metrics import Metrics
from policy_server.protocols.auth import KeyRing, header_scheme
from policy_server.protocols.rest.docs import install_docs
from policy_server.protocols.rest.errors import error_response, install_error_handlers
from policy_server.protocols.rest.middleware.front import FastRoutes, Front
from policy_server.protocols.rest.openapi import install_number_formats
from policy_server.protocols.rest.operations import Context, build_routes, routes_shape
from policy_server.protocols.rest.policies import add_policy_routes
from policy_server.protocols.rest.rewards import add_experience_routes
from policy_server.protocols.rest.sdk_routes import add_client_routes
from policy_server.protocols.rest.sdks import ClientBuilder
from policy_server.serving.lifecycle import PolicyManager
from policy_server.serving.rollout.controller import RolloutController
from policy_server.serving.service import PolicyService
from policy_server.settings import Settings

_DESCRIPTION = """\
Serves the reinforcement-learning policies {names}; the top-level routes serve the default
policy, **{default}**.

`/predict` takes a typed observation and samples the policy's action; `/predict_raw` takes the
raw input vector; `/predict_deterministic` and `/distribution` give the most likely action and
the exact action probabilities. Every policy's routes also stand under `/policies/{{name}}/`, and
under `/policies/{{name}}/versions/{{version}}/` to pin a version. The `/step` routes take a
`Step`: the observation with its episode and action mask,
`{{"observation": <observation>, "episode_id": "...", "step": 3, "action_mask": [[true, false]]}}`
(the other routes take that envelope too). Send the API key as header `access-token`.
"""


async def _log_unavailable(_: Request, error: Exception) -> Response:
    return error_response(503, "decision_log_unavailable", f"the decision log failed: {error}")


class Service(Protocol):
    """A server beside the HTTP one, started and stopped with the app (the gRPC port)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class PolicyApp(FastAPI):
    """The FastAPI app with our front layer ahead of Starlette's own stack (its error,
    exception and body-limit middlewares and the router): every request meets the front
    first, and a prediction is answered there without the rest (see `Front`)."""

    front: Front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self  # as Starlette does: `request.app` in every handler
        await self.front(scope, receive, send)


def create_app(
    service: PolicyService,
    manager: PolicyManager,
    settings: Settings,
    keys: KeyRing,
    metrics: Metrics,
    log: DecisionLog | None = None,
    closing: list[Callable[[], None]] | None = None,
    rollouts: RolloutController | None = None,
    routes: Sequence[BaseRoute] = (),
    services: Sequence[Service] = (),
    worker: str | None = None,
) -> FastAPI:
    """The app; `worker`: the name sent in `policy-server-worker` (under `serve --workers`)."""
    registry = service.registry
    builder = ClientBuilder(
        lambda: app.openapi(),
        settings.cache_dir,
        settings.languages,
        settings.java,
        wait_s=settings.clients_wait_s,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.metrics_port:
            metrics.serve(settings.host, settings.metrics_port)
        await manager.start()
        if rollouts is not None:
            await rollouts.start()
        for server in services:
            await server.start()
        if builder.languages:
            builder.start()
        try:
            yield
        finally:
            for server in services:
                await server.stop()
            await manager.close()
            for close in closing or []:
                close()
            metrics.stop_serving()

    names = ", ".join(f"**{e.name}**" for e in registry.entries())
    app = PolicyApp(
        lifespan=lifespan,
        title="Policy server" + (f": {registry.default_name}" if registry.default_name else ""),
        version=__version__,
        description=_DESCRIPTION.format(names=names, default=registry.default_name),
        docs_url=None,
        redoc_url=None,
    )
    # What an embedding program or an in-process test reaches the server's state through.
    app.state.service, app.state.manager = service, manager
    install_docs(app)
    install_number_formats(app)
    app.router.redirect_slashes = False
    install_error_handlers(app)
    cors = bool(settings.cors_origin_list)
    if cors:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "HEAD", "POST", "PUT"],
            allow_headers=["access-token", "content-type"],
        )
    # In front of everything (see its module); the prediction routes answer from there.
    fast = FastRoutes()
    app.front = Front(
        partial(FastAPI.__call__, app),
        metrics=metrics,
        max_bytes=settings.max_body_bytes,
        routes=fast,
        handlers=app.exception_handlers,
        worker=worker,
        cors=cors,
    )

    @app.get("/", operation_id="health", tags=["health"], summary='Liveness: answers "ok"')
    async def health() -> str:
        return "ok"

    add_policy_routes(app.router, registry, manager, keys, rollouts)
    add_experience_routes(app.router, registry, service, keys, log)
    app.router.routes.extend(routes)  # the other protocols' routes (the V2 routes)
    if log is not None:
        app.add_exception_handler(DecisionLogClosed, _log_unavailable)
    if builder.languages:

        async def any_policy_key(request: Request) -> None:
            keys.check_any(request, registry.entries())

        add_client_routes(app.router, builder, [Depends(any_policy_key), Security(header_scheme)])
    fixed: list[BaseRoute] = list(app.router.routes)
    context = Context(service, keys, settings.max_body_bytes)

    installed: list[object] = []

    def install_routes() -> None:
        """Rebuild the policy routes, only when what they describe changed: a poll that
        found nothing new must not build (and leave to the collector) a new set."""
        shape = routes_shape(registry)
        if installed == [shape]:
            return
        installed[:] = [shape]
        app.router.routes = [*fixed, *build_routes(context)]
        fast.build(app.router.routes, app.router)
        app.openapi_schema = None

    install_routes()
    manager.on_change.append(install_routes)
    return app
