"""Responses of the REST protocol: JSON bodies written by orjson, and a policy's description."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from policy_server.policy.loaded import LoadedPolicy
from policy_server.protocols.rest.models import (
    FieldInfo,
    PolicyInfo,
    RecurrentInfo,
)

_JSON_TYPE = (b"content-type", b"application/json")


class JSONBytes(Response):
    """A response of JSON bytes with its two headers built directly: Starlette's `__init__`
    renders, checks the media type and merges headers for every response."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int = 200) -> None:
        self.status_code = status_code
        self.body = body
        self.background = None
        self.raw_headers = [(b"content-length", b"%d" % len(body)), _JSON_TYPE]


def json_response(content: Any, status: int = 200) -> Response:
    return JSONBytes(orjson.dumps(content), status)


def policy_info(policy: LoadedPolicy) -> PolicyInfo:
    parameters = policy.schema.parameters
    return PolicyInfo(
        name=policy.name,
        version=policy.version,
        runtime=policy.runtime.name,
        observations=[
            FieldInfo(
                name=f.name,
                type=f.type.value,
                description=f.description,
                minimum=f.minimum,
                maximum=f.maximum,
                min_items=f.min_items,
                max_items=f.max_items,
            )
            for f in policy.schema.observations
        ],
        observation_width=policy.runtime.observation_width,
        action_space=policy.runtime.action_space.describe(),
        discrete=parameters.discrete,
        tuple=parameters.tuple,
        url_path=parameters.url_path,
        recurrent=RecurrentInfo.of(policy.runtime.recurrence),
    )
