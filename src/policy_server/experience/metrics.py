"""The decision log's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)


class DecisionLogMetrics:
    """Unregistered (still usable) when no registry is given, so tests can build many logs.

    Under `serve --workers N` (prometheus-client's multiprocess mode) the counters add up
    across workers; each worker's queue counts while it lives, and the count awaiting a reward,
    read from the index that every worker shares, is the one written last.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.decisions = Counter(
            "policy_server_decisions_logged",
            "Decisions written to the decision log.",
            registry=registry,
        )
        self.rewards = Counter(
            "policy_server_rewards_joined",
            "Rewards written to the decision log for a known decision.",
            registry=registry,
        )
        self.unknown_rewards = Counter(
            "policy_server_rewards_unknown",
            "Rewards refused because their decision id was never logged.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "policy_server_decision_log_queue_depth",
            "Records waiting for the decision log's writer.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.write_seconds = Histogram(
            "policy_server_decision_log_write_seconds",
            "Time of one group commit: write, fsync when durable, and index update.",
            buckets=_WRITE_BUCKETS,
            registry=registry,
        )
        self.bytes = Counter(
            "policy_server_decision_log_bytes",
            "Bytes written to the decision log (before compression).",
            registry=registry,
        )
        self.awaiting_reward = Gauge(
            "policy_server_decisions_awaiting_reward",
            "Logged decisions that have no reward yet, in the whole log directory.",
            registry=registry,
            multiprocess_mode="mostrecent",
        )
