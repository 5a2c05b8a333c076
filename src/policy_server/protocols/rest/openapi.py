"""The OpenAPI document as the SDKs read it: FastAPI's, with number formats.

JSON Schema's `number` has no size, so OpenAPI Generator types it `BigDecimal` in Java and
Scala; `integer` becomes a 32-bit `Integer` even where the bounds need 64 bits. Observations
and answers are float32 and float64 values and integers within I-JSON's 2**53, so every
number is a `double` and every integer that does not fit 32 bits an `int64`. The document is
built once per set of routes, so this costs nothing per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

INT32 = 2**31 - 1


def with_number_formats(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with a `format` on every number and on every integer beyond 32 bits."""
    _add_formats(document)
    return document


def install_number_formats(app: FastAPI) -> None:
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_number_formats(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_formats(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _add_formats(item)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if "format" not in node and kind == "number":
        node["format"] = "double"
    elif "format" not in node and kind == "integer" and not _fits_int32(node):
        node["format"] = "int64"
    for value in node.values():
        _add_formats(value)


def _fits_int32(schema: dict[str, Any]) -> bool:
    low, high = schema.get("minimum"), schema.get("maximum")
    return low is not None and high is not None and low >= -INT32 - 1 and high <= INT32
