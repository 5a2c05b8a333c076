"""A Streamlit page to try a policy: a form generated from the server's schema, the
prediction, and the exact action distribution. `streamlit run frontend.py` or `policy-server ui`.

The form is built from what the server says about itself (frontend for backend), so the page
works with any policy server, local or remote: one that lists its policies and versions at
`GET /policies`, or one that serves a single policy at the top-level routes.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from policy_server.errors import PolicyLoadError
from policy_server.extras import missing_extra

try:
    import altair as alt
    import pandas as pd
    import streamlit as st
except ImportError as error:
    raise missing_extra("ui", "the demo page", cause=error) from None

from policy_server.loading.layout import SCHEMA_NAME
from policy_server.policy.schema import load_schema
from policy_server.ui.backends import Backend, start_backend, start_upload
from policy_server.ui.client import EpisodeStepper, PolicyClient, ServerError, Target

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = [ROOT / "examples", ROOT.parent / "shared" / "pathmind-models"]
DEFAULT_URL = "http://127.0.0.1:8000"
UPLOAD = "Upload saved_model.zip and schema.yaml"
TRAFFIC_SPLIT = "traffic split (server decides)"


def _bundled() -> dict[str, Path]:
    found = {}
    for base in EXAMPLES:
        for schema in sorted(base.glob("*/schema.yaml")):
            found[f"{schema.parent.name} ({base.name})"] = schema.parent
    return found


def _start_chosen(choice: str) -> Backend:
    if choice != UPLOAD:
        workdir = Path(tempfile.mkdtemp(prefix="policy-server-ui-"))
        return start_backend(_bundled()[choice], workdir)
    archive, schema = st.session_state.get("upload_zip"), st.session_state.get("upload_yaml")
    if archive is None or schema is None:
        raise ServerError("upload both saved_model.zip and schema.yaml first")
    name = st.session_state.get("upload_name", "")
    return start_upload(name, archive.getvalue(), schema.getvalue())


def _on_start(choice: str) -> None:
    """Start the chosen policy; the page's previous server stops only once this one is up,
    so a refused start leaves the page as it was."""
    try:
        backend = _start_chosen(choice)
    except ServerError as error:
        st.session_state["start_failed"] = f"Could not start the server: {error}"
        return
    if previous := st.session_state.get("backend"):
        previous.stop()
    st.session_state["backend"] = backend
    st.session_state["url"] = backend.url
    st.session_state["api_key"] = _schema_key(backend.folder)
    st.session_state.pop("result", None)
    st.session_state["started"] = f"Started a server for {backend.folder.name} at {backend.url}"


def _schema_key(folder: Path) -> str:
    """The key of a server started here: the one its schema.yaml declares, if any."""
    try:
        return load_schema(folder / SCHEMA_NAME).parameters.api_key or ""
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
        choice = st.selectbox("Policy to serve", [*list(_bundled()), UPLOAD], key="start_choice")
        if choice == UPLOAD:
            st.text_input("Policy name", value="uploaded", key="upload_name")
            st.file_uploader("saved_model.zip", type=["zip"], key="upload_zip")
            st.file_uploader("schema.yaml", type=["yaml", "yml"], key="upload_yaml")
        st.button("Start the server from schema", on_click=_on_start, args=(choice,))
    if failed := st.session_state.pop("start_failed", None):
        st.sidebar.error(failed)
    if started := st.session_state.pop("started", None):
        st.sidebar.success(started)
    return PolicyClient(url, key)


def choose_target(client: PolicyClient) -> Target:
    """The policy and version to query: pickers from `GET /policies`, when the server has it."""
    listing = client.policies()
    if listing is None:
        return Target()
    policies = {policy["name"]: policy for policy in listing["policies"]}
    if not policies:
        raise ServerError("the server serves no policy yet")
    names = list(policies)
    default = names.index(listing["default"]) if listing.get("default") in names else 0
    name = st.sidebar.selectbox("Policy", names, index=default, key="policy")
    versions = policies[name]["versions"]
    ready = [version["version"] for version in versions if version["state"] == "ready"]
    version = st.sidebar.selectbox("Version", [TRAFFIC_SPLIT, *ready], key="version")
    st.sidebar.caption("  \n".join(_version_line(version) for version in versions))
    return Target(name, None if version == TRAFFIC_SPLIT else version)


def _version_line(version: dict[str, Any]) -> str:
    line = f"`{version['version']}` {version['state']}, {version.get('traffic') or 0:g}% traffic"
    if version.get("shadow"):
        line += ", shadow"
    if version.get("reason"):
        line += f": {version['reason']}"
    return line


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


def observation_form(info: dict[str, Any]) -> tuple[dict[str, Any], bool]:
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
        label = "Get prediction"
        if info.get("recurrent"):
            st.number_input(
                "Reward since the previous step",
                value=0.0,
                key="episode_reward",
                help="Sent as the envelope's `reward`: logged for the previous decision and "
                "fed to the policy as its previous reward.",
            )
            label = "Step the episode"
        submitted = st.form_submit_button(label, type="primary")
    return body, submitted


def episode_controls(client: PolicyClient, info: dict[str, Any]) -> EpisodeStepper | None:
    """A recurrent policy's episode: the server holds its state between steps."""
    if not info.get("recurrent"):
        return None
    stepper: EpisodeStepper | None = st.session_state.get("episode")
    if stepper is None:
        stepper = st.session_state["episode"] = EpisodeStepper(f"ui-{uuid.uuid4().hex[:12]}")
    recurrent = info["recurrent"]
    st.info(
        f"A recurrent policy (state of {recurrent['state_size']} values): each step of "
        f"episode `{stepper.episode_id}` continues from the state the server holds."
    )
    if st.button("End the episode and start a new one"):
        try:
            stepper.end(client)
        except ServerError as error:
            st.error(f"Could not end the episode: {error}")
        st.session_state["episode"] = EpisodeStepper(f"ui-{uuid.uuid4().hex[:12]}")
        st.session_state.pop("result", None)
        st.rerun()
    return stepper


def _check_lengths(info: dict[str, Any], body: dict[str, Any]) -> str | None:
    for field in info["observations"]:
        values = body.get(field["name"])
        if isinstance(values, list):
            low, high = field.get("min_items"), field.get("max_items")
            if (low is not None and len(values) < low) or (high is not None and len(values) > high):
                wanted = f"between {low or 0} and {high or 'any'}"
                return f"{field['name']} needs {wanted} values, has {len(values)}"
    return None


def predict(
    client: PolicyClient,
    target: Target,
    info: dict[str, Any],
    body: dict[str, Any],
    episode: EpisodeStepper | None = None,
) -> dict[str, Any]:
    """The prediction and the distribution, both from the version that answered the
    prediction: under a traffic split two requests could reach two versions."""
    if episode is not None:
        route = "/predict" if info["observations"] else "/predict_raw"
        reward = float(st.session_state.get("episode_reward", 0.0))
        return episode.step(client, target, route, body, reward)
    prediction = client.post(target, "/predict" if info["observations"] else "/predict_raw", body)
    answered = target
    if target.policy is not None and prediction.get("version") is not None:
        answered = Target(target.policy, str(prediction["version"]))
    distribution = client.post(answered, "/distribution", body)
    return {"target": target, "prediction": prediction, "distribution": distribution}


def readable_number(number: float) -> str:
    """Four decimals, or scientific notation where those would show 0.0000 (a joint
    probability over many tuple components is often tiny, its log near 0 for a sure one)."""
    if number == 0 or abs(number) >= 1e-3:
        return f"{number:.4f}"
    return f"{number:.3e}"


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
                    tooltip=["action", alt.Tooltip("probability:Q", format=".4~g")],
                )
            )
            column.altair_chart(chart)
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
    st.altair_chart(bars + errors)


def show_result(result: dict[str, Any]) -> None:
    prediction, distribution = result["prediction"], result["distribution"]
    st.subheader("Prediction")
    if prediction.get("policy") is not None:
        st.caption(
            f"Answered by policy **{prediction['policy']}** version `{prediction['version']}`"
        )
    action, probability, log_probability, value = st.columns(4)
    action.metric("Action", ", ".join(str(a) for a in prediction["actions"]))
    probability.metric("Probability", readable_number(prediction["probability"]))
    if prediction.get("log_probability") is not None:
        log_probability.metric("Log-probability", readable_number(prediction["log_probability"]))
    if prediction.get("value") is not None:
        value.metric("Value estimate", f"{prediction['value']:.3f}")
    if prediction.get("episode_id") is not None:
        origin = {"held": "the state the server held", "initial": "zeros (a new episode)"}
        note = " The episode's earlier state was lost." if prediction.get("state_reset") else ""
        st.caption(
            f"Step {prediction['step']} of episode `{prediction['episode_id']}`, from "
            f"{origin.get(prediction.get('episode_state', ''), 'the state given')}.{note}"
        )
    distribution_charts(distribution)


def show_rollout(document: dict[str, Any]) -> None:
    """A policy's rollout: its state, weights and evidence, the interval of the value
    difference over the rewarded units, and its history."""
    evidence = document["evidence"]
    st.subheader("Rollout")
    st.caption(
        f"Candidate `{document['candidate']}` against incumbent `{document['incumbent']}`: "
        f"**{document['state']}**, {document['weight']:g}% of the traffic to the candidate"
    )
    state, estimate, lower, upper = st.columns(4)
    state.metric("State", document["state"])
    for column, name in ((estimate, "estimate"), (lower, "lower"), (upper, "upper")):
        value = evidence.get(name)
        column.metric(f"Difference {name}", "—" if value is None else f"{value:.4g}")
    rewarded = ", ".join(f"{v}: {n}" for v, n in evidence["rewarded"].items())
    missing = ", ".join(f"{v}: {n}" for v, n in evidence["missing"].items())
    st.caption(f"Rewarded units {rewarded}; missing (no reward by the cutoff) {missing}")
    trace = [p for p in evidence.get("trace", []) if p["estimate"] is not None]
    if trace:
        st.line_chart(
            {
                "rewarded units": [p["rewarded"] for p in trace],
                "lower": [p["lower"] for p in trace],
                "estimate": [p["estimate"] for p in trace],
                "upper": [p["upper"] for p in trace],
            },
            x="rewarded units",
            y=["lower", "estimate", "upper"],
        )
    st.table(
        [
            {"from": h["from"] or "", "to": h["to"], "reason": h["reason"]}
            for h in document["history"]
        ]
    )


def explain(error: ServerError, key: str) -> None:
    """Why there is no form yet: no server, a key to type, or the server's refusal."""
    if error.status is None:
        st.warning(
            f"No policy server answers yet: {error}. Set the server URL in the sidebar, or "
            "start a server from a schema."
        )
    elif error.status in (401, 403) and not key:
        st.info("This server needs an API key: enter it in the sidebar.")
    else:
        st.error(f"Cannot read the policy's schema: {error}")


def main() -> None:
    st.set_page_config(page_title="Policy server", layout="wide")
    st.title("Try a policy")
    client = sidebar()
    try:
        target = choose_target(client)
        info = client.schema(target)
    except ServerError as error:
        explain(error, client.key)
        return
    st.caption(
        f"Policy **{info['name']}** version `{info['version']}` ({info['runtime']}), "
        f"action space {info['action_space']}"
    )
    episode = episode_controls(client, info)
    body, submitted = observation_form(info)
    if submitted:
        st.session_state.pop("result", None)
        if problem := _check_lengths(info, body):
            st.error(problem)
        else:
            try:
                st.session_state["result"] = predict(client, target, info, body, episode)
            except ServerError as error:
                st.error(f"The server refused the observation: {error}")
    result = st.session_state.get("result")
    if result is not None and result["target"] == target:
        show_result(result)
    if target.policy is not None:
        try:
            document = client.rollout(target.policy)
        except ServerError as error:
            st.error(f"Cannot read the rollout: {error}")
        else:
            if document is not None:
                show_rollout(document)


if __name__ == "__main__":
    main()
