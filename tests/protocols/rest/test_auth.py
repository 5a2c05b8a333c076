"""API-key authentication over a real server."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.policies import EXAMPLE, EXAMPLE_KEY
from tests.servers import RunningServer, serving

BODY = {"obs": [0.0, 0.1, 0.02, -0.1]}


def test_key_accepted_as_header_query_or_cookie(example_server: RunningServer) -> None:
    url = example_server.url + "/predict_raw"
    assert httpx.post(url, json=BODY, headers={"access-token": EXAMPLE_KEY}).status_code == 200
    assert httpx.post(url, json=BODY, params={"access-token": EXAMPLE_KEY}).status_code == 200
    cookies = httpx.Cookies({"access-token": EXAMPLE_KEY})
    with httpx.Client(cookies=cookies) as client:
        assert client.post(url, json=BODY).status_code == 200


@pytest.mark.parametrize("path", ["/predict_raw", "/predict_deterministic", "/distribution"])
def test_missing_or_wrong_key_is_403_json(example_server: RunningServer, path: str) -> None:
    url = example_server.url + path
    missing = httpx.post(url, json=BODY)
    wrong = httpx.post(url, json=BODY, headers={"access-token": EXAMPLE_KEY + "x"})
    for response in (missing, wrong):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "not_authenticated"
    assert "missing" in missing.json()["error"]["message"]
    assert httpx.get(example_server.url + "/schema").status_code == 403


@pytest.mark.parametrize("path", ["/", "/docs", "/redoc", "/openapi.json"])
def test_docs_and_health_stay_open(example_server: RunningServer, path: str) -> None:
    assert httpx.get(example_server.url + path).status_code == 200


def test_openapi_declares_the_key_as_one_header(example_server: RunningServer) -> None:
    """One form in Swagger's Authorize dialog, and never one that puts the key in the URL;
    the cookie and query forms are still accepted for the original's clients."""
    document = httpx.get(example_server.url + "/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert list(schemes.values()) == [
        {
            "type": "apiKey",
            "description": schemes["APIKeyHeader"]["description"],
            "in": "header",
            "name": "access-token",
        }
    ]
    predict = document["paths"]["/predict"]["post"]
    assert predict["security"] == [{"APIKeyHeader": []}]


@pytest.fixture(scope="module")
def env_keyed(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serving(
        EXAMPLE, cache_dir, tmp_path_factory.mktemp("k"), "cli-key", "--api-key", "cli-key"
    ) as server:
        yield server


def test_command_line_key_overrides_schema(env_keyed: RunningServer) -> None:
    url = env_keyed.url + "/predict_raw"
    assert httpx.post(url, json=BODY, headers={"access-token": "cli-key"}).status_code == 200
    assert httpx.post(url, json=BODY, headers={"access-token": EXAMPLE_KEY}).status_code == 403
