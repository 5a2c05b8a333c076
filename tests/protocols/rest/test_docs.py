"""/docs and /redoc from assets this server ships: a real uvicorn serving the bundled example,
and a real headless Chromium (Debian's) with every request off the loopback address aborted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from policy_server.hosting.app import build_app
from policy_server.protocols.rest.docs import ASSETS_URL, install_docs
from policy_server.settings import Settings
from tests.browser import chromium
from tests.policies import EXAMPLE, EXAMPLE_KEY
from tests.servers import free_port
from tests.ui.test_ui import ARTIFACTS

BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def example_app(cache_dir: Path) -> FastAPI:
    return build_app(
        Settings(
            policy_path=EXAMPLE,
            api_key=SecretStr(EXAMPLE_KEY),
            cache_dir=cache_dir,
            metrics_port=0,
            client_languages="",
        )
    )


@pytest.fixture(scope="module")
def docs_url(cache_dir: Path) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(example_app(cache_dir), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_name_no_other_host(docs_url: str, page: str) -> None:
    html = httpx.get(docs_url + page).raise_for_status().text
    assert "cdn." not in html and "fonts.googleapis" not in html
    assert f"{ASSETS_URL}/" in html


def test_assets_and_redirect_page_are_served(docs_url: str) -> None:
    for asset in ["swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"]:
        response = httpx.get(f"{docs_url}{ASSETS_URL}/{asset}").raise_for_status()
        assert len(response.content) > 1000, asset
    redirect = httpx.get(docs_url + "/docs/oauth2-redirect").raise_for_status()
    assert "oauth2" in redirect.text


def test_install_docs_refuses_an_app_with_its_own_docs() -> None:
    with pytest.raises(ValueError, match="docs_url=None"):
        install_docs(FastAPI())


def test_docs_render_in_a_browser_without_network(docs_url: str) -> None:
    from playwright.sync_api import Route, expect, sync_playwright

    refused: list[tuple[str, str]] = []

    def only_loopback(route: Route) -> None:
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            refused.append((route.request.resource_type, route.request.url))
            route.abort()

    with sync_playwright() as playwright:
        ARTIFACTS.mkdir(exist_ok=True)
        browser = playwright.chromium.launch(executable_path=chromium(), args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", only_loopback)
            page.goto(docs_url + "/docs")
            # Each page names an operation's element after its operation id, `predict`.
            expect(page.locator('.opblock[id$="-predict"]')).to_be_visible(timeout=60_000)
            page.locator(".btn.authorize").click()
            # One form, for the header: a key typed here never goes into a URL.
            expect(page.locator(".auth-container")).to_have_count(1)
            expect(page.locator(".auth-container")).to_contain_text("header")
            page.locator(".auth-container input").fill(EXAMPLE_KEY)
            page.screenshot(path=str(ARTIFACTS / "docs.png"))
            page.locator(".modal-btn.authorize").click()
            page.locator(".modal-btn.btn-done").click()
            with page.expect_request(lambda r: r.url.split("?")[0].endswith("/schema")) as sent:
                schema = page.locator(
                    ".opblock", has=page.locator('.opblock-summary-path[data-path="/schema"]')
                )
                schema.locator(".opblock-summary").click()
                schema.get_by_role("button", name="Try it out").click()
                schema.get_by_role("button", name="Execute").click()
            assert sent.value.headers.get("access-token") == EXAMPLE_KEY
            assert "access-token" not in sent.value.url
            expect(
                schema.locator(".live-responses-table tbody .response-col_status")
            ).to_contain_text("200")
            page.goto(docs_url + "/redoc")
            expect(page.locator('[id$="/operation/predict"]')).to_be_visible(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "redoc.png"))
        finally:
            browser.close()
    # ReDoc's sidebar footer links its logo from redoc.ly: a missing picture, nothing more.
    needed = [(kind, url) for kind, url in refused if kind != "image"]
    assert needed == [], f"the pages need other hosts: {needed}"
