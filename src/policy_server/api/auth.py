"""API-key authentication: header, query parameter or cookie `access-token`."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Security
from fastapi.security import APIKeyCookie, APIKeyHeader, APIKeyQuery

from policy_server.errors import NotAuthenticated

TOKEN_NAME = "access-token"

_header = APIKeyHeader(name=TOKEN_NAME, auto_error=False, scheme_name="APIKeyHeader")
_query = APIKeyQuery(name=TOKEN_NAME, auto_error=False, scheme_name="APIKeyQuery")
_cookie = APIKeyCookie(name=TOKEN_NAME, auto_error=False, scheme_name="APIKeyCookie")


def require_api_key(expected: str) -> Callable[..., Awaitable[None]]:
    """A dependency that accepts the request only if it carries `expected`."""
    expected_bytes = expected.encode()

    async def check(
        header: str | None = Security(_header),
        query: str | None = Security(_query),
        cookie: str | None = Security(_cookie),
    ) -> None:
        supplied = header or query or cookie
        if supplied is None:
            raise NotAuthenticated(f"missing API key: send it as header '{TOKEN_NAME}'")
        if not hmac.compare_digest(supplied.encode(), expected_bytes):
            raise NotAuthenticated("wrong API key")

    return check
