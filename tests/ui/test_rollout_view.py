"""The demo page's view of a rollout, against a live server with one under way."""

from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from tests.policies import ROOT
from tests.servers import serving
from tests.serving.test_rollout import KEY, SPEC, flags, play_until, repository, start


def test_the_page_shows_the_rollout_with_its_interval_over_time(
    cache_dir: Path, tmp_path: Path
) -> None:
    root = repository(tmp_path / "repo")
    with (
        serving(root, cache_dir, tmp_path, KEY, *flags(tmp_path / "log")) as server,
        server.client() as http,
    ):
        assert start(http, candidate="2", **SPEC).status_code == 201
        document, _ = play_until(
            http, np.random.default_rng(7), lambda d: d["state"] != "canary", 4000
        )
        app = AppTest.from_file(str(ROOT / "frontend.py"), default_timeout=60)
        app.session_state["url"] = server.url
        app.session_state["api_key"] = KEY
        app.run()
        assert not app.exception and not app.error, app.error
        assert "Rollout" in [header.value for header in app.subheader]
        metrics = {metric.label: metric.value for metric in app.metric}
        assert metrics["State"] == document["state"] == "promoted"
        assert float(metrics["Difference lower"]) > 0
        assert app.get("arrow_vega_lite_chart") or app.get("vega_lite_chart"), "the interval"
        assert len(document["evidence"]["trace"]) >= 2
        reasons = " ".join(str(table.value) for table in app.table)
        assert "promoted" in reasons
