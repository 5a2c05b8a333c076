"""A Streamlit page to try a policy: a form generated from the server's /schema, the
prediction, and the exact action distribution. `streamlit run frontend.py` or `policy-server ui`.

The form is built from what the server says about itself (frontend for backend), so the page
works with any policy server, local or remote.
"""

from __future__ import annotations

import atexit
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import httpx
import pandas as pd
import streamlit as st

from policy_server.errors import PolicyLoadError
from policy_server.schema import load_schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [ROOT / "examples", ROOT.parent / "shared" / "pathmind-models"]
DEFAULT_URL = "http://127.0.0.1:8000"
UPLOAD = "Upload saved_model.zip and schema.yaml"
_STARTED: list[subprocess.Popen[bytes]] = []


class ServerError(Exception):
    """An error answer from the policy server, or no answer, as a sentence for a person."""


@dataclass
class PolicyClient:
    url: str
    key: str

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"access-token": self.key} if self.key else {}
        try:
            response = httpx.request(
                method, self.url.rstrip("/") + path, json=body, headers=headers, timeout=30
            )
        except httpx.HTTPError as error:
            raise ServerError(f"cannot reach {self.url}: {error}") from None
        if response.status_code >= 400:
            raise ServerError(_describe(response))
        return response.json()

    def schema(self) -> dict[str, Any]:
        info: dict[str, Any] = self._call("GET", "/schema")
        return info

    def post(self, path: str, body: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("POST", path, body)
        return answer


def _describe(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"the server answered {response.status_code}: {response.text[:300]}"
    fields = "; ".join(f"{f['field']}: {f['message']}" for f in error.get("fields", []))
    return f"{error['message']} ({response.status_code})" + (f" — {fields}" if fields else "")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_backend(folder: Path) -> str:
    """Start `policy-server serve folder` on a free port and wait for it; returns its URL."""
    port = _free_port()
    log = Path(tempfile.mkdtemp(prefix="policy-server-")) / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "policy_server.cli",
                "serve",
                str(folder),
                "--port",
                str(port),
                "--metrics-port",
                "0",
                "--client-languages",
                "",
                "--no-auth",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    _STARTED.append(process)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            reason = log.read_text(errors="replace").strip().splitlines()
            raise ServerError(reason[-1] if reason else "the server exited")
        try:
            if httpx.get(url + "/", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise ServerError("the server did not start within 180 s")


@atexit.register
def _stop_backends() -> None:
    for process in _STARTED:
        process.terminate()


def _bundled() -> dict[str, Path]:
    found = {}
    for base in EXAMPLES:
        for schema in sorted(base.glob("*/schema.yaml")):
            found[f"{schema.parent.name} ({base.name})"] = schema.parent
    return found


def _on_start(choice: str) -> None:
    try:
        if choice == UPLOAD:
            archive, schema = (
                st.session_state.get("upload_zip"),
                st.session_state.get("upload_yaml"),
            )
            if archive is None or schema is None:
                raise ServerError("upload both saved_model.zip and schema.yaml first")
            folder = Path(tempfile.mkdtemp(prefix="uploaded-policy-"))
            (folder / "saved_model.zip").write_bytes(archive.getvalue())
            (folder / "schema.yaml").write_bytes(schema.getvalue())
        else:
            folder = _bundled()[choice]
        st.session_state["url"] = start_backend(folder)
        st.session_state["api_key"] = _schema_key(folder)
        st.session_state.pop("result", None)
        st.session_state["notice"] = (
            f"Started a server for {folder.name} at {st.session_state['url']}"
        )
    except ServerError as error:
        st.session_state["notice"] = f"Could not start the server: {error}"


def _schema_key(folder: Path) -> str:
    """The key of a server started here: the one its schema.yaml declares, if any."""
    try:
        return load_schema(folder / "schema.yaml").parameters.api_key or ""
    except PolicyLoadError:
        return ""


def sidebar() -> PolicyClient:
    st.sidebar.header("Server")
    st.session_state.setdefault("url", st.query_params.get("url", DEFAULT_URL))
    url = st.sidebar.text_input(
        "Server URL", key="url", help="The policy's base URL, with its url_path if it has one"
    )
    key = st.sidebar.text_input("API key", key="api_key", type="password")
    with st.sidebar.expander("Start the server from schema"):
        choice = st.selectbox("Policy", [*list(_bundled()), UPLOAD], key="start_choice")
        if choice == UPLOAD:
            st.file_uploader("saved_model.zip", type=["zip"], key="upload_zip")
            st.file_uploader("schema.yaml", type=["yaml", "yml"], key="upload_yaml")
        st.button("Start the server from schema", on_click=_on_start, args=(choice,))
    if notice := st.session_state.pop("notice", None):
        st.sidebar.info(notice)
    return PolicyClient(url, key)


def _scalar_input(field: dict[str, Any]) -> Any:
    label, help_text = field["name"], field.get("description")
    low, high = field.get("minimum"), field.get("maximum")
    if field["type"] == "bool":
        return st.checkbox(label, help=help_text)
    start = 0.0 if low is None else max(0.0, low)  # zero, moved inside the bounds
    start = start if high is None else min(start, high)
    if field["type"] == "int":
        return int(
            st.number_input(
                label,
                min_value=None if low is None else int(low),
                max_value=None if high is None else int(high),
                value=int(start),
                step=1,
                help=help_text,
            )
        )
    return float(
        st.number_input(
            label,
            min_value=low,
            max_value=high,
            value=float(start),
            step=0.01,
            format="%.4f",
            help=help_text,
        )
    )


def _list_input(
    name: str, item: str, low: int | None, high: int | None, help_text: str | None
) -> list[Any]:
    length = high or low or 1
    default: Any = {"bool": False, "int": 0}.get(item, 0.0)
    st.caption(
        f"{name}: {item} values"
        + (f", {low} to {high}" if low != high else f", exactly {length}")
        + (f" — {help_text}" if help_text else "")
    )
    table = st.data_editor(
        pd.DataFrame({name: [default] * length}),
        num_rows="fixed" if low is not None and low == high else "dynamic",
        key=f"list_{name}",
        hide_index=True,
    )
    return [_cast(item, value) for value in table[name].tolist()]


def _cast(item: str, value: Any) -> Any:
    return {"bool": bool, "int": int}.get(item, float)(value)


def observation_form(info: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """The form; returns the request body (typed or raw) and whether it was submitted."""
    with st.form("observation"):
        st.subheader("Observation")
        if info["observations"]:
            body: dict[str, Any] = {}
            for field in info["observations"]:
                if field["type"].startswith("List["):
                    body[field["name"]] = _list_input(
                        field["name"],
                        field["type"][5:-1],
                        field.get("min_items"),
                        field.get("max_items"),
                        field.get("description"),
                    )
                else:
                    body[field["name"]] = _scalar_input(field)
        else:
            width = info["observation_width"]
            body = {"obs": _list_input("obs", "float", width, width, "the raw observation vector")}
        submitted = st.form_submit_button("Get prediction", type="primary")
    return body, submitted


def _check_lengths(info: dict[str, Any], body: dict[str, Any]) -> str | None:
    for field in info["observations"]:
        values = body.get(field["name"])
        if isinstance(values, list):
            low, high = field.get("min_items"), field.get("max_items")
            if (low is not None and len(values) < low) or (high is not None and len(values) > high):
                wanted = f"between {low or 0} and {high or 'any'}"
                return f"{field['name']} needs {wanted} values, has {len(values)}"
    return None


def distribution_charts(distribution: dict[str, Any]) -> None:
    st.subheader("Action distribution")
    most_likely = distribution["most_likely"]
    if distribution.get("probabilities") is not None:
        columns = st.columns(len(distribution["probabilities"]))
        for index, (column, probabilities) in enumerate(
            zip(columns, distribution["probabilities"], strict=True)
        ):
            frame = pd.DataFrame(
                {"action": list(range(len(probabilities))), "probability": probabilities}
            )
            frame["most likely"] = frame["action"] == most_likely[index]
            chart = (
                alt.Chart(frame, title=f"Component {index}")
                .mark_bar()
                .encode(
                    x=alt.X("action:O", title="action"),
                    y=alt.Y("probability:Q", scale=alt.Scale(domain=[0, 1])),
                    color=alt.Color(
                        "most likely:N",
                        scale=alt.Scale(domain=[False, True], range=["#9ecae1", "#e6550d"]),
                    ),
                    tooltip=["action", alt.Tooltip("probability:Q", format=".4f")],
                )
            )
            column.altair_chart(chart, use_container_width=True)
        return
    frame = pd.DataFrame(
        {
            "dimension": list(range(len(distribution["mean"]))),
            "mean": distribution["mean"],
            "std": distribution["std"],
        }
    )
    frame["low"], frame["high"] = frame["mean"] - frame["std"], frame["mean"] + frame["std"]
    bars = (
        alt.Chart(frame, title="Mean and standard deviation per dimension")
        .mark_bar(color="#e6550d")
        .encode(x="dimension:O", y="mean:Q", tooltip=["dimension", "mean", "std"])
    )
    errors = alt.Chart(frame).mark_errorbar().encode(x="dimension:O", y="low:Q", y2="high:Q")
    st.altair_chart(bars + errors, use_container_width=True)


def show_result(result: dict[str, Any]) -> None:
    prediction, distribution = result["prediction"], result["distribution"]
    st.subheader("Prediction")
    left, middle, right = st.columns(3)
    left.metric("Action", ", ".join(str(a) for a in prediction["actions"]))
    middle.metric("Probability", f"{prediction['probability']:.4f}")
    if prediction.get("value") is not None:
        right.metric("Value estimate", f"{prediction['value']:.3f}")
    distribution_charts(distribution)


def main() -> None:
    st.set_page_config(page_title="Policy server", layout="wide")
    st.title("Try a policy")
    client = sidebar()
    try:
        info = client.schema()
    except ServerError as error:
        st.error(f"Cannot read the policy's schema: {error}")
        st.info("Set the server URL and API key in the sidebar, or start a server from a schema.")
        return
    st.caption(
        f"Policy **{info['name']}** version `{info['version']}` ({info['runtime']}), "
        f"action space {info['action_space']}"
    )
    body, submitted = observation_form(info)
    if submitted and body is not None:
        problem = _check_lengths(info, body)
        if problem:
            st.error(problem)
        else:
            path = "/predict" if info["observations"] else "/predict_raw"
            try:
                st.session_state["result"] = {
                    "prediction": client.post(path, body),
                    "distribution": client.post("/distribution", body),
                }
            except ServerError as error:
                st.session_state.pop("result", None)
                st.error(f"The server refused the observation: {error}")
    if "result" in st.session_state:
        show_result(st.session_state["result"])


if __name__ == "__main__":
    main()
