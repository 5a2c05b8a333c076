"""API keys: which keys open which policy, checked in the route handlers themselves, before
any request body is read.

The server's keys (`--api-key`, several comma-separated, and the lines of `--api-key-file`,
re-read when the file changes) open every policy; without `--api-key` or a key file, each
policy is opened by the `api_key` of its own schema.yaml. Clients send the key as header
`access-token`; a cookie or a query parameter of the same name is accepted as the original
server did, but only the header is published, since query strings end up in proxy logs.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from policy_server.errors import KeyMissing, NotAuthenticated
from policy_server.serving.registry import PolicyEntry

TOKEN_NAME = "access-token"
logger = logging.getLogger(__name__)

# Declared on the routes for the OpenAPI document only; the handlers check the key.
header_scheme = APIKeyHeader(
    name=TOKEN_NAME,
    auto_error=False,
    scheme_name="APIKeyHeader",
    description="The API key: the server's, or the policy's own from its schema.yaml.",
)


_TOKEN_HEADER = TOKEN_NAME.encode()


def supplied_key(connection: HTTPConnection) -> str | None:
    key = _header_key(connection.scope["headers"]) or connection.cookies.get(TOKEN_NAME)
    if key:
        return key
    key = connection.query_params.get(TOKEN_NAME)
    if key and not KeyRing.warned_query:
        KeyRing.warned_query = True
        logger.warning(
            "a client sent its API key in the query string, where proxies log it; "
            "send it as header 'access-token'"
        )
    return key or None


def _header_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The header's first value, as Starlette's `Headers.get` gives it, from the raw list."""
    for name, value in headers:
        if name == _TOKEN_HEADER:
            return value.decode("latin-1")
    return None


def _matches(supplied: bytes, keys: tuple[bytes, ...]) -> bool:
    found = False
    for key in keys:  # compare with every key, so the time says nothing of which matched
        found |= hmac.compare_digest(supplied, key)
    return found


class KeyFile:
    """The keys of a file, one a line, read again whenever the file changes; a file that
    cannot be read keeps the keys last read (a rotation should replace it atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._settled = False
        self.keys: tuple[bytes, ...] = ()
        self.current()

    def current(self) -> tuple[bytes, ...]:
        try:
            stat = os.stat(self.path)
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if seen != self._seen or not self._settled:
                # A file rewritten in place within its timestamps' granularity keeps its
                # (inode, mtime, size): it is read on every check until its mtime is older.
                self._settled = time.time_ns() - stat.st_mtime_ns > _SETTLE_NS
                self.keys = _key_lines(self.path.read_text(encoding="utf-8"))
                if seen != self._seen:
                    logger.info("read %d API key(s) from %s", len(self.keys), self.path)
                self._seen = seen
        except (OSError, UnicodeDecodeError) as error:
            if self._seen != _UNREADABLE:
                self._seen = _UNREADABLE
                logger.error(
                    "cannot read the API key file %s (%s): its keys stay", self.path, error
                )
        return self.keys


_UNREADABLE = (-1, -1, -1)
_SETTLE_NS = 2_000_000_000  # coarser than any file system's mtime (FAT's is 2 s)


def _key_lines(text: str) -> tuple[bytes, ...]:
    lines = (line.strip() for line in text.splitlines())
    return tuple(line.encode() for line in lines if line and not line.startswith("#"))


def _check(keys: tuple[bytes, ...], key: str | None) -> None:
    if key is None:
        raise KeyMissing(f"missing API key: send it as header '{TOKEN_NAME}'")
    if not _matches(key.encode(), keys):
        raise NotAuthenticated("wrong API key")


class KeyRing:
    """Which keys open which policy: the server's keys (`--api-key`, a key file re-read when
    it changes) open every policy; without them each policy takes its schema's `api_key`;
    the admin key opens the admin routes. Keys are compared in constant time and never
    logged."""

    warned_query = False

    def __init__(
        self,
        server_keys: list[str],
        admin_key: str | None,
        no_auth: bool,
        key_file: Path | None = None,
    ) -> None:
        self._static_keys = tuple(k.encode() for k in server_keys)
        self.key_file = KeyFile(key_file) if key_file is not None else None
        self.admin_key = admin_key.encode() if admin_key else None
        self.no_auth = no_auth

    @property
    def server_keys(self) -> tuple[bytes, ...]:
        if self.key_file is None:
            return self._static_keys
        return self._static_keys + self.key_file.current()

    def policy_keys(self, entry: PolicyEntry) -> tuple[bytes, ...] | None:
        """The keys that open `entry`; None when it is open to everyone."""
        if self._static_keys or self.key_file is not None:
            # A key file overrides the schemas' keys even while it holds none (every key
            # withdrawn, or the file caught mid-rewrite): falling back would open them.
            return self.server_keys
        keys = {
            v.policy.schema.parameters.api_key
            for v in entry.versions.values()
            if v.policy is not None and v.policy.schema.parameters.api_key
        }
        if keys:
            return tuple(sorted(k.encode() for k in keys))
        return None if self.no_auth else ()

    def opens(self, connection: HTTPConnection, entry: PolicyEntry) -> bool:
        keys = self.policy_keys(entry)
        if keys is None:
            return True
        key = supplied_key(connection)
        return key is not None and _matches(key.encode(), keys)

    def check(self, connection: HTTPConnection, entry: PolicyEntry) -> None:
        keys = self.policy_keys(entry)
        if keys is not None:
            _check(keys, supplied_key(connection))

    def check_key(self, entry: PolicyEntry, key: str | None) -> None:
        """`check` for a key a protocol read itself (gRPC metadata)."""
        keys = self.policy_keys(entry)
        if keys is not None:
            _check(keys, key)

    def check_any(self, connection: HTTPConnection, entries: list[PolicyEntry]) -> None:
        """For routes of no one policy (/policies, /rewards, /clients): a key that opens
        at least one policy."""
        if any(self.opens(connection, entry) for entry in entries):
            return
        if entries:
            self.check(connection, entries[0])  # says "missing" or "wrong" key
        raise NotAuthenticated("this key opens no policy")

    def check_admin(self, connection: HTTPConnection) -> None:
        key = supplied_key(connection)
        if key is None:
            raise NotAuthenticated(f"missing admin key: send it as header '{TOKEN_NAME}'")
        if self.admin_key is None or not _matches(key.encode(), (self.admin_key,)):
            raise NotAuthenticated("wrong admin key")


Check = Callable[[Request], Awaitable[None] | None]


def key_first(check: Check) -> type[APIRoute]:
    """A route class whose `check` runs before FastAPI reads and validates the body, so that
    a request without a valid key is answered 403 whatever its body."""

    class KeyFirstRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def checked(request: Request) -> Response:
                done = check(request)
                if done is not None:
                    await done
                return await handler(request)

            return checked

    return KeyFirstRoute
