"""`make soak`: minutes of mixed traffic against one server, watching for leaks.

wrk at 32 connections rotates through the prediction routes (typed, raw, deterministic,
distribution, batch) of several policies served from one repository folder; halfway, one
policy is added, another removed and `POST /admin/reload` is sent. The server's process (and
its workers) is read from /proc every few seconds: resident memory, open file descriptors,
threads. Passes with zero errors, resident memory growing less than 10% after the warm-up,
and no more descriptors or threads at the end than after the warm-up. Writes bench/SOAK.md
and puts it at the end of bench/RESULTS.md. Not part of `make test`.

    python bench/soak.py [--minutes 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from features import (
    ADMIN_KEY,
    ServeFlags,
    add_policy,
    policy_stem,
    post_reload,
    ready_route,
    repository_server,
)
from harness import (
    BENCH,
    OUT,
    Server,
    Target,
    machine,
    ours,
    parse_wrk,
    process_tree,
    source,
    targets,
)
from report import SOAK

ROUTES = ("predict", "predict_raw", "predict_deterministic", "distribution", "predict_batch")
MARKER = "## Soak"


def bodies(target: Target) -> dict[str, Any]:
    """A body for each route; the raw one holds the observation's values in schema order."""
    values = [float(v) for value in target.observation.values() for v in _flat(value)]
    return {
        "predict": target.observation,
        "predict_raw": {"obs": values},
        "predict_deterministic": target.observation,
        "distribution": target.observation,
        "predict_batch": {"observations": [target.observation] * 16},
    }


def _flat(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def routes(url: str, names: list[str]) -> dict[str, dict[str, str]]:
    """Per policy name, the path of each route, read from the server's OpenAPI."""
    paths = httpx.get(url + "/openapi.json", timeout=10).json()["paths"]
    posts = [path.strip("/").split("/") for path, ops in paths.items() if "post" in ops]
    found: dict[str, dict[str, str]] = {}
    for name in names:
        found[name] = {}
        for route in ROUTES:
            named = [p for p in posts if p[-1] == route and name in p]
            templated = [p for p in posts if p[-1] == route and any(s[:1] == "{" for s in p)]
            if named:
                found[name][route] = "/" + "/".join(named[0])
            elif templated:
                parts = [name if s[:1] == "{" else s for s in templated[0]]
                found[name][route] = "/" + "/".join(parts)
            elif [route] in posts and len(names) == 1:
                found[name][route] = "/" + route
    return found


def answered(
    server: Server, requests: list[tuple[str, str, Any]]
) -> tuple[list[tuple[str, str, Any]], list[str]]:
    """The requests that answer 200 before the soak, and the others with their status."""
    kept, skipped = [], []
    for path, key, body in requests:
        response = httpx.post(server.url + path, json=body, headers={"access-token": key})
        if response.status_code == 200:
            kept.append((path, key, body))
        else:
            skipped.append(f"{path} ({response.status_code})")
    return kept, skipped


def lua_script(requests: list[tuple[str, str, Any]]) -> Path:
    """A wrk script that sends the requests (path, key, body) in turn."""
    entries = ",\n".join(
        f'  wrk.format("POST", "{path}", {{["Content-Type"] = "application/json", '
        f'["access-token"] = "{key}"}}, [==[{json.dumps(body)}]==])'
        for path, key, body in requests
    )
    script = OUT / "soak.lua"
    script.write_text(
        "local requests = {}\n"
        "local index = 0\n"
        f"init = function(args)\n  requests = {{\n{entries}\n  }}\nend\n"
        "request = function()\n"
        "  index = index % #requests + 1\n"
        "  return requests[index]\n"
        "end\n"
    )
    return script


def sample(pid: int) -> dict[str, float]:
    """Resident memory (MB), open descriptors and threads of the process tree."""
    rss_kb, fds, threads = 0, 0, 0
    for member in process_tree(pid):
        # A worker may exit between the listing and the reading.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            status = Path(f"/proc/{member}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            member_fds = len(list(Path(f"/proc/{member}/fd").iterdir()))
            rss_kb += int(fields["VmRSS"].split()[0])
            threads += int(fields["Threads"])
            fds += member_fds
    return {"rss_mb": rss_kb / 1024, "fds": fds, "threads": threads}


def warm_started(make: Callable[[], Server]) -> Server:
    """A server started with its ONNX cache warm: the first start converts the models with
    TensorFlow, which would stay in that process's memory."""
    converting = make()
    try:
        converting.start()
    finally:
        converting.stop()
    server = make()
    server.start()
    return server


def start(policies: list[Target], cache: Path, flags: ServeFlags) -> tuple[Server, Path | None]:
    """A repository of the policies when the server takes one, else the first policy alone.
    The repository also holds a spare copy of the first that gets no traffic and that the
    reload removes."""
    repository = OUT / "soak-repository"
    shutil.rmtree(repository, ignore_errors=True)
    for index, policy in enumerate([*policies, policies[0]]):
        add_policy(policy, repository, index)
    admin = ["--admin-key", ADMIN_KEY] if "--admin-key" in flags else []
    try:
        server = warm_started(lambda: repository_server(policies[0], cache, repository, *admin))
        return server, repository
    except RuntimeError as error:
        print(f"a repository does not start ({error}); soaking the first policy alone")
        return warm_started(lambda: ours(policies[0], cache)), None


def soak(minutes: float, interval: float) -> dict[str, Any]:
    first = targets()[0]
    # Several policies: copies of the first under different names, and the bundled example.
    policies = [first, first, targets()[-1]] if len(targets()) > 1 else [first] * 3
    cache = Path(tempfile.mkdtemp(prefix="soak-cache-", dir=OUT))
    flags = ServeFlags()
    server, repository = start(policies, cache, flags)
    names = [f"{policy_stem(p)}_{i:02d}" for i, p in enumerate(policies)]
    if repository:
        for name, policy in zip(names, policies, strict=True):
            ready_route(server, policy, name)
    found = routes(server.url, names if repository else ["policy"])
    requests = [
        (path, policy.key, bodies(policy)[route])
        for policy, by_route in zip(policies, found.values(), strict=False)
        for route, path in by_route.items()
    ]
    requests, skipped = answered(server, requests)
    seconds = int(minutes * 60)
    command = ["wrk", "-t1", "-c32", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    load = subprocess.Popen(
        [*command, "-s", str(lua_script(requests)), server.url],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.process is not None
    samples: list[dict[str, float]] = []
    reload: dict[str, Any] = {"done": False}
    started = time.monotonic()
    try:
        while load.poll() is None and time.monotonic() - started < seconds + 60:
            time.sleep(interval)
            elapsed = time.monotonic() - started
            if load.poll() is not None:
                break  # figures after wrk's last connection closed would not compare
            samples.append({"t": elapsed, **sample(server.process.pid)})
            if not reload["done"] and elapsed >= seconds / 2:
                reload = {"t": elapsed} | reload_now(
                    server, first, repository, len(policies), flags
                )
        output, _ = load.communicate(timeout=60)
    finally:
        server.stop()
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "minutes": minutes,
        "interval": interval,
        "load": parse_wrk(output),
        "responses": _responses(output),
        "requests": [path for path, _, _ in requests],
        "skipped": skipped,
        "samples": samples,
        "reload": reload,
    }


def _responses(output: str) -> int:
    for line in output.splitlines():
        if "requests in" in line:
            return int(line.split()[0])
    return 0


def reload_now(
    server: Server, target: Target, repository: Path | None, count: int, flags: ServeFlags
) -> dict[str, Any]:
    if repository is None or "--admin-key" not in flags:
        return {"done": True, "note": "not available: no repository or no --admin-key yet"}
    add_policy(target, repository, count + 1)
    shutil.rmtree(repository / f"{policy_stem(target)}_{count:02d}")
    status, seconds = post_reload(server)
    return {"done": True, "status": status, "seconds": seconds}


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(result: dict[str, Any], warm_up: float) -> str:
    samples = result["samples"]
    base = next((s for s in samples if s["t"] >= warm_up), samples[0])
    reload, last = result["reload"], samples[-1]
    # The first sample after the reload settles: what the second half must not grow from.
    reloaded_at = reload.get("t", 0) + reload.get("seconds", 0)
    settled = next((s for s in samples if s["t"] > reloaded_at), base)
    columns = {"after warm-up": base, "after the reload": settled, "end": last}
    growth = last["rss_mb"] / base["rss_mb"] - 1
    load = result["load"]
    reloaded = (
        f"`POST /admin/reload` at {reload['t']:.0f} s answered {reload['status']} after "
        f"{reload['seconds']:.2f} s (one policy added, one removed)"
        if "status" in reload
        else f"reload: {reload.get('note', 'not sent')}"
    )
    skipped = result["skipped"]
    table = ["| | " + " | ".join(columns) + " | peak |", "|---|---|---|---|---|"]
    for key, label, form in (
        ("rss_mb", "resident memory (MB)", ".1f"),
        ("fds", "open file descriptors", ".0f"),
        ("threads", "threads", ".0f"),
    ):
        values = [format(sample[key], form) for sample in columns.values()]
        peak = format(max(sample[key] for sample in samples), form)
        table.append(f"| {label} | {' | '.join(values)} | {peak} |")
    checks = [
        ("zero errors", f"{load.errors}", load.errors == 0),
        ("resident memory after warm-up grows < 10%", f"{growth:+.1%}", growth < 0.10),
    ]
    for key, label in (("fds", "open file descriptors"), ("threads", "threads")):
        change = f"{last[key] - base[key]:+.0f} ({last[key] - settled[key]:+.0f} after the reload)"
        checks.append((f"no growth in {label}", change, last[key] <= settled[key]))
    return "\n".join(
        [
            MARKER,
            "",
            f"Written by `make soak` (`bench/soak.py`). Machine: {machine()}; {source()}.",
            "",
            f"{result['minutes']:g} minutes, wrk 1 thread, 32 connections rotating through "
            f"{len(result['requests'])} routes: {', '.join(sorted(set(result['requests'])))}. "
            f"{reloaded}. Warm-up: the first {warm_up:.0f} s. Samples every "
            f"{result['interval']:g} s of the server's process tree from /proc."
            + (f" Left out, not answering 200: {', '.join(skipped)}." if skipped else ""),
            "",
            *table,
            "",
            f"{result['responses']:,} responses, {load.requests_per_s:,.0f} requests/s, "
            f"p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms.",
            "",
            "| target | this run | verdict |",
            "|---|---|---|",
            *(f"| {label} | {value} | {verdict(ok)} |" for label, value, ok in checks),
            "",
            "Descriptors and threads are judged from the first sample after the reload to the "
            "end: a reload may start a loader thread once; growth after it would be a leak.",
            "",
        ]
    )


def write(text: str) -> None:
    SOAK.write_text(text)
    results = BENCH / "RESULTS.md"
    kept = results.read_text().split(MARKER)[0].rstrip() if results.is_file() else ""
    results.write_text((kept + "\n\n" if kept else "") + text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    arguments = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    result = soak(arguments.minutes, arguments.interval)
    (OUT / "soak.json").write_text(json.dumps(result, default=vars, indent=1))
    text = render(result, warm_up=min(60.0, arguments.minutes * 60 / 5))
    write(text)
    print(text)


if __name__ == "__main__":
    main()
