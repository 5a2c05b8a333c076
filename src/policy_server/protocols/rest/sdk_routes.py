"""Routes that hand out the generated client SDKs.

No `from __future__ import annotations`: FastAPI must see the run-time Language enum.
"""

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from policy_server.protocols.rest.errors import ERROR_RESPONSES
from policy_server.protocols.rest.sdks import ClientBuilder

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/zip": {}}, "description": "A zip archive"},
    503: ERROR_RESPONSES[422]
    | {"description": "Still being generated after waiting for it (see Retry-After)"},
}


def add_client_routes(
    router: APIRouter, builder: ClientBuilder, dependencies: Sequence[Any]
) -> None:
    Language = StrEnum("Language", {name: name for name in builder.languages})  # type: ignore[misc]

    @router.get(
        "/clients",
        operation_id="downloadClients",
        tags=["clients"],
        summary="Client SDKs for every language, one folder each, in one zip",
        response_class=Response,
        responses=_RESPONSES,
        dependencies=list(dependencies),
    )
    async def download_clients() -> Response:
        return _zip(await builder.archive(), "policy-clients.zip")

    @router.get(
        "/clients/{language}",
        operation_id="downloadClient",
        tags=["clients"],
        summary="The client SDK for one language, as a zip",
        response_class=Response,
        responses=_RESPONSES,
        dependencies=list(dependencies),
    )
    async def download_client(language: Language) -> Response:
        name = language.value
        return _zip(await builder.archive(name), f"policy-client-{name}.zip")


def _zip(content: bytes, filename: str) -> Response:
    return Response(
        content,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
