"""The demo page's HTTP client for a policy server: no Streamlit here, so it is testable alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from policy_server.extras import missing_extra

try:
    import httpx
except ImportError as error:
    raise missing_extra("ui", "the demo page", cause=error) from None


class ServerError(Exception):
    """An error answer from the policy server, or no answer, as a sentence for a person."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # None: the server did not answer


@dataclass(frozen=True)
class Target:
    """Which policy and version a request goes to. No policy: the single-policy routes of a
    server without `GET /policies`; no version: the server's traffic split decides."""

    policy: str | None = None
    version: str | None = None

    @property
    def policy_prefix(self) -> str:
        return "" if self.policy is None else f"/policies/{quote(self.policy, safe='')}"

    @property
    def prefix(self) -> str:
        if self.version is None:
            return self.policy_prefix
        return f"{self.policy_prefix}/versions/{quote(self.version, safe='')}"


@dataclass
class PolicyClient:
    url: str
    key: str

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"access-token": self.key} if self.key else {}
        try:
            response = httpx.request(
                method, self.url.rstrip("/") + path, json=body, headers=headers, timeout=30
            )
        except httpx.HTTPError as error:
            raise ServerError(f"cannot reach {self.url}: {error}") from None
        if response.status_code >= 400:
            raise ServerError(_describe(response), response.status_code)
        return response.json()

    def policies(self) -> dict[str, Any] | None:
        """`GET /policies`, or None from a server that serves a single policy."""
        try:
            listing: dict[str, Any] = self._call("GET", "/policies")
        except ServerError as error:
            if error.status == 404:
                return None
            raise
        return listing

    def schema(self, target: Target) -> dict[str, Any]:
        info: dict[str, Any] = self._call("GET", target.policy_prefix + "/schema")
        return info

    def post(self, target: Target, route: str, body: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("POST", target.prefix + route, body)
        return answer


def _describe(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"the server answered {response.status_code}: {response.text[:300]}"
    fields = "; ".join(f"{f['field']}: {f['message']}" for f in error.get("fields", []))
    return f"{error['message']} ({response.status_code})" + (f" — {fields}" if fields else "")
