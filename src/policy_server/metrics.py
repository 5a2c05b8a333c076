"""Prometheus metrics of the server, named by Prometheus conventions, served on their own port."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_INFERENCE_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1)
ROLLOUT_STATES = (
    "offline_gate",
    "canary",
    "promoted",
    "rolled_back",
    "rejected",
    "held",
    "aborted",
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)


class Metrics:
    """Every metric the server exports; one instance per process, in its own registry."""

    def __init__(self) -> None:
        # The *_created series double every counter's output and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        # process_* (CPU, memory, file descriptors) and python_* (version, garbage collector).
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.requests = Counter(
            "policy_server_requests",
            "Requests answered, by route template (a gRPC method's path), method, status "
            "code (`code`, as in Prometheus' own HTTP instrumentation; a gRPC status name), "
            "protocol (rest, v2, grpc), and the policy and version that answered (empty "
            "when none did).",
            ["route", "method", "code", "protocol", "policy", "version"],
            registry=self.registry,
        )
        self.requests_in_flight = Gauge(
            "policy_server_requests_in_flight",
            "HTTP requests being handled now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.request_duration = Histogram(
            "policy_server_request_duration_seconds",
            "Time from the request's arrival to its response, by route template, protocol, "
            "policy and version.",
            ["route", "protocol", "policy", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "policy_server_batch_size",
            "Observations per model call (micro-batches and batch requests).",
            ["policy", "version"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.inference_duration = Histogram(
            "policy_server_inference_duration_seconds",
            "Time of one model call (a forward pass over a batch).",
            ["policy", "version"],
            buckets=_INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.actions = Counter(
            "policy_server_actions",
            "Actions served, by policy, version, action component and action value "
            "(discrete actions).",
            ["policy", "version", "component", "action"],
            registry=self.registry,
        )
        self.load_duration = Gauge(
            "policy_server_model_load_seconds",
            "Time it took to load the policy version.",
            ["policy", "version"],
            registry=self.registry,
            multiprocess_mode="liveall",  # one per live worker (`serve --workers`), by pid
        )
        # A gauge of 1 rather than an Info, which prometheus-client's multiprocess mode
        # (`serve --workers`) does not export; the text exposition is the same.
        self.info = Gauge(
            "policy_server_policy_info",
            "The loaded policy versions: name, version and runtime.",
            ["policy", "version", "runtime"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.state_resets = Counter(
            "policy_server_episode_state_resets",
            "Steps of recurrent episodes whose state was gone (evicted, idle too long, "
            "ended, or held by another version) and that started from zeros.",
            ["policy", "version"],
            registry=self.registry,
        )
        self.replica_requests = Counter(
            "policy_server_replica_requests",
            "Model calls answered per Ray Serve replica (Ray backend only).",
            ["policy", "replica"],
            registry=self.registry,
        )
        self.shadow_comparisons = Counter(
            "policy_server_shadow_comparisons",
            "Observations scored by a shadow version, by whether its most likely action "
            "agreed with the answering version's (agree, disagree) or the scoring failed.",
            ["policy", "version", "shadow", "result"],
            registry=self.registry,
        )
        self.shadow_skipped = Counter(
            "policy_server_shadow_skipped",
            "Observations a shadow version did not score because its queue was full.",
            ["policy", "shadow"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "policy_server_reloads",
            "Reloads of the policy folders, by outcome of the versions they touched.",
            ["result"],
            registry=self.registry,
        )
        # A rollout's record is shared by the workers, each of which shows it: the most
        # recent value of any live worker is the record's.
        self.rollout_states = Gauge(
            "policy_server_rollout_state",
            "1 for the state a policy's rollout is in (offline_gate, canary, promoted, "
            "rolled_back, rejected, held, aborted), 0 for the others.",
            ["policy", "state"],
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.rollout_weight = Gauge(
            "policy_server_rollout_weight_percent",
            "The candidate's share of the traffic under a rollout, in percent.",
            ["policy"],
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.rollout_difference = Gauge(
            "policy_server_rollout_value_difference",
            "A rollout's value difference, candidate minus incumbent: its estimate and the "
            "lower and upper bounds of its confidence sequence.",
            ["policy", "bound"],
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.rollout_transitions = Counter(
            "policy_server_rollout_transitions",
            "Transitions of rollouts, by the state entered.",
            ["policy", "state"],
            registry=self.registry,
        )
        self._action_children: dict[tuple[str, str, int, int], Any] = {}
        # (route, method, code, policy, version) -> the request counter's and the duration
        # histogram's children: `labels()` validates and locks on every call, a dict does not.
        self._request_children: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def rollout_state(self, policy: str, state: str, weight: float) -> None:
        for name in ROLLOUT_STATES:
            self.rollout_states.labels(policy, name).set(float(name == state))
        self.rollout_weight.labels(policy).set(weight)

    def rollout_transition(self, policy: str, state: str, weight: float) -> None:
        self.rollout_transitions.labels(policy, state).inc()
        self.rollout_state(policy, state, weight)

    def rollout_value(
        self, policy: str, estimate: float | None, lower: float, upper: float
    ) -> None:
        for bound, value in (("estimate", estimate), ("lower", lower), ("upper", upper)):
            if value is not None:
                self.rollout_difference.labels(policy, bound).set(value)

    def policy_loaded(self, name: str, version: str, runtime: str, seconds: float) -> None:
        self.load_duration.labels(name, version).set(seconds)
        self.info.labels(name, version, runtime).set(1)

    def policy_unloaded(self, name: str, version: str) -> None:
        """Drop an unloaded version's children, so its series stop being exported. Under
        `serve --workers` (multiprocess mode) their last values stay in the workers' files,
        and prometheus-client warns of it on every removal."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Removal of labels", UserWarning)
            self._remove_children(name, version)

    def _remove_children(self, name: str, version: str) -> None:
        self.info.remove_by_labels({"policy": name, "version": version})
        for metric in (self.load_duration, self.batch_size, self.inference_duration):
            with contextlib.suppress(KeyError):
                metric.remove(name, version)
        with self._lock:
            for request in [k for k in self._request_children if k[4:] == (name, version)]:
                del self._request_children[request]
            for key in [k for k in self._action_children if k[:2] == (name, version)]:
                child = self._action_children.pop(key)
                del child
                self.actions.remove(name, version, str(key[2]), str(key[3]))

    def count_request(
        self,
        route: str,
        method: str,
        code: str,
        protocol: str,
        answered: tuple[str, str],
        seconds: float,
    ) -> None:
        """Count one answered request (any protocol) and observe its duration; the metric
        children are looked up once per label set."""
        key = (route, method, code, protocol, *answered)
        children = self._request_children.get(key)
        if children is None:
            with self._lock:
                children = (
                    self.requests.labels(*key),
                    self.request_duration.labels(route, protocol, *answered),
                )
                self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def batch_observer(self, policy: str, version: str) -> Callable[[int, float], None]:
        size = self.batch_size.labels(policy, version)
        duration = self.inference_duration.labels(policy, version)

        def observe(rows: int, seconds: float) -> None:
            size.observe(rows)
            duration.observe(seconds)

        return observe

    def replica_observer(self, policy: str) -> Callable[[str], None]:
        def observe(replica: str) -> None:
            self.replica_requests.labels(policy, replica).inc()

        return observe

    def count_actions(self, policy: str, version: str, actions: npt.NDArray[np.int64]) -> None:
        """Count discrete actions per component and value, so that drift shows over time."""
        if actions.shape[0] == 1:  # a single request: no need to tally
            for component, value in enumerate(actions[0].tolist()):
                self._action_child(policy, version, component, value).inc()
            return
        for component in range(actions.shape[1]):
            values, counts = np.unique(actions[:, component], return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                self._action_child(policy, version, component, value).inc(count)

    def _action_child(self, policy: str, version: str, component: int, value: int) -> Any:
        key = (policy, version, component, value)
        child = self._action_children.get(key)
        if child is None:
            with self._lock:
                child = self.actions.labels(policy, version, str(component), str(value))
                self._action_children[key] = child
        return child

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics (Prometheus text format) on its own port, in a daemon thread."""
        self._server = serve_registry(self.registry, host, port)

    def stop_serving(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server[0].shutdown()
            server[0].server_close()
            del self._server


def serve_registry(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` at /metrics on `port` in a daemon thread, and say where."""
    from prometheus_client import start_http_server

    served = start_http_server(port, addr=host, registry=registry)
    shown = f"[{host}]" if ":" in host else host
    logger.info("Prometheus metrics on http://%s:%d/metrics", shown, port)
    return served
