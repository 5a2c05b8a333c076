"""The README's first steps from a fresh clone, in its order: `make serve` (which makes the
venv and installs what serving needs), then `make ui` in another terminal, and a person's
browser on the page to a prediction. The venv has only what those two commands installed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.browser import launch
from tests.fresh import PIP_TIMEOUT_S, base_python, clean_env, fresh_clone
from tests.policies import EXAMPLE_KEY, ROOT
from tests.servers import free_port, wait_until_up

pytestmark = pytest.mark.extras
ARTIFACTS = ROOT / "test-artifacts"


@contextmanager
def make(
    target: str, clone: Path, log: Path, **variables: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`make TARGET` in the clone, its output in `log`; stopped (with what it started) after."""
    env = clean_env(
        POLICY_SERVER_METRICS_PORT="0",
        POLICY_SERVER_CACHE_DIR=str(log.parent / "cache"),
        # Streamlit's own settings for a page nobody opens by hand: no browser to start, no
        # e-mail prompt on a first run.
        STREAMLIT_SERVER_HEADLESS="true",
    )
    arguments = [f"{name}={value}" for name, value in variables.items()]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["make", "--no-print-directory", target, *arguments],
            cwd=clone,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # make's children go with it
        )
    try:
        yield process
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop make and what it started (the server, the page): they share its session."""
    for signal_number, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            time.sleep(0.5)  # the children's own exit, after make's
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def policy_server_ui(
    venv: Path, command: list[str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    env = clean_env(STREAMLIT_SERVER_HEADLESS="true")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(venv / "bin" / command[0]), *command[1:]],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop_group(process)


def wait_for_page(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + PIP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the page exited:\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(url + "/_stcore/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(1)
    raise AssertionError(f"the page did not start:\n{log.read_text()[-4000:]}")


def test_make_serve_then_make_ui_to_a_prediction(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    clone = fresh_clone(tmp_path / "clone")
    venv = tmp_path / "venv"
    port, ui_port = free_port(), free_port()
    common = {"VENV": str(venv), "PYTHON": base_python()}
    with make("serve", clone, tmp_path / "serve.log", PORT=str(port), **common) as serving:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, serving, tmp_path / "serve.log", PIP_TIMEOUT_S)
        ui = make("ui", clone, tmp_path / "ui.log", UI_PORT=str(ui_port), **common)
        with ui as page_process:
            page_url = f"http://127.0.0.1:{ui_port}"
            wait_for_page(page_url, page_process, tmp_path / "ui.log")
            with sync_playwright() as playwright:
                browser = launch(playwright)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1600})
                    page.goto(f"{page_url}/?url={url}")
                    key = page.get_by_label("API key")
                    expect(key).to_be_visible(timeout=60_000)
                    key.fill(EXAMPLE_KEY)
                    key.press("Enter")
                    pole = page.get_by_role("spinbutton", name="pole_angle", exact=True)
                    expect(pole).to_be_visible(timeout=60_000)
                    pole.fill("0.1")
                    velocity = page.get_by_role("spinbutton", name="pole_angular_velocity")
                    velocity.fill("1.0")
                    page.get_by_role("button", name="Get prediction").click()
                    expect(page.get_by_text("Action distribution")).to_be_visible(timeout=60_000)
                    expect(page.locator('[data-testid="stMetric"]').first).to_contain_text("1")
                    chart = page.locator('[data-testid="stVegaLiteChart"], .vega-embed').first
                    expect(chart).to_be_visible(timeout=30_000)
                    assert page.locator('[data-testid="stException"]').count() == 0
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / "fresh-clone-ui.png"), full_page=True)
                    # The README's other way to the page, from the same venv.
                    other = f"http://127.0.0.1:{free_port()}"
                    command = ["policy-server", "ui", "--ui-port", other.rsplit(":", 1)[1]]
                    with policy_server_ui(venv, command, tmp_path / "cli-ui.log") as cli:
                        wait_for_page(other, cli, tmp_path / "cli-ui.log")
                        page.goto(f"{other}/?url={url}")
                        expect(page.get_by_text("Try a policy")).to_be_visible(timeout=60_000)
                        expect(page.get_by_label("API key")).to_be_visible(timeout=60_000)
                finally:
                    browser.close()
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import ray"], capture_output=True, timeout=120
    )
    assert installed.returncode != 0, "the venv holds only what make serve and make ui installed"
