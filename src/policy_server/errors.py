"""Domain errors. Each carries the HTTP status it maps to; one handler renders them all."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of a request, named by its dotted path."""

    field: str
    message: str


class PolicyServerError(Exception):
    """Base of every error the server reports to a client."""

    status_code = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        fields: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or []
        self.headers = headers


class InvalidObservation(PolicyServerError):
    status_code = 422
    code = "invalid_observation"


@dataclass(frozen=True)
class RowError:
    """A problem with one observation of a call, by its index; `field` within it ("" for the
    observation as a whole). The HTTP layer names it by the request's own layout."""

    row: int
    field: str
    message: str


class InvalidRows(InvalidObservation):
    """Invalid observations found by the service, named by row; see `api/errors.py`."""

    def __init__(self, message: str, rows: list[RowError]) -> None:
        super().__init__(message)
        self.rows = rows


class InvalidRequest(PolicyServerError):
    """A request body that parses but asks for something impossible, named by field."""

    status_code = 422
    code = "invalid_request"


class PolicyNotFound(PolicyServerError):
    status_code = 404
    code = "policy_not_found"


class PolicyUnavailable(PolicyServerError):
    """The policy exists but no version of it can answer now (loading, failed, draining)."""

    status_code = 503
    code = "policy_unavailable"


class NotAuthenticated(PolicyServerError):
    status_code = 403
    code = "not_authenticated"


class KeyMissing(NotAuthenticated):
    """No key was sent: 403 on the native routes, as always; the Open Inference Protocol
    answers 401 (gRPC UNAUTHENTICATED) for it, and 403 for a wrong key."""


class ClientsNotReady(PolicyServerError):
    status_code = 503
    code = "clients_not_ready"


class ClientsUnavailable(PolicyServerError):
    status_code = 503
    code = "clients_unavailable"


class InferenceTimeout(PolicyServerError):
    """The model did not answer within the inference time-out."""

    status_code = 504
    code = "inference_timeout"


class BackendUnavailable(PolicyServerError):
    status_code = 503
    code = "backend_unavailable"


class PolicyLoadError(Exception):
    """A policy or its schema cannot be served; raised at start-up, never per request."""
