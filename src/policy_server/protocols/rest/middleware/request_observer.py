"""Per-request metrics and one structured (JSON) log line per request.

Only the path is logged, never the query string or headers, so an API key sent as
`?access-token=` or as a header never reaches the logs.
"""

from __future__ import annotations

import itertools
import logging
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policy_server.logs import access_log, log_request
from policy_server.metrics import Metrics

# Request ids: 16 random hex digits per process, then a counter. Unique without a system
# call per request (uuid4 reads os.urandom every time); ids need not be unguessable.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def _new_id_prefix() -> None:
    """A forked worker gets a prefix of its own."""
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_id_prefix)


class RequestObserver:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        in_flight = self.metrics.requests_in_flight
        in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            in_flight.dec()
            self._record(scope, status, time.perf_counter() - started, request_id)

    def _record(self, scope: Scope, status: int, seconds: float, request_id: bytes) -> None:
        # The router writes the matched route into the shared scope; unmatched paths share
        # one label so that scanning for URLs cannot explode the metric's cardinality.
        route = scope.get("route")
        template = getattr(route, "path", "unmatched")
        # Routes of another protocol than the native one say so (the V2 routes).
        protocol = getattr(route, "protocol", "rest")
        # The handler names the policy and version that answered, when one did.
        answered = scope.get("policy_server.answered", ("", ""))
        self.metrics.count_request(
            template, scope["method"], str(status), protocol, answered, seconds
        )
        if access_log.isEnabledFor(logging.INFO):
            log_request(
                request_id.decode("ascii", "replace"),
                scope["method"],
                template,
                scope["path"],
                status,
                protocol,
                answered,
                seconds,
            )


def _request_id(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and 0 < len(value) <= 128 and value.isascii():
            return bytes(value)
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}".encode()
