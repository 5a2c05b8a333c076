"""Refuse request bodies over a size limit before they are read into memory.

FastAPI's own `max_body_size` answers an oversized Content-Length in plain text; this keeps
the one JSON error shape for every error the server returns.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policy_server.api.errors import error_response


class BodySizeLimit:
    """Pure ASGI middleware: checks Content-Length, then counts the bytes really streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"request body is larger than {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = error_response(413, "payload_too_large", self.message)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI re-raises HTTPException from body reading; our handler renders it.
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, limited, send)
