"""Bad input gets a 4xx with one JSON error shape naming the field, never a 500."""

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.servers import RunningServer

GOOD = {
    "cart_position": 0.0,
    "cart_velocity": 0.1,
    "pole_angle": 0.02,
    "pole_angular_velocity": 0.0,
}


def assert_error(response: httpx.Response, status: int, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "fields"}
    if field is not None:
        assert field in [f["field"] for f in error["fields"]], error
        assert field in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (GOOD | {"pole_angle": "0.1"}, "pole_angle"),
        (GOOD | {"pole_angle": None}, "pole_angle"),
        (GOOD | {"pole_angle": True}, "pole_angle"),
        (GOOD | {"pole_angle": [0.1]}, "pole_angle"),
        ({k: v for k, v in GOOD.items() if k != "cart_velocity"}, "cart_velocity"),
        (GOOD | {"colour": 1}, "colour"),
        (GOOD | {"cart_position": 9.0}, "cart_position"),
        (GOOD | {"cart_velocity": 1e39}, "cart_velocity"),
    ],
)
def test_bad_typed_observation(
    example_server: RunningServer, body: dict[str, Any], field: str
) -> None:
    with example_server.client() as client:
        for path in ("/predict", "/predict_deterministic", "/distribution"):
            assert_error(client.post(path, json=body), 422, field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"obs": [0.0, 0.1, 0.2]}, "obs"),
        ({"obs": [0.0, 0.1, 0.2, 0.3, 0.4]}, "obs"),
        ({"obs": [0.0, 0.1, "a", 0.3]}, "obs.2"),
        ({"obs": "0.1"}, "obs"),
        ({}, "obs"),
        ({"obs": [0.0, 0.1, 0.2, 0.3], "extra": 1}, "extra"),
    ],
)
def test_bad_raw_observation(
    example_server: RunningServer, body: dict[str, Any], field: str
) -> None:
    with example_server.client() as client:
        assert_error(client.post("/predict_raw", json=body), 422, field)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers(example_server: RunningServer, literal: str) -> None:
    typed = '{"cart_position": 0, "cart_velocity": %s, "pole_angle": 0, "pole_angular_velocity": 0}'
    raw = '{"obs": [0, %s, 0, 0]}'
    headers = {"content-type": "application/json"}
    with example_server.client() as client:
        assert_error(
            client.post("/predict", content=typed % literal, headers=headers), 422, "cart_velocity"
        )
        assert_error(
            client.post("/predict_raw", content=raw % literal, headers=headers), 422, "obs.1"
        )


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"42", b"\xff\xfe"])
def test_body_that_is_not_a_json_object(example_server: RunningServer, content: bytes) -> None:
    headers = {"content-type": "application/json"}
    with example_server.client() as client:
        for path in ("/predict", "/predict_raw", "/distribution"):
            assert_error(client.post(path, content=content, headers=headers), 422, "body")


def test_form_encoded_body_says_to_send_json(example_server: RunningServer) -> None:
    with example_server.client() as client:
        response = client.post("/predict", data={"cart_position": "0"})
    assert_error(response, 422, "body")
    assert "application/json" in response.json()["error"]["fields"][0]["message"]


def test_body_over_the_limit_is_413(example_server: RunningServer) -> None:
    big = b'{"obs": [' + b"0," * 5_000_000 + b"0]}"
    with example_server.client() as client:
        assert_error(client.post("/predict_raw", content=big), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size is counted instead
            for _ in range(20):
                yield b" " * 1_000_000

        assert_error(client.post("/predict_raw", content=chunks()), 413)


def test_bad_seed_and_unknown_routes(example_server: RunningServer) -> None:
    with example_server.client() as client:
        assert_error(client.post("/predict", params={"seed": "x"}, json=GOOD), 422, "seed")
        assert_error(client.post("/predict", params={"seed": -1}, json=GOOD), 422, "seed")
        assert_error(client.get("/nowhere"), 404)
        assert_error(client.get("/predict"), 405)
