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

import functools
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from policy_server.errors import PolicyLoadError
from policy_server.hosting.app import build_app, state_secret
from policy_server.hosting.connection_limits import uvicorn_options
from policy_server.hosting.shared_state import (
    FOLLOW_INTERVAL_S,
    RunFolder,
    SharedPolicyManager,
    SharedState,
)
from policy_server.logs import configure_logging
from policy_server.metrics import Metrics
from policy_server.serving.episodes import SharedEpisodes
from policy_server.serving.lifecycle import PolicyManager
from policy_server.serving.registry import PolicyRegistry
from policy_server.settings import Settings

logger = logging.getLogger(__name__)

HEALTHCHECK_TIMEOUT_S = 30
CTRL_C = {signal.SIGINT}


def worker_app(settings: Settings, run: RunFolder) -> FastAPI:
    """One worker's server, built in the worker process."""
    configure_logging(settings.log_level)
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
            episodes = SharedEpisodes(
                run.episodes, settings.max_episodes, settings.episode_idle_s, state_secret(settings)
            )
            app = build_app(
                settings,
                worker=str(index),
                managers=manager,
                episodes=episodes,
                grpc=True,
                worker_header=True,
            )
    except PolicyLoadError as error:
        run.startup_error.write_text(str(error))
    except Exception as error:
        logger.exception("worker %d failed to start", index)
        run.startup_error.write_text(f"worker {index} failed to start: {error!r}")
    else:
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


class WorkerConfig(uvicorn.Config):
    """uvicorn's config, whose app every worker builds from the settings (pickled to it)."""

    def __init__(self, settings: Settings, run: RunFolder, **options: Any) -> None:
        super().__init__("policy_server.hosting.supervisor:worker_app", factory=True, **options)
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
        # Its thread must block Ctrl-C as the supervisor's main thread does while it starts a
        # worker: a process-directed SIGINT goes to any thread that does not block it, and
        # while the disposition is SIG_IGN it would be dropped there.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, CTRL_C)
        try:
            server, _ = start_http_server(port, addr=host, registry=registry)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

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
