"""The demo page steps an episode of a recurrent policy: the server holds the state, the page
shows each step and the distribution it was drawn from, and ends the episode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.policies import ROOT
from tests.recurrent_exports import cell, tf1_recurrent_policy
from tests.servers import RunningServer, serving


@pytest.fixture(scope="module")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("recurrent")
    tf1_recurrent_policy(folder, cell())
    with serving(folder, cache_dir, folder, "k") as running:
        yield running


def _step(app: AppTest) -> AppTest:
    [submit] = [b for b in app.button if b.label == "Step the episode"]
    return submit.click().run()


def _captions(app: AppTest) -> str:
    return " ".join(c.value for c in app.caption)


def test_the_page_steps_and_ends_an_episode(server: RunningServer) -> None:
    app = AppTest.from_file(str(ROOT / "frontend.py"), default_timeout=60)
    app.session_state["url"] = server.url
    app.session_state["api_key"] = "k"
    app.run()
    assert not app.exception and not app.error, app.error
    assert any("recurrent policy" in info.value for info in app.info)
    app.number_input[0].set_value(0.5)
    for step in range(3):
        app = _step(app)
        assert not app.exception and not app.error, app.error
        assert f"Step {step} of episode" in _captions(app)
    assert "the state the server held" in _captions(app)
    [end] = [b for b in app.button if b.label == "End the episode and start a new one"]
    app = end.click().run()
    app = _step(app)
    assert "Step 0 of episode" in _captions(app) and "zeros" in _captions(app)
