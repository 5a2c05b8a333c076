"""The envelope's own routes (`/step`, `/step_batch`, `/step_deterministic`,
`/step_distribution`, per policy and pinned to a version), which the SDKs call with a `Step`;
and the flat routes, which still take the envelope as they always did."""

from tests.servers import RunningServer

OBSERVATION = {
    "cart_position": 0.0,
    "cart_velocity": 0.1,
    "pole_angle": 0.05,
    "pole_angular_velocity": 0.2,
}
STEP = {"observation": OBSERVATION, "episode_id": "robot-7", "action_mask": [[True, False]]}


def test_steps_are_answered_with_their_episode_and_mask(example_server: RunningServer) -> None:
    with example_server.client() as client:
        version = client.get("/schema").json()["version"]
        sampled = client.post("/step", json=STEP)
        mode = client.post("/step_deterministic", json=STEP)
        distribution = client.post("/step_distribution", json=STEP)
        batch = client.post("/step_batch", json={"observations": [STEP, {**STEP, "step": 9}]})
        mine = client.post("/policies/cartpole/step", json=STEP)
        pinned = client.post(f"/policies/cartpole/versions/{version}/step", json=STEP)
        raw = client.post("/step", json={**STEP, "observation": {"obs": [0.0, 0.1, 0.05, 0.2]}})
    for answer in (sampled, mode, mine, pinned, raw):
        assert answer.status_code == 200, answer.text
        assert answer.json()["actions"] == [0] and answer.json()["probability"] == 1.0
        assert answer.json()["episode_id"] == "robot-7"
    assert distribution.json()["probabilities"] == [[1.0, 0.0]]
    assert [p["step"] for p in batch.json()["predictions"]][1] == 9
    assert pinned.json()["version"] == version


def test_the_flat_routes_still_take_the_envelope_and_the_flat_body(
    example_server: RunningServer,
) -> None:
    with example_server.client() as client:
        flat = client.post("/predict", json=OBSERVATION)
        enveloped = client.post("/predict", json=STEP)
        deterministic = client.post("/predict_deterministic", json={"obs": [0, 0.1, 0.05, 0.2]})
    assert flat.status_code == enveloped.status_code == deterministic.status_code == 200
    assert enveloped.json()["actions"] == [0] and enveloped.json()["episode_id"] == "robot-7"


def test_a_bad_step_is_a_422_naming_the_field(example_server: RunningServer) -> None:
    with example_server.client() as client:
        missing = client.post("/step", json={"episode_id": "robot-7"})
        wrong = client.post("/step", json={**STEP, "observation": {**OBSERVATION, "pole": 1}})
    assert missing.status_code == wrong.status_code == 422
    assert "pole" in wrong.text


def test_the_step_routes_come_after_every_other(example_server: RunningServer) -> None:
    """Routes are matched in order (the document lists them in that order): the flat routes'
    requests never try the envelope's routes first."""
    with example_server.client() as client:
        paths = list(client.get("/openapi.json").json()["paths"])
    steps = [i for i, path in enumerate(paths) if path.rsplit("/", 1)[-1].startswith("step")]
    assert steps and min(steps) == len(paths) - len(steps)
