"""Recurrent steps against non-recurrent predictions, in one run (issue #20's target: a
recurrent step at 32 connections at least 0.7x a non-recurrent /predict of the same size).

The recurrent policy is the real RLlib LSTM export (../shared/rllib-exports/cartpole_lstm,
4 observations, Discrete(2), 16 cells); each request is one step of one of 32 episodes (an
envelope with `episode_id` and `reward`), so every call reads and writes an episode's state.
The references, measured by the same wrk on the same machine one after the other:
- the bundled CartPole example's /predict (4 observations, Discrete(2), a 16-unit MLP): a
  non-recurrent policy of the same size;
- the LSTM's own /predict without an episode (the initial state, nothing held): what
  holding the state costs on top of running the recurrent model.
Both with --workers 1 and with the default workers, where the state is shared through the
episode store's SQLite file. Prints the figures and writes bench/out/recurrent.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from harness import OUT, ROOT, Load, Target, ours, parse_wrk, targets

RESULTS = Path(__file__).with_name("RESULTS.md")

LSTM = ROOT.parent / "shared" / "rllib-exports" / "cartpole_lstm"
OBSERVATION = {
    "cart_position": 0.01,
    "cart_velocity": -0.2,
    "pole_angle": 0.03,
    "pole_angular_velocity": 0.4,
}
EPISODES = 32


def step_script(key: str) -> Path:
    """wrk posts a step of one of EPISODES episodes per request, round robin."""
    body = json.dumps({"observation": OBSERVATION, "episode_id": "EPISODE", "reward": 1.0})
    head, tail = body.split('"EPISODE"')
    script = OUT / "recurrent-step.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["access-token"] = "{key}"\n'
        "local count = 0\n"
        "request = function()\n"
        "  count = count + 1\n"
        f'  local id = "\\"e" .. (count % {EPISODES}) .. "\\""\n'
        f"  return wrk.format(nil, nil, nil, [==[{head}]==] .. id .. [==[{tail}]==])\n"
        "end\n"
    )
    return script


def run_wrk(url: str, script: Path, connections: int, duration: int) -> Load:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s"]
    command += ["--latency", "-s", str(script), url]
    return parse_wrk(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def post_script(body: Any, key: str, name: str) -> Path:
    script = OUT / f"recurrent-{name}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["access-token"] = "{key}"\n'
        f"wrk.body = [==[{json.dumps(body)}]==]\n"
    )
    return script


def measure(duration: int, workers: str) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=OUT))
    lstm = Target("cartpole_lstm", LSTM, "1234567asdfgh", OBSERVATION)
    mlp = next(t for t in targets() if t.path.name == "cartpole")
    flags = ("--workers", workers) if workers else ()
    figures: dict[str, Any] = {}
    server = ours(lstm, cache, *flags)
    server.start()
    try:
        step = step_script(lstm.key)
        server.warm_up()
        run_wrk(server.url + "/predict", step, 32, 2)  # the steps' own warm-up
        figures["recurrent_step_c32"] = run_wrk(server.url + "/predict", step, 32, duration)
        flat = post_script(OBSERVATION, lstm.key, "flat")
        figures["recurrent_no_episode_c32"] = run_wrk(server.url + "/predict", flat, 32, duration)
    finally:
        server.stop()
    server = ours(mlp, cache, *flags)
    server.start()
    try:
        server.warm_up()
        flat = post_script(mlp.observation, mlp.key, "mlp")
        figures["mlp_predict_c32"] = run_wrk(server.url + "/predict", flat, 32, duration)
    finally:
        server.stop()
    step_rate = figures["recurrent_step_c32"].requests_per_s
    figures["step_vs_mlp"] = step_rate / figures["mlp_predict_c32"].requests_per_s
    figures["step_vs_no_episode"] = step_rate / figures["recurrent_no_episode_c32"].requests_per_s
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument(
        "--workers", nargs="*", default=["1", ""], help="worker counts ('' for the default)"
    )
    arguments = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not (LSTM / "saved_model.zip").is_file():
        print(f"recurrent: skipped, {LSTM} is absent")
        return
    results = {}
    for workers in arguments.workers:
        label = f"workers {workers or 'default'}"
        results[label] = measure(arguments.duration, workers)
        print(label, json.dumps(results[label], default=vars, indent=1), flush=True)
    (OUT / "recurrent.json").write_text(json.dumps(results, default=vars, indent=1))
    write_results(results)


def write_results(results: dict[str, Any]) -> None:
    """The section `## Recurrent steps` of bench/RESULTS.md (after what bench/run.py wrote)."""
    lines = [
        "## Recurrent steps (`bench/recurrent.py`)",
        "",
        "The real RLlib LSTM export (cartpole_lstm), 32 episodes stepped round robin with the "
        "envelope, `POST /predict`, 32 connections, against the bundled CartPole MLP's `/predict` "
        "(a non-recurrent policy of the same size) and the LSTM's own `/predict` without an "
        "episode (the initial state, nothing held), in the same run:",
        "",
        "| workers | step requests/s | p99 ms | MLP requests/s | no episode requests/s "
        "| step vs MLP | step vs no episode | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    targets = []
    for label, f in results.items():
        step, mlp = f["recurrent_step_c32"], f["mlp_predict_c32"]
        none = f["recurrent_no_episode_c32"]
        lines.append(
            f"| {label.removeprefix('workers ')} | {step.requests_per_s:,.0f} | {step.p99_ms:.2f} "
            f"| {mlp.requests_per_s:,.0f} | {none.requests_per_s:,.0f} | {f['step_vs_mlp']:.2f}x "
            f"| {f['step_vs_no_episode']:.2f}x | {step.errors} |"
        )
        verdict = "met" if f["step_vs_mlp"] >= 0.7 else "**missed**"
        targets.append(
            f"| a recurrent step >= 0.7x a non-recurrent `/predict` ({label}) "
            f"| {f['step_vs_mlp']:.2f}x | {verdict} |"
        )
    lines += ["", "| target | this run | verdict |", "|---|---|---|", *targets]
    text = RESULTS.read_text() if RESULTS.exists() else ""
    marker = "## Recurrent steps"
    if marker in text:
        text = text[: text.index(marker)]
    RESULTS.write_text(text.rstrip() + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
