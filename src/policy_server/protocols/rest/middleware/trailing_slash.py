"""Paths with a trailing slash answered as the path without it."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class StripTrailingSlash:
    """`/predict/` is `/predict`, answered directly as the original server did, never by a
    redirect (whose address would be built from the request's Host header)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
        await self.app(scope, receive, send)
