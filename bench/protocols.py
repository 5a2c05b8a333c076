"""The Open Inference Protocol against our JSON routes, on one server in one run (issue #23):

- gRPC `ModelInfer` with binary contents (`raw_input_contents`) at 32 concurrent streams,
  by h2load (nghttp2's HTTP/2 load generator, in C, as wrk is for HTTP/1.1), against
  `POST /predict` at 32 connections by wrk; target: at least 1.2x.
- `POST /v2/models/{name}/infer` with binary tensors (one per field, 1,000 observations,
  every output in binary as tritonclient asks) against `POST /predict_batch` with the same
  1,000 observations as JSON, 2 connections each, in observations/s; target: at least 1.5x.

The gRPC port needs the `grpc` extra (tritonclient's generated messages); the server runs on
`BENCH_GRPC_PYTHON` when it is set (a Python that has them), else on the bench's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from harness import OUT, PYTHON, Load, Target, free_port, ours, parse_wrk, wrk

BATCH = 1000
_DTYPES = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}


def measure_protocols(target: Target, cache: Path, duration: int) -> dict[str, Any]:
    python = os.environ.get("BENCH_GRPC_PYTHON", PYTHON)
    figures: dict[str, Any] = {"notes": {}}
    if shutil.which("h2load") is None:
        figures["notes"]["oip"] = "not measured: h2load is missing (Debian's nghttp2-client)"
        return figures
    has_stubs = subprocess.run([python, "-c", "import tritonclient.grpc"], capture_output=True)
    if has_stubs.returncode != 0:
        figures["notes"]["oip"] = (
            "not measured: the grpc extra is not installed; set BENCH_GRPC_PYTHON to a "
            "Python that has it"
        )
        return figures
    grpc_port = free_port()
    server = ours(target, cache, "--workers", "1", "--grpc-port", str(grpc_port))
    server.command[0] = python
    server.start()
    server.warm_up()
    try:
        name = target.path.name
        metadata = httpx.get(
            f"{server.url}/v2/models/{name}", headers={"access-token": target.key}
        ).json()
        figures["oip_predict_c32"] = wrk(
            server.url + "/predict", target.observation, target.key, 32, duration
        )
        message = _grpc_message(python, name, metadata, target.observation, grpc_port, target.key)
        figures["oip_grpc_c32"] = _h2load(grpc_port, message, target.key, duration)
        batch = {"observations": [target.observation] * BATCH}
        figures["oip_batch_json"] = wrk(
            server.url + "/predict_batch", batch, target.key, 2, duration
        )
        body, length = _binary_batch(metadata, target.observation)
        url = f"{server.url}/v2/models/{name}/infer"
        figures["oip_batch_binary"] = _wrk_file(url, body, length, target.key, duration)
    finally:
        server.stop()
    return figures


def _tensors(metadata: dict[str, Any], observation: dict[str, Any], rows: int) -> list[Any]:
    """(name, datatype, shape, bytes) of each input, the observation repeated `rows` times."""
    tensors = []
    for spec in metadata["inputs"]:
        value = np.asarray(observation[spec["name"]], dtype=_DTYPES[spec["datatype"]])
        data = np.repeat(value[None, ...], rows, axis=0)
        tensors.append((spec["name"], spec["datatype"], list(data.shape), data.tobytes()))
    return tensors


def _binary_batch(metadata: dict[str, Any], observation: dict[str, Any]) -> tuple[bytes, int]:
    tensors = _tensors(metadata, observation, BATCH)
    header = json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                for n, d, s, b in tensors
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + b"".join(b for *_, b in tensors), len(header)


def _grpc_message(
    python: str,
    name: str,
    metadata: dict[str, Any],
    observation: dict[str, Any],
    port: int,
    key: str,
) -> bytes:
    """One ModelInferRequest with raw contents, framed as gRPC sends it (a flag byte and
    the length), built with tritonclient's messages in the server's Python, and answered
    once with its outputs: h2load counts HTTP statuses, and a gRPC error is a 200 too."""
    tensors = [(n, d, s, b.hex()) for n, d, s, b in _tensors(metadata, observation, 1)]
    script = (
        "import json, sys\n"
        "from tritonclient.grpc import service_pb2 as pb\n"
        "name, tensors = json.loads(sys.argv[1])\n"
        "request = pb.ModelInferRequest(model_name=name)\n"
        "for n, d, s, b in tensors:\n"
        "    request.inputs.add(name=n, datatype=d, shape=s)\n"
        "    request.raw_input_contents.append(bytes.fromhex(b))\n"
        "import grpc\n"
        "channel = grpc.insecure_channel(sys.argv[2])\n"
        "infer = channel.unary_unary('/inference.GRPCInferenceService/ModelInfer',\n"
        "    pb.ModelInferRequest.SerializeToString, pb.ModelInferResponse.FromString)\n"
        "assert infer(request, metadata=[('access-token', sys.argv[3])]).raw_output_contents\n"
        "sys.stdout.buffer.write(request.SerializeToString())\n"
    )
    address = f"127.0.0.1:{port}"
    built = subprocess.run(
        [python, "-c", script, json.dumps([name, tensors]), address, key],
        capture_output=True,
        check=True,
    )
    return b"\0" + len(built.stdout).to_bytes(4, "big") + built.stdout


def _h2load(port: int, message: bytes, key: str, duration: int) -> Load:
    body = OUT / "grpc-model-infer.bin"
    body.write_bytes(message)
    command = [
        "h2load",
        "-c32",
        "-m1",
        f"-D{duration}",
        "--warm-up-time=1",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        f"access-token: {key}",
        "-d",
        str(body),
        f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer",
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"finished in [^,]+, ([\d.]+) req/s", output).group(1))  # type: ignore[union-attr]
    done = re.search(r"requests: .* (\d+) succeeded, (\d+) failed, (\d+) errored", output)
    errors = int(done.group(2)) + int(done.group(3)) if done else 0  # type: ignore[union-attr]
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", output)
    mean_ms = _ms(mean.group(1)) if mean else float("nan")
    return Load(rate, mean_ms, float("nan"), errors)


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def _wrk_file(url: str, body: bytes, length: int, key: str, duration: int) -> Load:
    payload = OUT / "v2-infer-batch.bin"
    payload.write_bytes(body)
    script = OUT / "v2-infer-batch.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.headers["inference-header-content-length"] = "{length}"\n'
        f'wrk.headers["access-token"] = "{key}"\n'
        f'local file = io.open("{payload}", "rb")\n'
        'wrk.body = file:read("*all")\n'
        "file:close()\n"
    )
    command = ["wrk", "-t1", "-c2", f"-d{duration}s", "--latency", "-s", str(script), url]
    return parse_wrk(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
