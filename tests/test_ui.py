"""The Streamlit page against a live policy server: Streamlit's own app testing, and a real
headless Chromium (Debian's) driven by Playwright, which saves a screenshot."""

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import EXAMPLE, EXAMPLE_KEY, ROOT, RunningServer, free_port, serving, stop

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serving(EXAMPLE, cache_dir, tmp_path_factory.mktemp("ui"), EXAMPLE_KEY) as running:
        yield running


def app_for(server: RunningServer, key: str = EXAMPLE_KEY) -> AppTest:
    app = AppTest.from_file(str(ROOT / "frontend.py"), default_timeout=60)
    app.session_state["url"] = server.url
    app.session_state["api_key"] = key
    return app.run()


def test_form_prediction_and_distribution(server: RunningServer) -> None:
    app = app_for(server)
    assert not app.exception and not app.error, app.error
    labels = [widget.label for widget in app.number_input]
    assert labels == ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"]
    position = app.number_input[0]
    assert (position.min, position.max) == (-4.8, 4.8), "bounds come from schema.yaml"
    app.number_input[2].set_value(0.1)
    app.number_input[3].set_value(1.0)
    [submit] = [button for button in app.button if button.label == "Get prediction"]
    submit.click().run()
    assert not app.exception and not app.error, app.error
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Action"] == "1", "the pole falls right: the policy pushes right"
    assert 0.5 < float(metrics["Probability"]) <= 1
    assert app.get("vega_lite_chart"), "the distribution chart is drawn"


def test_wrong_key_is_a_readable_error(server: RunningServer) -> None:
    app = app_for(server, key="wrong")
    assert not app.exception
    assert "wrong API key" in app.error[0].value
    assert "Traceback" not in app.error[0].value


def test_unreachable_server_is_a_readable_error() -> None:
    app = AppTest.from_file(str(ROOT / "frontend.py"), default_timeout=60)
    app.session_state["url"] = f"http://127.0.0.1:{free_port()}"
    app.run()
    assert not app.exception
    assert "cannot reach" in app.error[0].value


def test_start_the_server_from_schema(server: RunningServer) -> None:
    app = AppTest.from_file(str(ROOT / "frontend.py"), default_timeout=240)
    app.session_state["url"] = f"http://127.0.0.1:{free_port()}"
    app.run()
    app.selectbox(key="start_choice").select("cartpole (examples)").run()
    [start] = [b for b in app.button if b.label == "Start the server from schema"]
    start.click().run()
    assert not app.exception, app.exception
    assert app.session_state["url"] != server.url
    assert "Started a server for cartpole" in app.sidebar.info[0].value
    assert app.number_input[0].label == "cart_position"
    httpx.get(app.session_state["url"] + "/").raise_for_status()


@pytest.fixture(scope="module")
def streamlit_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                str(ROOT / "frontend.py"),
                "--server.port",
                str(port),
                "--server.headless",
                "true",
                "--browser.gatherUsageStats",
                "false",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield url
    finally:
        stop(process)


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "Chromium is missing: `make test` installs Debian's chromium package"
    return path


def test_real_browser_fills_the_form_and_sees_the_chart(
    server: RunningServer, streamlit_url: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(f"{streamlit_url}/?url={server.url}")
            key = page.get_by_label("API key")
            key.fill(EXAMPLE_KEY)
            key.press("Enter")
            pole = page.get_by_role("spinbutton", name="pole_angle", exact=True)
            expect(pole).to_be_visible(timeout=60_000)
            pole.fill("0.1")
            page.get_by_role("spinbutton", name="pole_angular_velocity", exact=True).fill("1.0")
            page.get_by_role("button", name="Get prediction").click()
            expect(page.get_by_text("Action distribution")).to_be_visible(timeout=60_000)
            action = page.locator('[data-testid="stMetric"]').first
            expect(action).to_contain_text("1")
            chart = page.locator('[data-testid="stVegaLiteChart"], .vega-embed').first
            expect(chart).to_be_visible(timeout=30_000)
            chart.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "ui.png").stat().st_size > 10_000
