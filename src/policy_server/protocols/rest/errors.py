"""One JSON shape for every error the server returns: {"error": {code, message, fields}}."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from pydantic import Field as PydanticField
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from policy_server.errors import FieldError, PolicyServerError

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
# What FastAPI's body reading raises for a body that is not JSON for another reason than
# its syntax (invalid UTF-8, too deep, an integer too long to convert): the same 422 as a
# syntax error.
_UNDECODABLE = (UnicodeDecodeError, ValueError, RecursionError)


class ErrorDetail(BaseModel):
    code: str = PydanticField(description="Stable, machine-readable error code.")
    message: str = PydanticField(description="What went wrong, for a person.")
    fields: list[dict[str, str]] = PydanticField(
        description="The request fields at fault, each as {field, message}."
    )


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


def _responses(*pairs: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": text} for status, text in pairs}


ERROR_RESPONSES = _responses(
    (403, "Missing or wrong API key"),
    (413, "Request body too large"),
    (415, "Content-Encoding other than identity"),
    (422, "Invalid observation or request (a body that is not JSON included)"),
)
TIMEOUT_RESPONSES = _responses((504, "The model did not answer within the inference time-out"))


def body_limit_responses(max_body_bytes: int) -> dict[int | str, dict[str, Any]]:
    """403, 413 (naming the limit), 415 and 422: the answers of every route with a body."""
    return ERROR_RESPONSES | _responses((413, f"Request body larger than {max_body_bytes} bytes"))


POLICY_RESPONSES = _responses(
    (404, "No such policy or version"),
    (503, "No version of the policy can answer now (loading, failed or draining)"),
)


def error_response(
    status: int,
    code: str,
    message: str,
    fields: Sequence[FieldError] = (),
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = {
        "error": {
            "code": code,
            "message": message,
            "fields": [{"field": f.field, "message": f.message} for f in fields],
        }
    }
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def field_name(location: Sequence[int | str]) -> str:
    parts = [str(part) for part in location]
    if parts and parts[0] in ("body", "query", "header", "cookie", "path"):
        parts = parts[1:] or parts
    # Union members are tagged `<typed>`, `<envelope>`...: not fields a client sent.
    parts = [part for part in parts if not (part.startswith("<") and part.endswith(">"))]
    return ".".join(parts) or "body"


def _validation_fields(errors: Sequence[Any]) -> list[FieldError]:
    fields = []
    for error in errors:
        if error.get("type") == "json_invalid":
            fields.append(
                FieldError("body", f"not valid JSON: {error.get('ctx', {}).get('error')}")
            )
            continue
        fields.append(FieldError(field_name(error.get("loc", ())), str(error.get("msg"))))
    return fields


async def _on_domain_error(_: Request, error: Exception) -> Response:
    assert isinstance(error, PolicyServerError)
    return error_response(
        error.status_code, error.code, error.message, error.fields, headers=error.headers
    )


async def _on_validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    fields = _validation_fields(error.errors())
    if "json" not in request.headers.get("content-type", "json") and any(
        f.field == "body" for f in fields
    ):
        fields = [FieldError("body", "send a JSON object with Content-Type: application/json")]
    names = ", ".join(dict.fromkeys(f.field for f in fields))
    return error_response(422, "invalid_request", f"invalid request: {names}", fields)


async def _on_http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    if error.status_code == 400 and isinstance(error.__cause__, _UNDECODABLE):
        return undecodable(error.__cause__)
    code = _HTTP_CODES.get(error.status_code, "http_error")
    return error_response(error.status_code, code, str(error.detail), headers=error.headers)


def undecodable(cause: BaseException) -> Response:
    reason = type(cause).__name__ if isinstance(cause, RecursionError) else str(cause)
    message = f"not valid JSON: {reason}"
    return error_response(
        422, "invalid_request", "invalid request: body", [FieldError("body", message)]
    )


async def _on_disconnect(_: Request, __: Exception) -> Response:
    # The client went away (or its request timed out) while its body was being read: no
    # one is left to answer, and nothing went wrong here.
    return error_response(400, "client_disconnected", "the client disconnected")


async def _on_unexpected(request: Request, error: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PolicyServerError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ClientDisconnect, _on_disconnect)
    app.add_exception_handler(Exception, _on_unexpected)
