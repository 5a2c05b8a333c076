"""Where a request's time goes: a sampling profile (py-spy) of one policy-server process
under the recorded workload (mouse_and_cheese, typed `POST /predict`, key checked, wrk with
32 connections), summed by part of the request path.

    python bench/profile.py [--src SRC] [--label LABEL] [--flags "--decision-log {tmp}"]

Starts `policy-server serve --workers 1` from SRC (default: this checkout's src/), measures
its requests/s under load without the profiler, then samples its event loop's thread with
py-spy while the same load runs. Each sample is put where its innermost frame is (self
time); a part's microseconds per request are its share of the samples times the time of one
request at the unprofiled rate (the loop's thread is busy in nearly every sample under this
load). Prints a Markdown table for bench/COMPONENTS.md, and the top functions by self and
inclusive time; the raw profile is kept in bench/out/.

py-spy comes with the `bench` extra (`make bench` installs it); it needs ptrace rights (root, or
`kernel.yama.ptrace_scope=0`).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import OUT, PYTHON, ROOT, Server, process_tree, targets, wrk

# Parts of the request path, by file. A sample belongs to the part of its innermost frame
# that names one: a frame of numpy or the standard library counts for its caller's part.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("decision log (experience/)", ("policy_server/experience/",)),
    ("model call: ONNX Runtime", ("onnxruntime/", "policy_server/runtime/")),
    (
        "service: batcher, decision, sampling, ids",
        (
            "policy_server/serving/",
            "policy_server/policy/distribution.py",
        ),
    ),
    ("metrics and observers", ("prometheus_client/", "policy_server/metrics.py")),
    (
        "front: request id, limits, HEAD, metrics and access log, route lookup",
        ("policy_server/protocols/rest/middleware/", "policy_server/protocols/routes.py"),
    ),
    (
        "handler: key, body, validation, rows, answer",
        (
            "policy_server/protocols/",
            "policy_server/policy/",
            "pydantic/",
            "pydantic_core/",
            "orjson",
        ),
    ),
    ("Starlette and FastAPI", ("starlette/", "fastapi/")),
    (
        "HTTP server: uvicorn, httptools, the event loop, socket writes",
        (
            "uvicorn/",
            "httptools/",
            "uvloop/",
            "asyncio/runners.py",
            "asyncio/events.py",
            "asyncio/base_events.py",
            "policy_server/hosting/",
        ),
    ),
]
OTHER = "other"


def part_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in PARTS:
            if any(marker in frame for marker in markers):
                return name
    return OTHER


def loop_samples(raw: Path) -> list[tuple[list[str], int]]:
    """The stacks of the event loop's thread (those under asyncio's runner)."""
    stacks = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        if any("Runner.run (asyncio/runners.py)" in f or "run_until_complete" in f for f in frames):
            stacks.append((frames, int(count)))
    return stacks


def summarise(raw: Path, requests_per_s: float) -> str:
    stacks = loop_samples(raw)
    total = sum(count for _, count in stacks)
    if not total:
        return "no samples of the event loop's thread"
    per_request_us = 1e6 / requests_per_s
    parts: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        parts[part_of(frames)] += count
        selfs[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def row(name: str, count: int) -> str:
        share = count / total
        return f"| {name} | {share * per_request_us:,.0f} us ({share:.0%}) |"

    lines = [
        f"requests/s without the profiler: {requests_per_s:,.0f} "
        f"({per_request_us:,.0f} us per request); {total:,} samples of the event loop",
        "",
        "| part (self time; numpy and the standard library count for their caller) | per request |",
        "|---|---|",
    ]
    lines += [row(name, parts[name]) for name, _ in PARTS if parts[name]]
    lines += [row(OTHER, parts[OTHER])] if parts[OTHER] else []
    lines += ["", "Top functions, self time:", ""]
    lines += [row(frame, count) for frame, count in selfs.most_common(25)]
    lines += ["", "Top functions, inclusive (ours, and the stack above them):", ""]
    lines += [
        row(frame, count) for frame, count in inclusive.most_common(80) if count < total * 0.995
    ][:45]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=str(ROOT / "src"), help="the policy-server source")
    parser.add_argument("--label", default="profile")
    parser.add_argument("--flags", default="", help="more flags for `serve` ({tmp}: a folder)")
    parser.add_argument("--seconds", type=int, default=8, help="profiled seconds")
    parser.add_argument("--rate", type=int, default=500, help="samples per second")
    parser.add_argument("--path", default="/predict")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    OUT.mkdir(exist_ok=True)
    target = targets()[0]
    folder = tempfile.mkdtemp(prefix=f"profile-{args.label}-", dir=OUT)
    flags = [part.replace("{tmp}", folder) for part in args.flags.split()]
    command = [PYTHON, "-m", "policy_server.hosting.cli", "serve", str(target.path)]
    command += ["--port", "{port}", "--cache-dir", str(OUT / "profile-cache")]
    command += ["--log-level", "warning", "--metrics-port", "0", "--client-languages", ""]
    command += ["--grpc-port", "0", "--workers", "1", *flags]
    server = Server(command, ("/predict", target.observation, target.key), {"PYTHONPATH": args.src})
    server.start()
    try:
        server.warm_up(seconds=3)
        url = server.url + args.path
        unprofiled = wrk(url, target.observation, target.key, 32, args.seconds)
        assert server.process is not None
        # Under `--workers 1` the serving process may run the app itself or in one child.
        pids = process_tree(server.process.pid)
        pid = pids[-1]
        raw = OUT / f"profile-{args.label}.txt"
        load = threading.Thread(
            target=wrk, args=(url, target.observation, target.key, 32, args.seconds + 4)
        )
        load.start()
        time.sleep(2)
        record = [spy, "record", "-p", str(pid), "-d", str(args.seconds)]
        record += ["-r", str(args.rate), "--format", "raw", "-o", str(raw)]
        subprocess.run(record, check=True, capture_output=True)
        load.join()
    finally:
        server.stop()
    print(f"## {args.label}\n")
    print(summarise(raw, unprofiled.requests_per_s))
    print(f"\nraw profile: {raw.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
