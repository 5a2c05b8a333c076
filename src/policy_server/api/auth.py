"""API keys: which keys open which policy, checked in the route handlers themselves.

The server's key (`--api-key` or the environment) opens every policy; without one, each
policy is opened by the `api_key` of its own schema.yaml. Clients send the key as header
`access-token`; a cookie or a query parameter of the same name is accepted as the original
server did, but only the header is published, since query strings end up in proxy logs.
"""

from __future__ import annotations

import hmac
import logging

from fastapi.security import APIKeyHeader
from starlette.requests import HTTPConnection

from policy_server.errors import NotAuthenticated
from policy_server.registry import PolicyEntry

TOKEN_NAME = "access-token"
logger = logging.getLogger(__name__)

# Declared on the routes for the OpenAPI document only; the handlers check the key.
header_scheme = APIKeyHeader(
    name=TOKEN_NAME,
    auto_error=False,
    scheme_name="APIKeyHeader",
    description="The API key: the server's, or the policy's own from its schema.yaml.",
)


def supplied_key(connection: HTTPConnection) -> str | None:
    key = connection.headers.get(TOKEN_NAME) or connection.cookies.get(TOKEN_NAME)
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


def _matches(supplied: bytes, keys: tuple[bytes, ...]) -> bool:
    found = False
    for key in keys:  # compare with every key, so the time says nothing of which matched
        found |= hmac.compare_digest(supplied, key)
    return found


class KeyRing:
    warned_query = False

    def __init__(self, server_keys: list[str], admin_key: str | None, no_auth: bool) -> None:
        self.server_keys = tuple(k.encode() for k in server_keys)
        self.admin_key = admin_key.encode() if admin_key else None
        self.no_auth = no_auth

    def policy_keys(self, entry: PolicyEntry) -> tuple[bytes, ...] | None:
        """The keys that open `entry`; None when it is open to everyone."""
        if self.server_keys:
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
        if keys is None:
            return
        key = supplied_key(connection)
        if key is None:
            raise NotAuthenticated(f"missing API key: send it as header '{TOKEN_NAME}'")
        if not _matches(key.encode(), keys):
            raise NotAuthenticated("wrong API key")

    def check_admin(self, connection: HTTPConnection) -> None:
        key = supplied_key(connection)
        if key is None:
            raise NotAuthenticated(f"missing admin key: send it as header '{TOKEN_NAME}'")
        if self.admin_key is None or not _matches(key.encode(), (self.admin_key,)):
            raise NotAuthenticated("wrong admin key")
