"""The header that names the worker which answered a request."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class WorkerHeader:
    """Names the worker that answered in the header `policy-server-worker`: how requests
    spread over the workers, and which one to look at in the logs."""

    def __init__(self, app: ASGIApp, worker: str) -> None:
        self.app = app
        self.header = (b"policy-server-worker", worker.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, named)
