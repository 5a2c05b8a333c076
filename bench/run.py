"""`make bench`: the project's server against references built and run in the same run.

Measures with wrk over loopback: /predict requests/s and p50/p99 latency at 1 and 32
connections, /predict_batch observations/s (1,000 observations a request), cold start
(process start to the first 200, ONNX cache cold and warm) and the server's peak memory.
Writes bench/RESULTS.md with every figure as a ratio to the references.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from features import measure_features
from harness import BENCH, OUT, PYTHON, Load, Server, Target, machine, ours, source, targets, wrk
from peers import measure_peers, measure_side_by_side


def measure_target(target: Target, duration: int, first: bool) -> dict[str, Any]:
    figures: dict[str, Any] = {"notes": {}}
    cache = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=OUT))
    cold = ours(target, cache)
    figures["cold_start_cold_cache_s"] = cold.start()
    cold.stop()
    server = ours(target, cache)
    figures["cold_start_warm_cache_s"] = server.start()
    server.warm_up()
    try:
        for connections in (1, 32):
            figures[f"ours_c{connections}"] = wrk(
                server.url + "/predict", target.observation, target.key, connections, duration
            )
        batch = {"observations": [target.observation] * 1000}
        load = wrk(server.url + "/predict_batch", batch, target.key, 2, duration)
        figures["batch"] = load
        figures["batch_observations_per_s"] = load.requests_per_s * 1000
        figures["peak_memory_mb"] = server.peak_memory_mb()
    finally:
        server.stop()
    references = {
        "original": Server(
            [
                PYTHON,
                str(BENCH / "references" / "original.py"),
                str(target.path),
                "{port}",
                str(cache / "original"),
            ],
            ("/predict", target.observation, target.key),
            {"TF_CPP_MIN_LOG_LEVEL": "3"},
        ),
        "ceiling": Server(
            [PYTHON, str(BENCH / "references" / "ceiling.py"), str(target.path), "{port}"],
            ("/predict", target.observation, target.key),
        ),
    }
    for name, reference in references.items():
        reference.start()
        reference.warm_up()
        try:
            for connections in (1, 32):
                figures[f"{name}_c{connections}"] = wrk(
                    reference.url + "/predict",
                    target.observation,
                    target.key,
                    connections,
                    duration,
                )
            figures[f"{name}_peak_memory_mb"] = reference.peak_memory_mb()
        finally:
            reference.stop()
    if first:
        figures |= measure_ray(target, cache, duration)
        for part in (
            measure_side_by_side(target, cache, duration),
            measure_peers(target, cache, duration),
            measure_features(target, cache, duration),
        ):
            figures["notes"] |= part.pop("notes")
            figures |= part
    shutil.rmtree(cache, ignore_errors=True)
    return figures


def measure_ray(target: Target, cache: Path, duration: int) -> dict[str, Any]:
    """The Ray backend (one replica) against reference (c), the original design with Ray."""
    figures: dict[str, Any] = {}
    server = ours(target, cache, "--backend", "ray", "--ray-replica-cpus", "1")
    reference = Server(
        [PYTHON, str(BENCH / "references" / "original_ray.py"), str(target.path), "{port}"],
        ("/predict", target.observation, target.key),
        {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    for name, process in (("ours_ray", server), ("original_ray", reference)):
        process.start()
        process.warm_up()
        try:
            for connections in (1, 32):
                figures[f"{name}_c{connections}"] = wrk(
                    process.url + "/predict", target.observation, target.key, connections, duration
                )
        finally:
            process.stop()
            time.sleep(3)  # let the local Ray instance go before the next one starts
    return figures


def _loads(saved: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """results.json back into figures: wrk measurements become Load objects again."""
    fields = {field.name for field in dataclasses.fields(Load)}
    return {
        name: {
            key: Load(**value) if isinstance(value, dict) and set(value) == fields else value
            for key, value in figures.items()
        }
        for name, figures in saved.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite RESULTS.md from the last run's bench/out/results.json",
    )
    arguments = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    from report import render

    if arguments.render:
        saved = json.loads((OUT / "results.json").read_text())
        if "targets" not in saved:  # a run saved before the run's own figures were kept
            saved = {"targets": saved, "machine": machine(), "duration": arguments.duration}
        text = render(
            _loads(saved["targets"]), saved["machine"], saved["duration"], saved.get("minutes")
        )
        arguments.out.write_text(text)
        return
    started = time.perf_counter()
    results = {}
    for index, target in enumerate(targets()):
        print(f"== {target.name}", flush=True)
        # Ray, the peers and the features are measured on the first policy only: each Ray
        # start costs tens of seconds, and the table is mouse_and_cheese's.
        results[target.name] = measure_target(target, arguments.duration, first=index == 0)
        print(json.dumps(results[target.name], default=vars, indent=1), flush=True)
    run = {
        "machine": f"{machine()}; {source()}",
        "duration": arguments.duration,
        "minutes": (time.perf_counter() - started) / 60,
        "targets": results,
    }
    (OUT / "results.json").write_text(json.dumps(run, default=vars, indent=1))
    text = render(results, run["machine"], arguments.duration, run["minutes"])
    arguments.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
