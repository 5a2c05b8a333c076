"""Render the benchmark's figures as bench/RESULTS.md: ratios to the references, targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SCALING = Path(__file__).with_name("SCALING.md")
SOAK = Path(__file__).with_name("SOAK.md")

TARGETS = """\
Targets (issue "Fast path"), as ratios from this run: `/predict` at 32 connections at least
0.9x the constant-answer ceiling and at least 5x reference (a); p99 at 32 connections at most
2x the ceiling's p99; `/predict_batch` at least 300,000 observations/s; cold start with a warm
cache at most 2 s; peak memory without TensorFlow at most 250 MB."""


def _load_row(name: str, load: Any, ceiling: Any, original: Any) -> str:
    return (
        f"| {name} | {load.requests_per_s:,.0f} | {load.p50_ms:.2f} | {load.p99_ms:.2f} "
        f"| {load.requests_per_s / ceiling.requests_per_s:.2f}x "
        f"| {load.requests_per_s / original.requests_per_s:.1f}x | {load.errors} |"
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render_target(name: str, f: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    for connections in (1, 32):
        ceiling, original = f[f"ceiling_c{connections}"], f[f"original_c{connections}"]
        lines += [
            f"`POST /predict`, {connections} connection{'s' if connections > 1 else ''}:",
            "",
            "| server | requests/s | p50 ms | p99 ms | vs ceiling (b) | vs original (a) | errors |",
            "|---|---|---|---|---|---|---|",
            _load_row("policy-server", f[f"ours_c{connections}"], ceiling, original),
            _load_row("reference (a): original design, no Ray", original, ceiling, original),
            _load_row("reference (b): constant answer (ceiling)", ceiling, ceiling, original),
            "",
        ]
    ours, ceiling, original = f["ours_c32"], f["ceiling_c32"], f["original_c32"]
    vs_ceiling = ours.requests_per_s / ceiling.requests_per_s
    vs_original = ours.requests_per_s / original.requests_per_s
    p99_ratio = ours.p99_ms / ceiling.p99_ms
    batch = f["batch_observations_per_s"]
    lines += [
        f"- `/predict_batch` (1,000 observations a request, 2 connections): "
        f"{batch:,.0f} observations/s, p50 {f['batch'].p50_ms:.1f} ms",
        f"- cold start to the first 200: {f['cold_start_cold_cache_s']:.2f} s with the ONNX cache "
        f"cold (converts with TensorFlow), {f['cold_start_warm_cache_s']:.2f} s warm",
        f"- peak memory (VmHWM, summed over a server's processes): {f['peak_memory_mb']:.0f} "
        f"MB for policy-server (ONNX, no TensorFlow), {f['original_peak_memory_mb']:.0f} MB "
        "for reference (a)",
        "",
        "| target | this run | verdict |",
        "|---|---|---|",
        f"| /predict c32 >= 0.9x ceiling | {vs_ceiling:.2f}x | {_verdict(vs_ceiling >= 0.9)} |",
        f"| /predict c32 >= 5x reference (a) | {vs_original:.1f}x | {_verdict(vs_original >= 5)} |",
        f"| p99 c32 <= 2x ceiling p99 | {p99_ratio:.2f}x | {_verdict(p99_ratio <= 2)} |",
        f"| /predict_batch >= 300,000 obs/s | {batch:,.0f} | {_verdict(batch >= 300_000)} |",
        f"| cold start, warm cache <= 2 s | {f['cold_start_warm_cache_s']:.2f} s "
        f"| {_verdict(f['cold_start_warm_cache_s'] <= 2)} |",
        f"| peak memory <= 250 MB | {f['peak_memory_mb']:.0f} MB "
        f"| {_verdict(f['peak_memory_mb'] <= 250)} |",
        "",
    ]
    if "ours_ray_c32" in f:
        lines += render_ray(f)
    if "ceiling_c32" in f and ("bare_c32" in f or "bare" in f.get("notes", {})):
        lines += render_peers(f) + render_features(f)
    return lines


def render_ray(f: dict[str, Any]) -> list[str]:
    reference = f["original_ray_c32"]
    lines = [
        "Ray backend (`--backend ray`, one replica, local Ray) against reference (c), the "
        "original design with Ray (FastAPI, a Ray Serve handle, one TensorFlow call per request):",
        "",
        "| server | connections | requests/s | p50 ms | p99 ms | vs reference (c) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (
        ("ours_ray", "policy-server, Ray backend"),
        ("original_ray", "reference (c)"),
    ):
        for connections in (1, 32):
            load, base = f[f"{name}_c{connections}"], f[f"original_ray_c{connections}"]
            lines.append(
                f"| {label} | {connections} | {load.requests_per_s:,.0f} | {load.p50_ms:.2f} "
                f"| {load.p99_ms:.2f} | {load.requests_per_s / base.requests_per_s:.1f}x "
                f"| {load.errors} |"
            )
    ratio = f["ours_ray_c32"].requests_per_s / reference.requests_per_s
    lines += [
        "",
        "| target | this run | verdict |",
        "|---|---|---|",
        f"| Ray backend c32 >= 10x reference (c) | {ratio:.1f}x | {_verdict(ratio >= 10)} |",
        "",
    ]
    return lines


def _row(label: str, load: Any, *bases: Any) -> str:
    ratios = " | ".join(
        f"{load.requests_per_s / base.requests_per_s:.2f}x" if base else "-" for base in bases
    )
    return (
        f"| {label} | {load.requests_per_s:,.0f} | {load.p50_ms:.2f} | {load.p99_ms:.2f} "
        f"| {ratios} | {load.errors} |"
    )


def _missing(label: str, note: str, columns: int) -> str:
    return f"| {label} | {note} |" + " |" * (columns - 2)


PEERS = (
    ("bare_c32", "bare ASGI constant (`references/bare_asgi.py`)"),
    ("ceiling_c32", "FastAPI + pydantic constant (reference (b))"),
    ("ours_c32", "policy-server (default `--workers`: one per core)"),
    ("workers_1", "policy-server, one process (`--workers 1`)"),
    ("uvicorn_ours_c32", "policy-server's app, one process: `uvicorn app:app` (httptools, uvloop)"),
    ("granian_ours_c32", "policy-server's app, one process: `granian --interface asgi app:app`"),
    ("granian_bare_c32", "bare ASGI constant on Granian (one process, uvloop)"),
    ("litserve_c32", "LitServe, same ONNX model and work"),
    ("rayserve_c32", "Ray Serve (FastAPI ingress, HTTP proxy), same ONNX model and work"),
)


def render_peers(f: dict[str, Any]) -> list[str]:
    notes = f.get("notes", {})
    bare, constant = f.get("bare_c32"), f["ceiling_c32"]
    lines = [
        "Peers (issues #13, #22): `POST /predict` with the typed observation, the key checked, "
        "one ONNX forward pass of the same converted model and a sampled action; 32 "
        "connections:",
        "",
        "| server | requests/s | p50 ms | p99 ms | vs bare ASGI | vs FastAPI constant | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in PEERS:
        if key in f:
            lines.append(_row(label, f[key], bare, constant))
        else:
            lines.append(_missing(label, notes.get(key.removesuffix("_c32"), "not measured"), 7))
    ours = f["ours_c32"]
    one = f.get("workers_1")
    side = "side_ours" in f
    if side:  # the interleaved runs, when the run has them (see render_side_by_side)
        ours, one = f["side_ours"], f["side_one"]
        bare, constant = f["side_bare"], f["side_ceiling"]
        lines = [*render_side_by_side(f), "", *lines]
    checks = [
        (
            "one process (`--workers 1`) >= 1.0x FastAPI constant",
            one and one.requests_per_s,
            constant.requests_per_s,
            1.0,
        ),
        ("/predict >= 1.5x FastAPI constant", ours.requests_per_s, constant.requests_per_s, 1.5),
        ("/predict >= 0.35x bare ASGI", ours.requests_per_s, bare and bare.requests_per_s, 0.35),
    ]
    rows = [_ratio_row(label, a or 0.0, b, goal) for label, a, b, goal in checks]
    p99 = ours.p99_ms / constant.p99_ms
    rows.append(f"| p99 <= FastAPI constant's p99 | {p99:.2f}x | {_verdict(p99 <= 1)} |")
    ours = f["ours_c32"]
    for key, label, goal in (("litserve_c32", "LitServe", 5), ("rayserve_c32", "Ray Serve", 20)):
        peer = f.get(key)
        rows.append(
            _ratio_row(
                f"/predict >= {goal}x {label}",
                ours.requests_per_s,
                peer and peer.requests_per_s,
                goal,
            )
        )
    if "decision_log" in f and "decision_log_off" in f:
        rows.append(
            _ratio_row(
                "decision log on (asynchronous) >= 0.85x off",
                f["decision_log"].requests_per_s,
                f["decision_log_off"].requests_per_s,
                0.85,
            )
        )
    batch = f["batch_observations_per_s"]
    rows.append(
        f"| /predict_batch >= 500,000 obs/s | {batch:,.0f} | {_verdict(batch >= 500_000)} |"
    )
    return [*lines, "", "| target | this run | verdict |", "|---|---|---|", *rows, ""]


def render_side_by_side(f: dict[str, Any]) -> list[str]:
    """Issue #22's servers measured in turn (`peers.measure_side_by_side`)."""
    bare, constant = f["side_bare"], f["side_ceiling"]
    rows = (
        ("side_bare", "bare ASGI constant"),
        ("side_ceiling", "FastAPI + pydantic constant (reference (b))"),
        ("side_ours", "policy-server (default `--workers`: one per core)"),
        ("side_one", "policy-server, one process (`--workers 1`)"),
    )
    return [
        "Side by side (issue #22's targets): the four servers started at once and measured in "
        "turn, 3 rounds of wrk (32 connections) in a changing order; each figure is the median "
        "over the rounds, so that every server meets the same moments of the machine. The "
        "first three targets below and the p99 come from these runs; the other rows of the "
        "peers table were measured one server after another.",
        "",
        "| server | requests/s | p50 ms | p99 ms | vs bare ASGI | vs FastAPI constant | errors |",
        "|---|---|---|---|---|---|---|",
        *(_row(label, f[key], bare, constant) for key, label in rows),
    ]


def _ratio_row(label: str, value: float, base: float | None, goal: float) -> str:
    if not base:
        return f"| {label} | not measured | - |"
    ratio = value / base
    return f"| {label} | {ratio:.2f}x | {_verdict(ratio >= goal)} |"


def render_features(f: dict[str, Any]) -> list[str]:
    notes = f.get("notes", {})
    lines = ["Workers (`--workers N`), `POST /predict`, 32 connections:", ""]
    if "workers_1" in f:
        one = f["workers_1"]
        lines += [
            "| workers | requests/s | p50 ms | p99 ms | vs 1 worker | errors |",
            "|---|---|---|---|---|---|",
            _row("1", one, one),
            _row("2", f["workers_2"], one),
        ]
    else:
        lines.append(f"- {notes.get('workers', 'not measured')}")
    lines += ["", *render_scaling(), "", *render_repository(f), "", *render_decision_log(f), ""]
    return [*lines, *render_rollout(f), "", *render_protocols(f), ""]


def render_rollout(f: dict[str, Any]) -> list[str]:
    notes = f.get("notes", {})
    lines = [
        "Rollout (issue #24), `POST /predict`, 32 connections, two copies of the policy at "
        "50/50 with the decision log on, with and without a rollout's controller:",
        "",
    ]
    if "rollout_off" not in f or "rollout_on" not in f:
        return [*lines, f"- {notes.get('rollout', 'not measured')}"]
    off, on = f["rollout_off"], f["rollout_on"]
    ratio = on.requests_per_s / off.requests_per_s
    return [
        *lines,
        "| rollout | requests/s | p50 ms | p99 ms | vs without | errors |",
        "|---|---|---|---|---|---|",
        _row("without (traffic set to 50/50)", off, off),
        _row("under way (canary at 50%)", on, off),
        "",
        "| target | this run | verdict |",
        "|---|---|---|",
        f"| with a rollout >= 0.97x without | {ratio:.2f}x | {_verdict(ratio >= 0.97)} |",
    ]


def render_protocols(f: dict[str, Any]) -> list[str]:
    notes = f.get("notes", {})
    lines = ["The Open Inference Protocol (issue #23), one server:", ""]
    if "oip_grpc_c32" not in f:
        return [*lines, f"- {notes.get('oip', 'not measured')}"]
    predict, grpc = f["oip_predict_c32"], f["oip_grpc_c32"]
    json_batch, binary_batch = f["oip_batch_json"], f["oip_batch_binary"]
    streams = grpc.requests_per_s / predict.requests_per_s
    batch = binary_batch.requests_per_s / json_batch.requests_per_s
    return [
        *lines,
        "| measurement | requests/s | observations/s | errors |",
        "|---|---|---|---|",
        f"| `POST /predict`, 32 connections (wrk) | {predict.requests_per_s:,.0f} | "
        f"{predict.requests_per_s:,.0f} | {predict.errors} |",
        f"| gRPC `ModelInfer`, binary contents, 32 streams (h2load) | "
        f"{grpc.requests_per_s:,.0f} | {grpc.requests_per_s:,.0f} | {grpc.errors} |",
        f"| `POST /predict_batch`, 1,000 observations, 2 connections | "
        f"{json_batch.requests_per_s:,.1f} | {json_batch.requests_per_s * 1000:,.0f} | "
        f"{json_batch.errors} |",
        f"| `POST /v2/models/.../infer`, binary tensors, 1,000 observations | "
        f"{binary_batch.requests_per_s:,.1f} | {binary_batch.requests_per_s * 1000:,.0f} | "
        f"{binary_batch.errors} |",
        "",
        "| target | this run | verdict |",
        "|---|---|---|",
        f"| gRPC ModelInfer >= 1.2x `/predict` | {streams:.2f}x | {_verdict(streams >= 1.2)} |",
        f"| binary V2 batch >= 1.5x `/predict_batch` | {batch:.2f}x | {_verdict(batch >= 1.5)} |",
    ]


def render_scaling() -> list[str]:
    if SCALING.is_file():
        return SCALING.read_text().strip().splitlines()
    return [
        "Throughput against workers on a machine with 8 or more cores: not measured (no such "
        "machine was at hand for this run; `bench/scaling.py` measures it and writes "
        "bench/SCALING.md, which this file then includes)."
    ]


def render_repository(f: dict[str, Any]) -> list[str]:
    notes = f.get("notes", {})
    lines = ["Repository (issue #11): ten copies of the policy under different names against one;"]
    if "repository_10" not in f:
        return [*lines, f"- {notes.get('repository', 'not measured')}"]
    one, ten = f["repository_1"], f["repository_10"]
    lines += [
        f"`POST {f['repository_route']}` of the first, 32 connections:",
        "",
        "| policies loaded | requests/s | p50 ms | p99 ms | vs one | errors |",
        "|---|---|---|---|---|---|",
        _row("1", one, one),
        _row("10", ten, one),
    ]
    if "reload" in f:
        reload = f["reload"]
        lines.append(_row("10, `POST /admin/reload` halfway", reload, one))
    ratio = ten.requests_per_s / one.requests_per_s
    lines += [
        "",
        "| target | this run | verdict |",
        "|---|---|---|",
        f"| ten policies >= 0.95x one | {ratio:.2f}x | {_verdict(ratio >= 0.95)} |",
    ]
    if "reload" not in f:
        return [*lines, "", f"- reload: {notes.get('reload', 'not measured')}"]
    reload = f["reload"]
    p99 = reload.p99_ms / ten.p99_ms
    lines += [
        f"| reload under load: zero errors | {reload.errors} | {_verdict(reload.errors == 0)} |",
        f"| reload under load: p99 <= 2x steady p99 | {p99:.2f}x | {_verdict(p99 <= 2)} |",
        "",
        f"- the reload (one policy added, one removed, then `POST /admin/reload`) answered "
        f"{f['reload_status']} after {f['reload_s']:.2f} s",
    ]
    return lines


def render_decision_log(f: dict[str, Any]) -> list[str]:
    notes = f.get("notes", {})
    lines = ["Decision log (issue #16), `POST /predict`, 32 connections:", ""]
    if "decision_log_off" not in f or "decision_log" not in f:
        return [*lines, f"- {notes.get('decision_log', 'not measured')}"]
    off = f["decision_log_off"]
    lines += [
        "| decision log | requests/s | p50 ms | p99 ms | vs without | errors | bytes written |",
        "|---|---|---|---|---|---|---|",
        _row("without", off, off) + " - |",
        _row("`--decision-log DIR`", f["decision_log"], off) + f" {f['decision_log_bytes']:,} |",
    ]
    if "decision_log_sync" in f:
        lines.append(
            _row("`--decision-log DIR --decision-log-sync`", f["decision_log_sync"], off)
            + f" {f['decision_log_sync_bytes']:,} |"
        )
    else:
        lines.append(_missing("`--decision-log-sync`", notes.get("decision_log_sync", "-"), 8))
    ratio = f["decision_log"].requests_per_s / off.requests_per_s
    return [
        *lines,
        "",
        "| target | this run | verdict |",
        "|---|---|---|",
        f"| with the decision log >= 0.85x without | {ratio:.2f}x | {_verdict(ratio >= 0.85)} |",
    ]


def render(
    results: dict[str, dict[str, Any]], machine: str, duration: int, minutes: float | None
) -> str:
    took = f" bench/run.py took {minutes:.1f} minutes." if minutes else ""
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`bench/run.py`); do not edit by hand. Every figure comes from",
        f"one run on one machine over loopback, with wrk (1 thread) for {duration} s per",
        "measurement, kept short so that `make bench` stays under 15 minutes on 2 cores.",
        f"The Ray backend, the peers and the features are measured on the first policy only.{took}",
        "",
        f"Machine: {machine}.",
        "",
        "References, built and run by the benchmark in the same run:",
        "(a) `bench/references/original.py`, the original design's request path without Ray",
        "(FastAPI + pydantic, one TensorFlow signature call per request); (b)",
        "`bench/references/ceiling.py`, a FastAPI route with the same validation that returns a",
        "constant (the HTTP ceiling); (c) `bench/references/original_ray.py`, the original",
        "design with Ray (FastAPI, a Ray Serve handle, one TensorFlow call per request).",
        "Peers: `bench/references/bare_asgi.py` (a raw ASGI app on uvicorn answering a",
        "constant: the limit of the HTTP stack), `bench/references/litserve_peer.py` (LitServe",
        "with its defaults: one API server process, one inference worker, no batching) and",
        "`bench/references/rayserve_peer.py` (Ray Serve, one replica of a FastAPI ingress behind",
        "Serve's HTTP proxy), both doing policy-server's work per request with the ONNX model it",
        "converted (`bench/references/onnx_policy.py`). policy-server runs with its default",
        "`--workers` (one process per core) unless a row says otherwise.",
        "",
        TARGETS,
        "",
    ]
    for name, figures in results.items():
        lines += render_target(name, figures)
    lines += ANALYSIS.splitlines()
    if SOAK.is_file():
        lines += ["", *SOAK.read_text().strip().splitlines()]
    return "\n".join(lines) + "\n"


ANALYSIS = """\
## Where the time goes, and what would close the gaps

The cost of each part of the request path is measured in-process by `bench/components.py`
(run by `make bench`) and recorded in [COMPONENTS.md](COMPONENTS.md); `bench/PROFILING.md`
says how to profile the running server. On top of what the ceiling does, a prediction
pays for the API-key check, sampling the action from the logits, the forward pass, the
metrics and request id of every request (the request observer, one of several ASGI
middlewares every request passes through), and the micro-batcher's hand-off to the model
call. At 4,000 to 8,000 requests/s a request's whole budget is 125-250 us per process.

What was done: ONNX Runtime instead of TensorFlow (see COMPONENTS.md for both forward
passes); single requests on a one-thread ONNX session; the model runs on the event loop
rather than in a thread (a thread hand-off costs more than the model call); orjson parses
and writes JSON; the cyclic garbage collector is frozen after start-up, which keeps its
pauses out of the tail latency; uvicorn runs with httptools and uvloop; and `--workers`
runs one process per core behind one port (the workers tables above). For issue #22
(COMPONENTS.md has the profiles before and after, and each change measured on its own): a
prediction, native or Open Inference Protocol, is answered by the one layer of ours in front
of the app, ahead of Starlette's and FastAPI's middlewares and router; the micro-batcher
keeps each request's time-out with one timer armed only while it waits for its thread (no
`asyncio.timeout` per request); a flat observation is validated into a plain dict and read
straight into model rows; the key, the content type and the body come from the raw scope;
policy-server's uvicorn protocol sends a response's head and body in one write; and the
decision log's writer builds the records of consecutive calls of one version as one batch,
serialises them into one buffer and lets a group gather for 50 ms. Our code's cost per
request, in-process, went from about 345 to 115 us.

What stands in the way of the rest, measured (COMPONENTS.md): after these changes a third
of a process's time per request is the HTTP server (uvicorn's parsing, the event loop and
the one socket write, which wakes the client on the other core), and the rest is spread
over a dozen costs of a few microseconds each (the service's bookkeeping, the batcher's
future and task switch, sampling one row, ONNX Runtime's Python wrapper, prometheus-client's
locked counters); on this 2-core machine wrk takes most of a core, so two workers cannot
double one. The Granian rows compare that HTTP server with uvicorn on the bare app and on
policy-server's own `app.py`, one process each: in the recorded run Granian served our app
faster than `uvicorn app:app`, while the bare app was as fast on both. uvicorn stays the
default because policy-server's hardening is built on its protocol (the connection cap, the
idle and slow-request time-outs, the drain on shutdown, the one write per response, in
`hosting/connection_limits.py`, tested against slow and hostile clients) and its worker
supervisor; carrying those to Granian is the next step this measurement points to, and
`uvicorn app:app` works either way. SCALING.md shows the same server on 16 cores, where
throughput grows with workers. The batch endpoint is bounded by the model before anything
else: mouse_and_cheese's forward pass over 1,000 rows takes about 3,000 us on one thread
(COMPONENTS.md), at most about 330,000 observations/s per core, so 500,000 observations/s
needs the model alone on one and a half of this machine's two cores, which it shares with
wrk and the HTTP side (validating 1,000 observations and writing 1,000 answers).

The features' misses, as measured here and not profiled: during a reload the p99 is far
above the steady p99 although the reload itself answers within a fraction of a second (both
in the repository table), which suggests that requests wait while the worker that received
`POST /admin/reload` loads the new version; loading it off that worker's event loop and
swapping it in at once would keep answering. The decision log's writer thread shares the
process, and its GIL, with the event loop: what it costs after issue #22 is its own work
(building the records, orjson, the write and the index transaction) done beside the
requests, in one group per 50 ms; `--decision-log-sync` writes at once and answers only
once the decision is on disk, so its requests wait for the fsync.

Why the peers are slower with the same model and the same work: LitServe's FastAPI
process hands each request to its inference worker process through a multiprocessing queue
(the payload pickled) and waits for the answer on a second queue, so every request pays two
inter-process hops beside the HTTP work. Ray Serve's request goes from its HTTP proxy actor
through the router to the replica actor over Ray's RPC, where a second ASGI app (the
FastAPI ingress) runs the route; every hop is a Python process boundary. The bare-ASGI
row is the HTTP stack alone (uvicorn with httptools and uvloop) and bounds what any
Python server on this stack can answer with one process.
"""
