"""Small ONNX policies written by the tests and whole servers built in the test's own process.

The policies are real model.onnx files that ONNX Runtime loads in milliseconds; the apps are
the real `build_app`, called over httpx's in-process ASGI transport with their lifespan run,
so a test can reach the registry, the manager and the model callers between two requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from fastapi import FastAPI
from pydantic import SecretStr

from policy_server.hosting.app import build_app
from policy_server.metrics import Metrics
from policy_server.runtime.base import ModelOutputs, PolicyRuntime, StepInputs
from policy_server.serving.registry import PolicyRegistry, PolicyVersion
from policy_server.serving.service import ModelCaller
from policy_server.settings import Settings
from tests.policies import linear_onnx_policy, slow_onnx_policy

KEY = "in-process-key"
ADMIN_KEY = "in-process-admin"
WIDTH = 4
SCHEMA = f"""\
observations:
  a: {{type: float}}
  b: {{type: float}}
  c: {{type: float}}
  d: {{type: float}}
parameters:
  discrete: true
  tuple: false
  api_key: {KEY}
  action_space: {{type: Discrete, n: 2}}
  logits_output: logits
  value_output: value
"""
OBSERVATION = {"a": 0.1, "b": -0.2, "c": 0.3, "d": 0.0}


def onnx_policy(folder: Path, seed: int = 0, slow: bool = False) -> Path:
    """A Discrete(2) policy over four float fields, as model.onnx and schema.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    if slow:
        slow_onnx_policy(folder / "model.onnx", width=WIDTH, actions=2)
    else:
        rng = np.random.default_rng(seed)
        linear_onnx_policy(folder / "model.onnx", rng.normal(size=(WIDTH, 2)), rng.normal(size=2))
    (folder / "schema.yaml").write_text(SCHEMA)
    return folder


def repository(root: Path, versions: dict[str, int], traffic: dict[str, float] | None) -> Path:
    """Policy `p` in the given versions (name -> seed), split by `traffic`."""
    for version, seed in versions.items():
        onnx_policy(root / "p" / version, seed)
    if traffic is not None:
        weights = ", ".join(f'"{v}": {w}' for v, w in traffic.items())
        (root / "repository.yaml").write_text(f"policies:\n  p:\n    traffic: {{{weights}}}\n")
    return root


def settings(policy_path: Path, cache: Path, **values: Any) -> Settings:
    return Settings(
        policy_path=policy_path,
        cache_dir=cache,
        admin_key=SecretStr(ADMIN_KEY),
        metrics_port=0,
        client_languages="",
        poll_interval_s=0,
        log_level="warning",
        **values,
    )


@dataclass
class Gate:
    """Holds the model calls of chosen versions until it is opened; counts the calls."""

    held: set[str] = field(default_factory=set)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: asyncio.Event = field(default_factory=asyncio.Event)
    calls: dict[str, int] = field(default_factory=dict)


class GatedCaller:
    """A model caller that runs the version's real runtime, after the gate opens for held
    versions, and can be made to fail."""

    def __init__(self, version: PolicyVersion, gate: Gate) -> None:
        self.runtime: PolicyRuntime = version.loaded.runtime
        self.label = version.version
        self.gate = gate
        self.closed = False

    async def forward(
        self,
        rows: npt.NDArray[np.float32],
        step: StepInputs | None = None,
        timeout_s: float | None = None,
    ) -> ModelOutputs:
        gate = self.gate
        gate.calls[self.label] = gate.calls.get(self.label, 0) + 1
        if self.label in gate.held:
            gate.waiting.set()
            async with asyncio.timeout(timeout_s):  # as every caller keeps its time-out
                await gate.opened.wait()
        return self.runtime.forward(rows, step)

    async def close(self) -> None:
        self.closed = True


def gated_callers(
    gate: Gate,
) -> Callable[[PolicyVersion, Metrics], Any]:
    async def callers(version: PolicyVersion, _: Metrics) -> ModelCaller:
        return GatedCaller(version, gate)

    return callers


@dataclass
class InProcess:
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def registry(self) -> PolicyRegistry:
        registry: PolicyRegistry = self.app.state.service.registry
        return registry


@asynccontextmanager
async def in_process(
    values: Settings, callers: Any = None, lifespan: bool = True, **build: Any
) -> AsyncIterator[InProcess]:
    """The whole server for `values` in this process and event loop, and a client of it;
    `build` goes to build_app."""
    app = build_app(values, callers, **build)
    transport = httpx.ASGITransport(app=app)
    headers = {"access-token": KEY}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://in-process", headers=headers, timeout=60
    ) as client:
        if lifespan:
            async with app.router.lifespan_context(app):
                yield InProcess(app, client)
        else:
            yield InProcess(app, client)
