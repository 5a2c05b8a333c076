"""An ASGI app that builds the real one on first use.

The original's test suite imports `app` before it copies the policy into the working folder,
then runs the app with and without its lifespan, twice; so `app.py` may have to wait for the
policy until the app is first started or called.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from policy_server.errors import PolicyLoadError


class LazyApp:
    """Builds its app with `build` at the first lifespan start or request, then hands every
    scope to it; a failed build is retried at the next one."""

    def __init__(self, build: Callable[[], ASGIApp]) -> None:
        self._build = build
        self._app: ASGIApp | None = None
        self._lock = threading.Lock()

    def load(self) -> ASGIApp:
        # A test client without lifespan calls from several threads: build only once.
        with self._lock:
            if self._app is None:
                self._app = self._build()
            return self._app

    def load_or_exit(self) -> None:
        """Build now; a policy that cannot be served stops the process with the reason."""
        try:
            self.load()
        except PolicyLoadError as error:
            print(cannot_serve(error), file=sys.stderr)
            raise SystemExit(2) from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self._app is None:
            try:
                await self._load_off_the_loop()
            except PolicyLoadError as error:
                print(cannot_serve(error), file=sys.stderr)
                await receive()  # lifespan.startup
                await send({"type": "lifespan.startup.failed", "message": ""})
                raise
        # Without a lifespan (a test client used bare) the first request builds the app.
        app = self._app or await self._load_off_the_loop()
        await app(scope, receive, send)

    async def _load_off_the_loop(self) -> ASGIApp:
        # In a thread, as `policy-server serve` builds its app before any event loop runs,
        # and so that requests already in flight keep being answered.
        return await anyio.to_thread.run_sync(self.load)


def cannot_serve(error: PolicyLoadError) -> str:
    return f"policy-server: cannot serve: {error}"
