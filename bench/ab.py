"""Short A/B alternations on a busy machine: servers started side by side, measured in turn,
a few seconds each, several rounds; ratios within a round are what count.

    python bench/ab.py --server before=/work/main/src --server after=src --ceiling \
        --rounds 5 --seconds 4 [--flags "--workers 1"] [--decision-log]

Each `--server LABEL=SRC[::FLAGS]` runs policy-server from the source folder SRC (its
PYTHONPATH) on the first target of bench/harness.py, with FLAGS added (`{tmp}` is a fresh
folder, e.g. `::--decision-log {tmp}`); `--ceiling` and `--bare` add the FastAPI constant and
the bare-ASGI app. Prints every round, the medians, the ratios to the first server, and the
machine's load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from harness import BENCH, OUT, PYTHON, Server, targets, wrk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--server", action="append", default=[], help="LABEL=SRC, or LABEL=SRC::EXTRA FLAGS"
    )
    parser.add_argument("--flags", default="--workers 1", help="flags for every policy-server")
    parser.add_argument("--ceiling", action="store_true")
    parser.add_argument("--bare", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--path", default="/predict")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    target = targets()[0]
    cache = Path(tempfile.mkdtemp(prefix="ab-cache-"))
    servers: dict[str, Server] = {}
    for spec in args.server:
        label, src = spec.split("=", 1)
        src, _, extra = src.partition("::")
        folder = Path(tempfile.mkdtemp(prefix=f"ab-{label}-"))
        flags = [part.replace("{tmp}", str(folder)) for part in (args.flags + " " + extra).split()]
        command = [PYTHON, "-m", "policy_server.hosting.cli", "serve", str(target.path)]
        command += ["--port", "{port}", "--cache-dir", str(cache), "--log-level", "warning"]
        command += ["--metrics-port", "0", "--client-languages", "", *flags]
        env = {"PYTHONPATH": str(Path(src).resolve())}
        servers[label] = Server(command, ("/predict", target.observation, target.key), env)
    if args.ceiling:
        command = [PYTHON, str(BENCH / "references" / "ceiling.py"), str(target.path), "{port}"]
        servers["ceiling"] = Server(command, ("/predict", target.observation, target.key))
    if args.bare:
        command = [PYTHON, str(BENCH / "references" / "bare_asgi.py"), "{port}"]
        servers["bare"] = Server(command, ("/predict", target.observation, target.key))
    rates: dict[str, list[float]] = {label: [] for label in servers}
    p99s: dict[str, list[float]] = {label: [] for label in servers}
    before = os.getloadavg()
    try:
        for server in servers.values():
            server.start()
            server.warm_up(args.path, target.observation, 2)
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            line = []
            for label in order:
                server = servers[label]
                load = wrk(
                    server.url + args.path,
                    target.observation,
                    target.key,
                    args.connections,
                    args.seconds,
                )
                rates[label].append(load.requests_per_s)
                p99s[label].append(load.p99_ms)
                line.append(f"{label} {load.requests_per_s:,.0f}/s p99 {load.p99_ms:.2f} ms")
            print(f"round {round_ + 1}: " + "; ".join(line), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    after = os.getloadavg()
    first = next(iter(servers))
    print(f"load average before {before[0]:.1f}, after {after[0]:.1f} ({os.cpu_count()} cores)")
    for label in servers:
        ratios = [r / f for r, f in zip(rates[label], rates[first], strict=True)]
        print(
            f"{label}: median {statistics.median(rates[label]):,.0f}/s, "
            f"p99 median {statistics.median(p99s[label]):.2f} ms, "
            f"vs {first} per round {', '.join(f'{r:.2f}' for r in ratios)} "
            f"(median {statistics.median(ratios):.2f}x)"
        )


if __name__ == "__main__":
    main()
