"""Domain errors in the Open Inference Protocol's terms: its error body is `{"error": "..."}`,
bad tensors are 400 (not the JSON routes' 422), a missing key is 401 and a wrong one 403."""

from __future__ import annotations

from policy_server.errors import InvalidObservation, KeyMissing, NotAuthenticated, PolicyServerError


def http_status(error: PolicyServerError) -> int:
    if isinstance(error, KeyMissing):
        return 401
    if isinstance(error, NotAuthenticated):
        return 403
    if isinstance(error, InvalidObservation):
        return 400
    return error.status_code
