"""Refuse request bodies over a size limit, or in an encoding the server does not read,
before they are read into memory.

The refusal is raised when the handler first reads the body, never earlier: every route
checks the API key before it reads its body, so a client without a key learns nothing but
403 (not the size limit, nor whether its body would have been read). FastAPI's own
`max_body_size` answers an oversized Content-Length in plain text; this keeps the one JSON
error shape for every error the server returns.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Bodies are read as they come; a compressed body would be a decompression bomb waiting
# for a limit of its own, and policy observations are small.
IDENTITY = (b"", b"identity")


class BodySizeLimit:
    """Pure ASGI middleware: checks Content-Length and Content-Encoding, then counts the
    bytes really streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"request body is larger than {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        received = 0

        async def limited() -> Message:
            nonlocal received
            if refusal is not None:
                # FastAPI re-raises HTTPException from body reading; our handler renders it.
                raise refusal
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.message, {"connection": "close"})
            return message

        await self.app(scope, limited, send)

    def _refusal(self, scope: Scope) -> HTTPException | None:
        headers = dict(scope["headers"])
        encoding = headers.get(b"content-encoding", b"").strip().lower()
        if encoding not in IDENTITY:
            return HTTPException(
                415,
                f"Content-Encoding {encoding.decode('latin-1')!r} is not accepted: send "
                "the body uncompressed",
            )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return HTTPException(413, self.message, {"connection": "close"})
        return None
