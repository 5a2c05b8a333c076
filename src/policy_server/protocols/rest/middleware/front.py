"""The one ASGI layer of ours in front of every HTTP request, and the prediction routes'
way past the rest of the stack.

Every request: a trailing slash is dropped (`/predict/` is `/predict`, answered directly as
the original server did, never by a redirect built from the Host header); it gets a request
id (the client's `x-request-id`, else a cheap unique one) sent back as `x-request-id`; it is
counted in flight, then in the request metrics and the access log with its route template
(only the path is logged, never the query string or headers, so an API key sent as
`?access-token=` or as a header never reaches the logs); a HEAD runs the GET route and sends
its status and headers but no body (RFC 9110, 9.3.2); the worker that answered is named in
`policy-server-worker` under `serve --workers`; and its body is refused when larger than the
limit or in an encoding the server does not read.

The body refusal is raised when the handler first reads the body, never earlier: every route
checks the API key before it reads its body, so a client without a key learns nothing but 403.
FastAPI's own `max_body_size` answers an oversized Content-Length in plain text; this keeps the
one JSON error shape for every error.

A POST to a prediction route (the native routes and the Open Inference Protocol's infer) is
then answered here: the route table built with the routes finds its route in one dictionary
lookup, and the route's own handler runs, its errors rendered by the app's exception handlers
exactly as Starlette's server-error layer and FastAPI's exception middleware would (an
unexpected error is answered 500 and raised to the server, which logs it). Every other request
goes through the rest of the stack (Starlette's and FastAPI's own middlewares, CORS, the
router). The front is called by the app itself (`PolicyApp.__call__`), ahead of Starlette's
stack: one layer of ours instead of nine is what uvicorn's and Starlette's authors advise for
a cheap request, since each ASGI layer is a Python call in and out, and a closure over `send`,
for every request.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policy_server.logs import access_log, log_request
from policy_server.metrics import Metrics

# Bodies are read as they come; a compressed body would be a decompression bomb waiting
# for a limit of its own, and policy observations are small.
IDENTITY = (b"", b"identity")

# Request ids: 16 random hex digits per process, then a counter. Unique without a system
# call per request (uuid4 reads os.urandom every time); ids need not be unguessable.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def _new_id_prefix() -> None:
    """A forked worker gets a prefix of its own."""
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_id_prefix)


class FastRoutes:
    """The routes a POST may be answered by without the router: those that answer by
    themselves (`direct = True`: no FastAPI dependencies, a handler of ours), found by path.

    The router takes the first route that fully matches, in order; the table keeps that
    order. A route without `{` in its path is found in a dictionary, when no route before it
    takes its path; the others are tried in turn with every route that could take a POST
    before them, and answered here only when the first to match is a direct one."""

    def __init__(self) -> None:
        self.exact: dict[str, BaseRoute] = {}
        self.templated: list[BaseRoute] = []
        self.router: Any = None

    def build(self, routes: Sequence[BaseRoute], router: Any = None) -> None:
        exact: dict[str, BaseRoute] = {}
        ordered: list[BaseRoute] = []  # every route that could take a POST, in order
        last = 0  # how many of them the templated direct routes need
        for route in routes:
            methods = getattr(route, "methods", None)
            if methods is not None and "POST" not in methods:
                continue
            path = getattr(route, "path", "")
            direct = getattr(route, "direct", False)
            if (
                direct
                and "{" not in path
                and path not in exact
                and not any(_takes(r, path) for r in ordered)
            ):
                exact[path] = route
            ordered.append(route)
            if direct and "{" in path:
                last = len(ordered)
        self.exact, self.templated, self.router = exact, ordered[:last], router

    def find(self, scope: Scope) -> BaseRoute | None:
        """The direct route that takes this POST (its path parameters put in `scope`), or
        None: the router decides."""
        route = self.exact.get(scope["path"])
        if route is not None:
            scope["endpoint"], scope["route"], scope["path_params"] = route.endpoint, route, {}  # type: ignore[attr-defined]
            return route
        for route in self.templated:
            match, child = route.matches(scope)
            if match is Match.FULL:
                if not getattr(route, "direct", False):
                    return None
                scope.update(child)
                scope["route"] = route
                return route
        return None


def _takes(route: BaseRoute, path: str) -> bool:
    probe = {"type": "http", "path": path, "method": "POST", "root_path": "", "headers": []}
    return route.matches(probe)[0] is Match.FULL


class Front:
    """See the module's docstring. `routes` is filled (and refilled at every reload) by the
    app; `handlers` is the app's exception handlers (the same dictionary, read per error)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_bytes: int,
        routes: FastRoutes,
        handlers: Mapping[Any, Callable[..., Any]],
        worker: str | None = None,
        cors: bool = False,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.too_large = f"request body is larger than {max_bytes} bytes"
        self.routes = routes
        self.handlers = handlers
        self.worker = [(b"policy-server-worker", worker.encode())] if worker else []
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"]
        path = scope["path"]
        if len(path) > 1 and path[-1] == "/":
            scope = dict(scope, path=path.rstrip("/") or "/")
        head = method == "HEAD"
        if head:
            scope = dict(scope, method="GET")
        request_id = length = None
        encoding = b""
        origin = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"x-request-id":
                if 0 < len(value) <= 128 and value.isascii():
                    request_id = bytes(value)
            elif name == b"content-encoding":
                encoding = value.strip().lower()
            elif name == b"origin":
                origin = True
        if request_id is None:
            request_id = f"{_ID_PREFIX}{next(_ID_COUNTER):016x}".encode()
        extra = [(b"x-request-id", request_id), *self.worker]
        status = 500
        sent = False

        async def observed_send(message: Message) -> None:
            nonlocal status, sent
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                sent = True
                message["headers"] = [*message.get("headers", []), *extra]
            elif head and kind == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        refusal = self._refusal(encoding, length)
        received = 0

        async def limited() -> Message:
            nonlocal received
            if refusal is not None:
                # FastAPI re-raises HTTPException from body reading; our handler renders it.
                raise refusal
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.too_large, {"connection": "close"})
            return message

        in_flight = self.metrics.requests_in_flight
        in_flight.inc()
        try:
            route = None
            if method == "POST" and not scope.get("root_path") and not (self.cors and origin):
                route = self.routes.find(scope)
            if route is None:
                await self.app(scope, limited, observed_send)
            else:
                if "router" not in scope:
                    scope["router"] = self.routes.router
                try:
                    await route.app(scope, limited, observed_send)  # type: ignore[attr-defined]
                except Exception as error:
                    if sent:
                        raise RuntimeError("an error after the response started") from error
                    handler, expected = self._handler(error)
                    if handler is not None:
                        await self._render(handler, error, scope, limited, observed_send)
                    if not expected:
                        # As Starlette's server-error layer: answered 500, and raised to
                        # the server, which logs it.
                        raise
        finally:
            in_flight.dec()
            self._record(scope, method, status, time.perf_counter() - started, request_id)

    def _refusal(self, encoding: bytes, length: bytes | None) -> HTTPException | None:
        if encoding not in IDENTITY:
            return HTTPException(
                415,
                f"Content-Encoding {encoding.decode('latin-1')!r} is not accepted: send "
                "the body uncompressed",
            )
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return HTTPException(413, self.too_large, {"connection": "close"})
        return None

    def _handler(self, error: Exception) -> tuple[Callable[..., Any] | None, bool]:
        """The handler Starlette's layers would choose, and whether the error is an expected
        one: FastAPI's exception middleware's choice (by status code for an HTTPException,
        else by class) or, for any other error, the server-error layer's (the handler of
        500 or `Exception`)."""
        handlers = self.handlers
        if isinstance(error, HTTPException) and error.status_code in handlers:
            return handlers[error.status_code], True
        for kind in type(error).__mro__:
            if kind is Exception:
                break
            if kind in handlers:
                return handlers[kind], True
        return handlers.get(500) or handlers.get(Exception), False

    @staticmethod
    async def _render(
        handler: Callable[..., Any], error: Exception, scope: Scope, receive: Receive, send: Send
    ) -> None:
        request = Request(scope, receive, send)
        if _is_async(handler):
            response = await handler(request, error)
        else:
            response = await run_in_threadpool(handler, request, error)
        if response is not None:
            await response(scope, receive, send)

    def _record(
        self, scope: Scope, method: str, status: int, seconds: float, request_id: bytes
    ) -> None:
        # The router (or the route table) writes the matched route into the scope; unmatched
        # paths share one label so that scanning for URLs cannot explode the metric's
        # cardinality.
        route = scope.get("route")
        template = getattr(route, "path", "unmatched")
        # Routes of another protocol than the native one say so (the V2 routes).
        protocol = getattr(route, "protocol", "rest")
        # The handler names the policy and version that answered, when one did.
        answered = scope.get("policy_server.answered", ("", ""))
        self.metrics.count_request(template, method, str(status), protocol, answered, seconds)
        if access_log.isEnabledFor(logging.INFO):
            log_request(
                request_id.decode("ascii", "replace"),
                method,
                template,
                scope["path"],
                status,
                protocol,
                answered,
                seconds,
            )


def _is_async(handler: Callable[..., Any]) -> bool:
    call = type(handler).__call__ if not inspect.isfunction(handler) else handler
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)
