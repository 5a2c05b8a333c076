"""Routes that answer by themselves: what every protocol's data-plane routes are."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]


class DirectRoute(APIRoute):
    """A route whose request handling is ours; FastAPI describes it from `endpoint` (its
    parameters, body and responses in the OpenAPI document) but never calls it.

    It answers without FastAPI's per-request wrapping (two exit stacks for dependencies that
    never run here, and a second exception wrapper). `direct`: the front middleware may
    answer a POST to it without the router, and renders its errors with the app's handlers,
    as FastAPI's exception middleware would."""

    direct = True
    protocol = "rest"  # the `protocol` label of its metrics and log lines

    def __init__(self, path: str, endpoint: Callable[..., Any], handler: Handler, **kw: Any):
        self._handler = handler
        super().__init__(path, endpoint, **kw)
        self.app = self._answer
        # The router tries every route in turn, and most are some other policy's or
        # operation's: a string test turns those away before the regular expression.
        self._exact = "{" not in path
        self._prefix = path.split("{", 1)[0]

    def get_route_handler(self) -> Handler:  # type: ignore[override]
        return self._handler

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # Under a root_path, Starlette's own matching (which strips it) decides.
        if scope["type"] == "http" and not scope.get("root_path"):
            path = scope["path"]
            if path != self.path if self._exact else not path.startswith(self._prefix):
                return Match.NONE, {}
        return super().matches(scope)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._handler(Request(scope, receive, send))
        await response(scope, receive, send)


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), read from the scope as it came."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def read_body(receive: Receive) -> bytes:
    """The request's whole body, as `Request.body()` reads it, without its stream machinery
    (most bodies come in one message)."""
    message = await receive()
    if message["type"] != "http.request":
        raise ClientDisconnect()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
