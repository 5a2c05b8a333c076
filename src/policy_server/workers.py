"""`policy-server serve --workers N`: N processes answering on one port.

A supervisor (uvicorn's `Multiprocess`) binds the port and starts the workers; each builds
the whole server (`build_app`), with its own runtime and micro-batcher. uvicorn replaces a
worker that dies or stops answering its health checks, and on SIGTERM or SIGINT it forwards
SIGTERM to every worker, which drains its requests and flushes its decision log.

The supervisor owns a run folder, deleted when it exits:

- `metrics/`: every worker's Prometheus values (prometheus-client's multiprocess mode); the
  supervisor serves their sum on the metrics port, with its own count of replaced workers.
- `worker-<i>.lock`: slots. A worker holds the first free one, so a replacement takes the
  index of the worker it replaces: worker `i` writes the decision-log stream
  `decisions-<i>-*`, continuing its predecessor's.
- `state.json`: the admin changes (traffic weights, shadows, reloads). The worker whose
  admin route received a change applies it and records it there; every other worker checks
  the file each second and applies what changed, and a replacement applies it at start-up.
  A file rather than a signal from the supervisor: changes survive any worker's death, and
  the supervisor stays out of the request path.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from policy_server.errors import PolicyLoadError, PolicyNotFound
from policy_server.http import uvicorn_options
from policy_server.lifecycle import PolicyManager, ReloadReport
from policy_server.logs import configure_logging
from policy_server.metrics import Metrics
from policy_server.registry import PolicyEntry, PolicyRegistry
from policy_server.server import build_app
from policy_server.settings import Settings
from policy_server.steps import SharedSteps

logger = logging.getLogger(__name__)

FOLLOW_INTERVAL_S = 1.0
HEALTHCHECK_TIMEOUT_S = 30
CTRL_C = {signal.SIGINT}
Traffic = tuple[dict[str, float] | None, str | None]


@dataclass(frozen=True)
class RunFolder:
    """The supervisor's folder, shared with its workers."""

    path: Path

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def startup_error(self) -> Path:
        return self.path / "startup-error.txt"

    @property
    def steps(self) -> Path:
        """The step counts of episodes whose requests do not say their step."""
        return self.path / "episode-steps.sqlite"

    def claim_slot(self) -> tuple[int, IO[bytes]]:
        """The lowest worker index no live worker holds, and the lock that holds it."""
        index = 0
        while True:
            handle = (self.path / f"worker-{index}.lock").open("ab")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                index += 1
                continue
            return index, handle


# --- admin changes shared by the workers ------------------------------------------------------


@dataclass(frozen=True)
class AdminState:
    """What the admins changed so far: a count of reloads, and the traffic set per policy."""

    reloads: int = 0
    traffic: dict[str, Traffic] = field(default_factory=dict)

    def to_json(self) -> str:
        policies = {name: {"traffic": t, "shadow": s} for name, (t, s) in self.traffic.items()}
        return json.dumps({"reloads": self.reloads, "traffic": policies})

    @classmethod
    def from_json(cls, text: str) -> AdminState:
        data = json.loads(text)
        traffic = {name: (p["traffic"], p["shadow"]) for name, p in data["traffic"].items()}
        return cls(int(data["reloads"]), traffic)


class SharedState:
    """`state.json`, replaced atomically, so a reader never sees half a change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> AdminState:
        try:
            return AdminState.from_json(self.path.read_text())
        except FileNotFoundError:
            return AdminState()

    def record_reload(self) -> AdminState:
        return self._update(lambda state: AdminState(state.reloads + 1, state.traffic))

    def record_traffic(self, name: str, traffic: Traffic) -> AdminState:
        return self._update(
            lambda state: AdminState(state.reloads, state.traffic | {name: traffic})
        )

    def _update(self, change: Callable[[AdminState], AdminState]) -> AdminState:
        with self._locked():
            state = change(self.read())
            staging = self.path.with_suffix(".tmp")
            staging.write_text(state.to_json())
            staging.replace(self.path)
            return state

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self.path.with_suffix(".lock").open("ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield


class SharedPolicyManager(PolicyManager):
    """A worker's manager: the admin changes it receives are recorded for the other workers,
    and it applies theirs. It scans the policy folders on the usual interval itself, apart
    from the admin reloads, which are the only ones shared."""

    def __init__(
        self,
        settings: Settings,
        registry: PolicyRegistry,
        metrics: Metrics,
        state: SharedState,
        slot: IO[bytes],
    ) -> None:
        super().__init__(settings, registry, metrics)
        self.state = state
        self.slot = slot  # held for the worker's life: its index is taken
        self._seen = state.read()
        self._follower: asyncio.Task[None] | None = None

    @property
    def poll_interval(self) -> float:
        return 0.0  # the follower scans the folders instead (`_follow`)

    async def start(self) -> None:
        await super().start()
        self._apply_traffic(AdminState(), self._seen)  # a replacement catches up
        self.changed()
        self._follower = asyncio.create_task(self._follow(), name="admin-follower")

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        await super().close()

    async def reload(self) -> ReloadReport:
        """An admin's reload: this worker reloads now, the others within a second."""
        report = await super().reload()
        recorded = await asyncio.to_thread(self.state.record_reload)
        self._seen = AdminState(recorded.reloads, self._seen.traffic)
        return report

    def set_traffic(
        self, name: str, traffic: dict[str, float] | None, shadow: str | None
    ) -> PolicyEntry:
        entry = super().set_traffic(name, traffic, shadow)
        self.state.record_traffic(name, (traffic, shadow))
        self._seen = AdminState(self._seen.reloads, self._seen.traffic | {name: (traffic, shadow)})
        return entry

    async def _follow(self) -> None:
        scan_every = super().poll_interval
        next_scan = time.monotonic() + scan_every if scan_every else math.inf
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL_S)
            try:
                await self._catch_up()
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + scan_every
                    await super().reload()
            except Exception:  # the follower must outlive any one failure
                logger.exception("following the other workers' changes failed")

    async def _catch_up(self) -> None:
        state = await asyncio.to_thread(self.state.read)
        if state == self._seen:
            return
        seen, self._seen = self._seen, state
        if state.reloads != seen.reloads:
            await super().reload()
        self._apply_traffic(seen, state)
        self.changed()

    def _apply_traffic(self, seen: AdminState, state: AdminState) -> None:
        for name, (traffic, shadow) in state.traffic.items():
            if seen.traffic.get(name) == (traffic, shadow):
                continue
            try:
                super().set_traffic(name, traffic, shadow)
            except (PolicyLoadError, PolicyNotFound) as error:
                logger.warning("another worker's traffic change of %s: %s", name, error)


# --- the worker processes -------------------------------------------------------------------


def worker_app(settings: Settings, run: RunFolder) -> FastAPI:
    """One worker's server, built in the worker process."""
    watcher = threading.Thread(
        target=_stop_with_supervisor, args=(os.getppid(),), name="supervisor-watch", daemon=True
    )
    watcher.start()
    index, slot = run.claim_slot()
    state = SharedState(run.state)

    def manager(settings: Settings, registry: PolicyRegistry, metrics: Metrics) -> PolicyManager:
        return SharedPolicyManager(settings, registry, metrics, state, slot)

    try:
        with _abandoned_on_sigterm():
            app = build_app(
                settings, worker=str(index), managers=manager, steps=SharedSteps(run.steps)
            )
    except PolicyLoadError as error:
        run.startup_error.write_text(str(error))
    except Exception as error:
        logger.exception("worker %d failed to start", index)
        run.startup_error.write_text(f"worker {index} failed to start: {error!r}")
    else:
        app.add_middleware(WorkerHeader, worker=str(index))
        return app
    # uvicorn's supervisor stops on this code rather than restart a worker that cannot start.
    sys.exit(STARTUP_FAILURE)


@contextmanager
def _abandoned_on_sigterm() -> Iterator[None]:
    """A worker told to stop while it loads stops at once: it serves nothing yet, and a load
    (TensorFlow converting a model) may take minutes that uvicorn would wait out."""
    previous = signal.signal(signal.SIGTERM, lambda signum, _: os._exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_with_supervisor(supervisor: int) -> None:
    """A worker whose supervisor died (SIGKILL, a crash) drains and exits, rather than serve
    on as an orphan that nothing replaces or stops, holding the port."""
    while os.getppid() == supervisor:
        time.sleep(FOLLOW_INTERVAL_S)
    logger.warning("the supervisor (pid %d) is gone: this worker stops", supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


class WorkerHeader:
    """Names the worker that answered in the header `policy-server-worker`: how requests
    spread over the workers, and which one to look at in the logs."""

    def __init__(self, app: ASGIApp, worker: str) -> None:
        self.app = app
        self.header = (b"policy-server-worker", worker.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, named)


class WorkerConfig(uvicorn.Config):
    """uvicorn's config, whose app every worker builds from the settings (pickled to it)."""

    def __init__(self, settings: Settings, run: RunFolder, **options: Any) -> None:
        super().__init__("policy_server.workers:worker_app", factory=True, **options)
        self.settings = settings
        self.run = run

    def load_app(self) -> Callable[[], FastAPI]:
        return functools.partial(worker_app, self.settings, self.run)


@contextmanager
def _ctrl_c_ignored_by_children() -> Iterator[None]:
    """Workers started meanwhile ignore SIGINT, a disposition they inherit: a terminal's
    Ctrl-C reaches every process of its group, and the supervisor alone answers it (SIGTERM
    to each worker), so that no worker prints a KeyboardInterrupt from the middle of an
    import. Blocked meanwhile, a Ctrl-C for the supervisor waits rather than being ignored
    (Linux keeps a blocked signal pending whatever its disposition)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, CTRL_C)
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class Supervisor(Multiprocess):
    """uvicorn's supervisor, which also starts the first worker alone, counts replaced
    workers and forgets their gauges."""

    def __init__(self, config: WorkerConfig, run: RunFolder) -> None:
        super().__init__(config, [config.bind_socket()])
        self.run_folder = run
        self.replaced = 0
        self.serving = False
        self.interrupted = False
        self._known: set[int] = set()

    def init_processes(self) -> None:
        """The first worker extracts the archives and converts the models to ONNX into the
        cache; the others start once it serves, and read the cache instead of each running
        TensorFlow at once. A broken policy is thus also reported once."""
        first = self._start()
        while first.process.is_alive() and not self.signal_queue:
            if first.is_ready(timeout=1):
                self.serving = True
                break
            time.sleep(0.1)
        if self.signal_queue or first.exitcode == STARTUP_FAILURE:
            return  # the supervisor's loop stops
        for _ in range(self.processes_num - 1):
            self._start()

    def _start(self) -> Process:
        process = Process(self.config, self.sockets)
        with _ctrl_c_ignored_by_children():
            process.start()
        self.processes.append(process)
        return process

    def handle_int(self) -> None:
        # A Ctrl-C before a worker serves interrupts the start-up, as in one process (exit 130).
        self.interrupted = not self.serving
        super().handle_int()

    def keep_subprocess_alive(self) -> None:
        before = self._pids()
        with _ctrl_c_ignored_by_children():  # it starts the replacements
            super().keep_subprocess_alive()
        if not self.should_exit.is_set():
            self.replaced += len(before - self._pids())
        self._forget_gone()

    def _forget_gone(self) -> None:
        current = self._pids()
        for pid in self._known - current:
            mark_process_dead(pid, str(self.run_folder.metrics))  # type: ignore[no-untyped-call]
        self._known = current

    def _pids(self) -> set[int]:
        return {process.pid for process in self.processes if process.pid is not None}

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "policy_server_workers", "Worker processes serving the port.", len(self.processes)
        )
        yield CounterMetricFamily(
            "policy_server_workers_replaced",
            "Workers that died or stopped answering, and were replaced.",
            self.replaced,
        )

    def serve_metrics(self, host: str, port: int) -> Callable[[], None]:
        """/metrics of every worker, summed, on `port`; returns the function that stops it."""
        registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(registry, path=str(self.run_folder.metrics))  # type: ignore[no-untyped-call]
        registry.register(self)
        server, _ = start_http_server(port, addr=host, registry=registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()

        return stop


def serve_workers(settings: Settings) -> None:
    """Serve on `settings.resolved_workers` processes until SIGTERM or SIGINT; raises
    KeyboardInterrupt for a Ctrl-C before a worker served, PolicyLoadError for a worker that
    could not start."""
    configure_logging(settings.log_level)
    with tempfile.TemporaryDirectory(prefix="policy-server-") as folder:
        run = RunFolder(Path(folder))
        run.metrics.mkdir()
        _supervise(settings, run)
        failure = run.startup_error.read_text() if run.startup_error.exists() else None
    if failure is not None:
        raise PolicyLoadError(failure)


def _supervise(settings: Settings, run: RunFolder) -> None:
    # prometheus-client reads it when a worker imports it; the supervisor reads the folder
    # with MultiProcessCollector instead.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run.metrics)
    config = WorkerConfig(
        settings.model_copy(update={"metrics_port": 0}),
        run,
        host=settings.host,
        port=settings.port,
        workers=settings.resolved_workers,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        # uvicorn replaces a worker that does not answer its health check in time; 5 s (its
        # default) kills workers still importing on a busy machine. 30 s, as gunicorn's.
        timeout_worker_healthcheck=HEALTHCHECK_TIMEOUT_S,
        **uvicorn_options(settings),
    )
    supervisor = Supervisor(config, run)
    metrics = settings.metrics_port
    stop_metrics = supervisor.serve_metrics(settings.host, metrics) if metrics else None
    try:
        supervisor.run()
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        if stop_metrics is not None:
            stop_metrics()
    if supervisor.interrupted:
        raise KeyboardInterrupt
