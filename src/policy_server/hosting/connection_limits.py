"""The HTTP connection's limits and time-outs, for uvicorn, and one write per response.

uvicorn times out idle keep-alive connections, but only after a first response: a connection
that never sends a request, or trickles one byte by byte, would be held forever. The protocol
here also closes a connection that stays idle from the start, one whose request (headers and
body) takes longer than the request time-out, and every connection beyond the cap. On
shutdown it finishes a request already being received instead of cutting it off.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from policy_server.settings import Settings


def _timeout_response() -> bytes:
    body = orjson.dumps(
        {
            "error": {
                "code": "request_timeout",
                "message": "the request was not received in time",
                "fields": [],
            }
        }
    )
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


TIMEOUT_RESPONSE = _timeout_response()
# How long an idle keep-alive connection stays open after SIGTERM, for a request already on
# its way; the server exits once every connection has closed (or the grace period ends).
SHUTDOWN_LINGER_S = 0.5


class OneWrite:
    """The transport as a response cycle sees it: the response's head is held back until its
    body's first bytes (or the end of a response without any), so that a small answer leaves
    in one write, one system call and one TCP segment, instead of two (uvicorn writes the head
    when the app sends `http.response.start`). An interim `100 Continue` goes out at once."""

    __slots__ = ("_head", "_headed", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._headed = False

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif not self._headed and data.startswith(b"HTTP/") and data[9:10] != b"1":
            self._head, self._headed = data, True
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class TimedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a time-out on receiving each request, an idle
    time-out from the connection's start and a cap on open connections."""

    def __init__(
        self, *args: Any, request_timeout_s: float, max_connections: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self._reading: asyncio.TimerHandle | None = None
        self._draining = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.abort()
            return
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_reading_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._start_reading_timer()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_reading_timer()

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not before:  # not an upgrade, which makes none
            # Its task has not run yet: the whole response goes through the holder, which
            # lets a response without body bytes (HEAD) go once it is complete.
            holder = OneWrite(self.transport)
            cycle.transport = holder  # type: ignore[assignment]
            completed = cycle.on_response

            def on_response() -> None:
                holder.flush()
                completed()

            cycle.on_response = on_response
            if self._draining:
                cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_reading_timer()

    def shutdown(self) -> None:
        self._draining = True
        if self._reading is None and (self.cycle is None or self.cycle.response_complete):
            # Idle between requests: a client may be sending its next one right now, and
            # closing under it would reset that request. Linger a moment: a request that
            # arrives is answered (with `connection: close`); then the connection closes.
            self.loop.call_later(SHUTDOWN_LINGER_S, self._close_if_idle)
            return
        # A request is being received or answered: answer it, then close.
        if self.cycle is not None:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        if self._reading is None and (self.cycle is None or self.cycle.response_complete):
            super().shutdown()

    def _start_reading_timer(self) -> None:
        if self._reading is None:
            self._reading = self.loop.call_later(self.request_timeout_s, self._too_slow)

    def _stop_reading_timer(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            self._reading = None

    def _too_slow(self) -> None:
        self._reading = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        answering = cycle is not None and not cycle.response_complete
        if answering and not cycle.more_body:
            # Its request is whole (the bytes were a next request's start): check again later.
            self._start_reading_timer()
            return
        if not answering:  # the headers are incomplete: no handler runs, say why
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` / `uvicorn.run` that apply the settings'
    connection limits, time-outs and shutdown grace period."""
    protocol = functools.partial(
        TimedProtocol,
        request_timeout_s=settings.request_timeout_s,
        max_connections=settings.max_connections,
    )
    return {
        "http": protocol,
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
    }
