"""The Streamlit page against a live policy server: Streamlit's own app testing, and a real
headless Chromium (Debian's) driven by Playwright, which saves a screenshot."""

import io
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from streamlit.testing.v1 import AppTest

from policy_server.ui.backends import Backend, policy_folder_name
from policy_server.ui.client import Target
from policy_server.ui.page import TRAFFIC_SPLIT, UPLOAD, readable_number
from tests.browser import launch
from tests.policies import EXAMPLE, EXAMPLE_KEY, ROOT, shared_model
from tests.servers import RunningServer, free_port, serving, stop

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serving(EXAMPLE, cache_dir, tmp_path_factory.mktemp("ui"), EXAMPLE_KEY) as running:
        yield running


def app_for(server: RunningServer, key: str = EXAMPLE_KEY, timeout: float = 60) -> AppTest:
    app = AppTest.from_file(str(ROOT / "frontend.py"), default_timeout=timeout)
    app.session_state["url"] = server.url
    app.session_state["api_key"] = key
    return app.run()


def predict_button(app: AppTest) -> AppTest:
    [submit] = [button for button in app.button if button.label == "Get prediction"]
    return submit.click().run()


def start_button(app: AppTest) -> AppTest:
    [start] = [b for b in app.button if b.label == "Start the server from schema"]
    return start.click().run()


def test_form_prediction_and_distribution(server: RunningServer) -> None:
    app = app_for(server)
    assert not app.exception and not app.error, app.error
    labels = [widget.label for widget in app.number_input]
    assert labels == ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"]
    position = app.number_input[0]
    assert (position.min, position.max) == (-4.8, 4.8), "bounds come from schema.yaml"
    app.number_input[2].set_value(0.1)
    app.number_input[3].set_value(1.0)
    predict_button(app)
    assert not app.exception and not app.error, app.error
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Action"] == "1", "the pole falls right: the policy pushes right"
    assert 0.5 < float(metrics["Probability"]) <= 1
    assert float(metrics["Log-probability"]) < 0
    assert app.get("vega_lite_chart"), "the distribution chart is drawn"


def test_a_refused_observation_clears_the_previous_result(server: RunningServer) -> None:
    app = predict_button(app_for(server))
    assert app.metric[0].label == "Action"
    [velocity] = [widget for widget in app.number_input if widget.label == "cart_velocity"]
    velocity.set_value(1e39)  # unbounded in the schema, but beyond float32: the server refuses
    predict_button(app)
    assert "cart_velocity" in app.error[0].value
    assert not app.metric, "the previous prediction is not shown beside the refusal"


def test_without_a_key_the_page_asks_for_one(server: RunningServer) -> None:
    app = app_for(server, key="")
    assert not app.exception and not app.error, app.error
    assert "API key" in app.info[0].value


def test_wrong_key_is_a_readable_error(server: RunningServer) -> None:
    app = app_for(server, key="wrong")
    assert not app.exception
    assert "wrong API key" in app.error[0].value
    assert "Traceback" not in app.error[0].value


def test_no_server_yet_is_a_warning_not_an_error() -> None:
    app = AppTest.from_file(str(ROOT / "frontend.py"), default_timeout=60)
    app.session_state["url"] = f"http://127.0.0.1:{free_port()}"
    app.run()
    assert not app.exception and not app.error
    assert "cannot reach" in app.warning[0].value


def test_start_the_server_from_schema_replaces_the_previous_one(server: RunningServer) -> None:
    app = AppTest.from_file(str(ROOT / "frontend.py"), default_timeout=240)
    app.session_state["url"] = f"http://127.0.0.1:{free_port()}"
    app.run()
    app.selectbox(key="start_choice").select("cartpole (examples)").run()
    start_button(app)
    assert not app.exception and not app.error, app.error
    first: Backend = app.session_state["backend"]
    assert app.session_state["url"] == first.url != server.url
    assert "Started a server for cartpole" in app.sidebar.success[0].value
    assert app.number_input[0].label == "cart_position"
    start_button(app)
    second: Backend = app.session_state["backend"]
    try:
        assert second.url != first.url
        assert first.process.poll() is not None, "the previous server was stopped"
        assert not first.workdir.exists(), "with its temporary folder"
        httpx.get(second.url + "/").raise_for_status()
    finally:
        second.stop()
    assert not second.workdir.exists()


def test_a_refused_start_is_an_error_and_keeps_the_page(server: RunningServer) -> None:
    shared_model("lpoc")
    app = app_for(server, timeout=240)
    app.selectbox(key="start_choice").select("lpoc (pathmind-models)").run()
    start_button(app)
    assert not app.exception
    [refusal] = app.error
    assert "Could not start the server" in refusal.value and "14" in refusal.value, refusal
    assert refusal in app.sidebar.error
    assert app.session_state["url"] == server.url, "the page still talks to its server"
    assert app.number_input[0].label == "cart_position"


def cartpole_archive() -> bytes:
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(EXAMPLE / "saved_model.zip") as source,
        zipfile.ZipFile(buffer, "w") as target,
    ):
        for entry in source.infolist():
            target.writestr(entry, source.read(entry))
    return buffer.getvalue()


def test_an_upload_is_served_under_its_name_and_leaves_nothing_behind() -> None:
    app = AppTest.from_file(str(ROOT / "frontend.py"), default_timeout=240)
    app.session_state["url"] = f"http://127.0.0.1:{free_port()}"
    app.run()
    app.selectbox(key="start_choice").select(UPLOAD).run()
    app.text_input(key="upload_name").input("balance it!")
    archive = ("saved_model.zip", cartpole_archive(), "application/zip")
    app.file_uploader(key="upload_zip").set_value(archive)
    schema = ("schema.yaml", (EXAMPLE / "schema.yaml").read_bytes(), "application/yaml")
    app.file_uploader(key="upload_yaml").set_value(schema)
    start_button(app.run())
    assert not app.exception and not app.error, app.error
    backend: Backend = app.session_state["backend"]
    try:
        assert "Started a server for balance-it" in app.sidebar.success[0].value
        assert app.session_state["api_key"] == EXAMPLE_KEY, "the key of the uploaded schema"
        assert app.caption[0].value.startswith("Policy **balance-it**")
        assert backend.folder.parent == backend.workdir and backend.workdir.is_dir()
    finally:
        backend.stop()
    assert not backend.workdir.exists(), "the upload leaves nothing in the temporary folder"


def test_policy_folder_names() -> None:
    assert policy_folder_name("my policy/v2") == "my-policy-v2"
    assert policy_folder_name("..") == "uploaded"


def test_routes_of_a_target() -> None:
    assert Target().prefix == "" and Target().policy_prefix == ""
    assert Target("cart pole").prefix == "/policies/cart%20pole"
    pinned = Target("cartpole", "2")
    assert pinned.prefix == "/policies/cartpole/versions/2"
    assert pinned.policy_prefix == "/policies/cartpole"


def test_probabilities_never_show_as_zero_when_they_are_not() -> None:
    assert readable_number(0.98412) == "0.9841"
    assert readable_number(2.5e-9) == "2.500e-09"
    assert readable_number(0.0) == "0.0000", "a masked action's probability is exactly 0"
    assert readable_number(-1.58e-5) == "-1.580e-05"


def _fifteen_components() -> None:
    from policy_server.ui.page import show_result

    probabilities = [[0.2, 0.3, 0.5]] * 15
    show_result(
        {
            "prediction": {
                "actions": [2] * 15,
                "probability": 0.5**15,
                "log_probability": 15 * -0.6931,
                "value": None,
            },
            "distribution": {"probabilities": probabilities, "most_likely": [2] * 15},
        }
    )


def test_a_fifteen_component_probability_is_readable() -> None:
    app = AppTest.from_function(_fifteen_components).run()
    assert not app.exception
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Probability"] == "3.052e-05"
    assert metrics["Log-probability"] == "-10.3965"


def test_policy_and_version_pickers(server: RunningServer) -> None:
    listing = httpx.get(server.url + "/policies", headers=server.headers)
    if listing.status_code == 404:
        pytest.skip("this server has no GET /policies yet: the page uses the single routes")
    policies = listing.raise_for_status().json()
    app = app_for(server)
    assert not app.exception and not app.error, app.error
    picker = app.selectbox(key="policy")
    assert picker.value == policies["default"]
    version = app.selectbox(key="version")
    [cartpole] = [p for p in policies["policies"] if p["name"] == policies["default"]]
    ready = [v["version"] for v in cartpole["versions"] if v["state"] == "ready"]
    assert version.options == [TRAFFIC_SPLIT, *ready]
    version.select(ready[0]).run()
    predict_button(app)
    assert not app.exception and not app.error, app.error
    answered = " ".join(caption.value for caption in app.caption)
    assert f"version `{ready[0]}`" in answered


@pytest.fixture(scope="module")
def streamlit_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """`streamlit run frontend.py` from the repository root, as the README says: with the
    settings of .streamlit/config.toml, which no flag here repeats. Yields URL and pid."""
    port = free_port()
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "streamlit", "run", "frontend.py"),
                *("--server.port", str(port), "--server.headless", "true"),
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
        yield url, process.pid
    finally:
        stop(process)


def inotify_watches(pid: int) -> int:
    watches = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            watches += info.read_text().count("inotify wd:")
        except OSError:
            continue  # a descriptor closed while we looked
    return watches


def test_real_browser_fills_the_form_and_sees_the_chart(
    server: RunningServer, streamlit_page: tuple[str, int]
) -> None:
    from playwright.sync_api import expect, sync_playwright

    streamlit_url, pid = streamlit_page
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(f"{streamlit_url}/?url={server.url}")
            expect(page.get_by_text("This server needs an API key")).to_be_visible(timeout=60_000)
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0
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
            # Streamlit draws its toolbar with the page, long before the chart: by now a
            # "Deploy" button would be there (client.toolbarMode = "minimal" hides it).
            assert page.locator('[data-testid="stAppDeployButton"]').count() == 0
            assert page.get_by_role("button", name="Deploy").count() == 0
            page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)
            # While a session is open: Streamlit watches files for its sessions only.
            assert inotify_watches(pid) == 0, "the page watches no files (.streamlit/config.toml)"
        finally:
            browser.close()
    assert (ARTIFACTS / "ui.png").stat().st_size > 10_000
    listening = {
        connection.laddr.ip
        for connection in psutil.Process(pid).net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    }
    assert listening == {"127.0.0.1"}, "the page listens on the loopback address only"
