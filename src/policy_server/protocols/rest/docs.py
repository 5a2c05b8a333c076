"""Swagger UI at /docs and ReDoc at /redoc, served from this server: no CDN, so they work
on a machine without internet access.

The scripts and styles come from the `fastapi-offline` package, which ships Swagger UI and
ReDoc's standalone bundle and is kept up to date with their releases; the pages themselves
are FastAPI's own.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"


def _assets_folder() -> str:
    try:
        return str(files("fastapi_offline") / "static")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "/docs and /redoc need the fastapi-offline package: pip install fastapi-offline"
        ) from None


def install_docs(app: FastAPI) -> None:
    """Add /docs (with its OAuth2 redirect page), /redoc and their assets to `app`, which
    must be created with `docs_url=None, redoc_url=None`."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError(
            "create the app with docs_url=None, redoc_url=None: install_docs serves them"
        )
    if app.openapi_url is None:
        raise ValueError("the docs need the OpenAPI document: create the app with an openapi_url")
    openapi_url = app.openapi_url
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"
    app.mount(ASSETS_URL, StaticFiles(directory=_assets_folder()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=root + redirect_url,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
