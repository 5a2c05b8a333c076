"""How /predict's throughput grows with `policy-server serve --workers N`, for a machine with
more cores than the 2 that `make bench` runs on. Writes bench/SCALING.md (or --out), which
bench/RESULTS.md includes when it is rendered.

    python bench/scaling.py [--workers 1,2,4,8] [--duration 10] [--shared DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from features import ServeFlags, not_available
from harness import OUT, SHARED, Load, machine, ours, targets, wrk
from report import SCALING


def measure(args: argparse.Namespace) -> dict[str, Any]:
    target = targets(args.shared)[0]
    cache = args.cache or Path(tempfile.mkdtemp(prefix="scaling-cache-", dir=OUT))
    figures: dict[str, Any] = {"target": target.name, "machine": machine(), "loads": {}}
    if "--workers" not in ServeFlags():
        figures["note"] = not_available("--workers")
        return figures
    converting = ours(target, cache)  # the first start converts; workers then load ONNX
    try:
        converting.start()
    finally:
        converting.stop()
    for count in args.workers:
        server = ours(target, cache, "--workers", str(count))
        try:
            server.start()
            server.warm_up(seconds=args.warm_up)
            for connections in args.connections:
                load = wrk(
                    server.url + "/predict",
                    target.observation,
                    target.key,
                    connections,
                    args.duration,
                    threads=args.threads,
                )
                figures["loads"][f"{count}/{connections}"] = load
                print(count, connections, load, flush=True)
        finally:
            server.stop()
    return figures


def render(figures: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Throughput against workers (`bench/scaling.py`), {figures['target']} `POST /predict`, "
        f"wrk {args.threads} threads, {args.duration} s per measurement, on: "
        f"{figures['machine']}.",
        "",
    ]
    if "note" in figures:
        return "\n".join([*lines, f"- {figures['note']}", ""])
    loads: dict[str, Load] = figures["loads"]
    lines += [
        "| workers | connections | requests/s | p50 ms | p99 ms | vs 1 worker | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, load in loads.items():
        count, connections = key.split("/")
        one = loads.get(f"1/{connections}")
        ratio = f"{load.requests_per_s / one.requests_per_s:.2f}x" if one else "-"
        lines.append(
            f"| {count} | {connections} | {load.requests_per_s:,.0f} | {load.p50_ms:.2f} "
            f"| {load.p99_ms:.2f} | {ratio} | {load.errors} |"
        )
    eight, one = loads.get("8/32"), loads.get("1/32")
    if eight and one:
        ratio = eight.requests_per_s / one.requests_per_s
        verdict = "met" if ratio >= 6 else "**missed**"
        lines += [
            "",
            "| target | this run | verdict |",
            "|---|---|---|",
            f"| 8 workers >= 6x one worker (32 connections) | {ratio:.2f}x | {verdict} |",
        ]
    return "\n".join([*lines, ""])


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=_numbers, default=[1, 2, 4, 8])
    parser.add_argument("--connections", type=_numbers, default=[32, 128])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--threads", type=int, default=4, help="wrk threads")
    parser.add_argument("--warm-up", type=int, default=10, help="seconds of load before measuring")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the Pathmind policies")
    parser.add_argument("--cache", type=Path, help="a warm ONNX cache to reuse")
    parser.add_argument("--out", type=Path, default=SCALING)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    figures = measure(args)
    (OUT / "scaling.json").write_text(json.dumps(figures, default=vars, indent=1))
    args.out.write_text(render(figures, args))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
