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

    def rollout(self, policy: str) -> dict[str, Any] | None:
        """`GET /policies/{name}/rollout`, or None when the policy has none (or the server
        no rollouts: no decision log)."""
        try:
            document: dict[str, Any] = self._call(
                "GET", f"/policies/{quote(policy, safe='')}/rollout"
            )
        except ServerError as error:
            if error.status in (404, 405, 409):
                return None
            raise
        return document

    def schema(self, target: Target) -> dict[str, Any]:
        info: dict[str, Any] = self._call("GET", target.policy_prefix + "/schema")
        return info

    def post(self, target: Target, route: str, body: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("POST", target.prefix + route, body)
        return answer

    def end_episode(self, episode_id: str) -> dict[str, Any]:
        """`POST /episodes/{id}/end`: the server frees the episode's state."""
        answer: dict[str, Any] = self._call("POST", f"/episodes/{quote(episode_id, safe='')}/end")
        return answer


@dataclass
class EpisodeStepper:
    """Steps one episode of a recurrent policy: each step an envelope with the episode id
    and the reward since the previous step; the state string of each answer lets the page
    show the distribution the step was drawn from (the state before it)."""

    episode_id: str
    state: str | None = None  # the state after the last step, from its answer

    def step(
        self, client: PolicyClient, target: Target, route: str, body: Any, reward: float
    ) -> dict[str, Any]:
        before: dict[str, Any] = {"observation": body}
        if self.state is not None:
            before |= {"state": self.state, "reward": reward}
        prediction = client.post(
            target,
            route,
            {"observation": body, "episode_id": self.episode_id, "reward": reward,
             "return_state": True},
        )  # fmt: skip
        answered = target
        if target.policy is not None and prediction.get("version") is not None:
            answered = Target(target.policy, str(prediction["version"]))
        if prediction.get("state_reset"):  # the server lost the state: zeros, as it fed
            before = {"observation": body, "reward": reward}
        elif prediction.get("episode_state") == "initial":
            before = {"observation": body}
        distribution = client.post(answered, "/distribution", before)
        self.state = prediction.pop("state", None)
        return {"target": target, "prediction": prediction, "distribution": distribution}

    def end(self, client: PolicyClient) -> None:
        client.end_episode(self.episode_id)
        self.state = None


def _describe(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"the server answered {response.status_code}: {response.text[:300]}"
    fields = "; ".join(f"{f['field']}: {f['message']}" for f in error.get("fields", []))
    return f"{error['message']} ({response.status_code})" + (f" — {fields}" if fields else "")
