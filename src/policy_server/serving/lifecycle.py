"""Loading, reloading and retiring policy versions as the folders change.

The manager compares what the folders hold (a `Scan`) with what the registry serves: a new
version is loaded and verified in a thread while the old one keeps serving, then swapped in;
a version whose folder is gone, or that traffic no longer reaches because a newer one took
over, drains and is unloaded. A broken version is marked failed with its reason and the
previous version keeps serving. At start-up, anything broken stops the server instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from policy_server.errors import PolicyLoadError
from policy_server.loading.layout import SCHEMA_NAME
from policy_server.loading.loader import load_folder
from policy_server.loading.repository import (
    CONFIG_NAME,
    RepositoryConfig,
    Scan,
    Scanner,
    VersionSource,
)
from policy_server.metrics import Metrics
from policy_server.policy.loaded import LoadedPolicy
from policy_server.policy.schema import load_schema
from policy_server.runtime.verification import verification_observations
from policy_server.serving.registry import (
    PolicyEntry,
    PolicyRegistry,
    PolicyVersion,
    State,
    Traffic,
)
from policy_server.settings import PolicySettings, Settings

logger = logging.getLogger(__name__)

DEFAULT_POLL_S = 10.0


@dataclass
class ReloadReport:
    """What one reload did, for the log, the admin route and the metrics."""

    loaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unloaded: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "loaded": self.loaded,
            "failed": self.failed,
            "unloaded": self.unloaded,
            "error": self.error,
        }


class PolicyManager:
    """The lifecycle manager: loads the versions the policy folders hold, verifies each new
    one in a thread while the old one serves, swaps it in, drains and unloads versions that
    are gone, and applies traffic from repository.yaml and the admin route. It scans on
    `--poll-interval-s` and on `POST /admin/reload`; a failed version is refused with its
    reason and not retried until its files change."""

    def __init__(
        self, settings: Settings, registry: PolicyRegistry, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.scanner = Scanner(settings.policy_paths, settings.policy_name)
        self.on_change: list[Callable[[], None]] = []
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        # Traffic set through the admin route, and as repository.yaml last said it.
        self._overrides: dict[str, Traffic] = {}
        self._configured: dict[str, Traffic] = {}
        self._failed: dict[tuple[str, str], tuple[float, ...]] = {}
        self.repository = False
        self.reloads = 0
        self.config = RepositoryConfig()  # repository.yaml as last read

    # --- start-up -------------------------------------------------------------------------

    def load_initial(self) -> Scan:
        """Load every version found; any failure refuses the start with its reason."""
        scan = self.scanner.scan()
        self.repository = scan.repository
        self.config = scan.config
        for name, versions in scan.versions.items():
            entry = self._entry(name, scan.config)
            for source in versions.values():
                policy = self._load(source, entry.settings)
                version = PolicyVersion(name, source.version, source.folder, source.versioned)
                version.policy = policy
                version.state = State.READY
                entry.versions[source.version] = version
            entry.refresh()
        self.registry.default_name = self._default(scan)
        return scan

    async def start(self) -> None:
        """Run the ready hooks of what load_initial loaded, then poll if configured."""
        for entry in self.registry.entries():
            for version in entry.ordered():
                for hook in self.registry.on_ready:
                    await hook(version)
        await self._retire_unreachable()
        interval = self.poll_interval
        if interval:
            self._poller = asyncio.create_task(self._poll(interval), name="policy-poller")

    @property
    def poll_interval(self) -> float:
        configured = self.settings.poll_interval_s
        if configured is None:
            return DEFAULT_POLL_S if self.repository else 0.0
        return configured

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:  # the poller must outlive any one failed scan
                logger.exception("reload failed")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for entry in self.registry.entries():
            for version in entry.ordered():
                if version.state is State.READY:
                    for hook in self.registry.on_unload:
                        await hook(version)

    # --- reload ---------------------------------------------------------------------------

    async def reload(self) -> ReloadReport:
        """Bring the registry in line with the folders; one reload at a time."""
        async with self._lock:
            report = ReloadReport()
            try:
                scan = await asyncio.to_thread(self.scanner.scan)
            except PolicyLoadError as error:
                report.error = str(error)
                logger.error("reload: cannot read the policy folders: %s", error)
                return report
            await self._apply(scan, report)
            self.reloads += 1
            if report.loaded or report.unloaded or report.failed:
                logger.info("reload: %s", report.as_dict())
            self.changed()
            return report

    def changed(self) -> None:
        for callback in self.on_change:
            callback()

    async def _apply(self, scan: Scan, report: ReloadReport) -> None:
        self.config = scan.config
        for name, versions in scan.versions.items():
            entry = self._entry(name, scan.config)
            for source in versions.values():
                await self._load_new(entry, source, report)
            for version in list(entry.versions.values()):
                if version.version not in versions:
                    report.unloaded.append(f"{name}/{version.version}")
                    await self._retire(entry, version)
            entry.refresh()
        for entry in self.registry.entries():
            if entry.name not in scan.versions:
                for version in list(entry.versions.values()):
                    report.unloaded.append(f"{entry.name}/{version.version}")
                    await self._retire(entry, version)
                self.registry.remove_entry(entry.name)
        self.registry.default_name = self._default(scan)
        await self._retire_unreachable(report)

    async def _load_new(
        self, entry: PolicyEntry, source: VersionSource, report: ReloadReport
    ) -> None:
        known = entry.versions.get(source.version)
        stamp = _stamp(source.folder)
        if known is not None and known.state is not State.FAILED:
            return
        if self._failed.get((entry.name, source.version)) == stamp:
            return  # unchanged since it failed: do not retry (and log) on every poll
        version = PolicyVersion(entry.name, source.version, source.folder, source.versioned)
        if known is None:
            entry.versions[source.version] = version
        label = f"{entry.name}/{source.version}"
        try:
            policy = await asyncio.to_thread(self._load, source, entry.settings)
            await self.registry.add(entry, version, policy)
        except Exception as error:  # any failure of a new version leaves the old ones serving
            reason = str(error) if isinstance(error, PolicyLoadError) else repr(error)
            self._failed[(entry.name, source.version)] = stamp
            self.registry.fail(entry, version, reason)
            report.failed[label] = reason
            logger.error("policy %s: refused: %s", label, reason)
            return
        self._failed.pop((entry.name, source.version), None)
        report.loaded.append(label)

    async def _retire_unreachable(self, report: ReloadReport | None = None) -> None:
        """Unversioned policies keep one version: a changed file replaces the old one once the
        new one is ready. Versioned ones keep every version their folder holds."""
        for entry in self.registry.entries():
            if any(v.versioned for v in entry.versions.values()):
                continue
            latest = entry.primary
            for version in list(entry.versions.values()):
                if latest is not None and version is not latest and version.state is State.READY:
                    if report is not None:
                        report.unloaded.append(f"{entry.name}/{version.version}")
                    await self._retire(entry, version)

    async def _retire(self, entry: PolicyEntry, version: PolicyVersion) -> None:
        # Drain in the background: a reload must not wait for the slowest client.
        task = asyncio.create_task(
            self.registry.retire(entry, version, self.settings.drain_timeout_s),
            name=f"drain-{entry.name}-{version.version}",
        )
        _background.add(task)
        task.add_done_callback(_background.discard)
        await asyncio.sleep(0)

    # --- traffic -----------------------------------------------------------------------------

    async def set_traffic(
        self, name: str, traffic: dict[str, float] | None, shadow: str | None
    ) -> PolicyEntry:
        """Weights and shadow from the admin route; they hold until the next change."""
        return self._set_traffic(name, traffic, shadow)

    def _set_traffic(
        self, name: str, traffic: dict[str, float] | None, shadow: str | None
    ) -> PolicyEntry:
        entry = self.registry.entry(name)
        for version in [*(traffic or {}), *([shadow] if shadow else [])]:
            if version not in entry.versions:
                raise PolicyLoadError(
                    f"policy {name!r} has no version {version!r}; it has {sorted(entry.versions)}"
                )
        self._overrides[name] = (traffic, shadow)
        return self.registry.set_traffic(name, traffic, shadow)

    # --- helpers ------------------------------------------------------------------------------

    def _entry(self, name: str, config: RepositoryConfig) -> PolicyEntry:
        policy_config = config.policies.get(name)
        overrides = policy_config.settings if policy_config else {}
        try:
            settings = PolicySettings.from_server(self.settings, overrides)
        except ValueError as error:
            raise PolicyLoadError(f"{CONFIG_NAME}: policies.{name}.settings: {error}") from None
        entry = self.registry.ensure_entry(name, settings)
        configured = (
            (policy_config.traffic, policy_config.shadow) if policy_config else (None, None)
        )
        if self._configured.get(name, configured) != configured:
            # repository.yaml changed this policy's traffic: the newest change wins.
            self._overrides.pop(name, None)
        self._configured[name] = configured
        traffic, shadow = self._overrides.get(name, configured)
        entry.traffic, entry.shadow = traffic, shadow
        return entry

    def _load(self, source: VersionSource, settings: PolicySettings) -> LoadedPolicy:
        started = time.perf_counter()
        self._check_key(source)
        policy = load_folder(source.folder, source.policy, source.version, self.settings, settings)
        verify_forward(policy)
        if self.metrics is not None:
            self.metrics.policy_loaded(
                policy.name, policy.version, policy.runtime.name, time.perf_counter() - started
            )
        return policy

    def _check_key(self, source: VersionSource) -> None:
        """Before the model loads: a policy nobody could call is refused at once."""
        if self.settings.secret("api_key") or self.settings.api_key_file or self.settings.no_auth:
            return
        if load_schema(source.folder / SCHEMA_NAME).parameters.api_key:
            return
        raise PolicyLoadError(
            f"{source.folder / SCHEMA_NAME}: no API key configured: set parameters.api_key "
            "in schema.yaml, the environment variable POLICY_SERVER_API_KEY or --api-key, "
            "or serve without auth with --no-auth"
        )

    def _default(self, scan: Scan) -> str | None:
        if scan.config.default is not None:
            return scan.config.default
        if self.registry.default_name in scan.versions:
            return self.registry.default_name
        return next(iter(scan.versions), None)


def verify_forward(policy: LoadedPolicy) -> None:
    """A test forward pass on observations the schema allows: the model runs and gives
    logits of the action space's width."""
    runtime = policy.runtime
    rows = verification_observations(
        runtime.observation_width, runtime.action_space, policy.schema, rows=4
    )
    try:
        outputs = runtime.forward(rows)
    except Exception as error:  # any runtime's own error: the version is refused, not served
        raise PolicyLoadError(f"{policy.folder}: the test forward pass failed: {error}") from None
    width = runtime.action_space.logits_width
    if outputs.logits.shape != (len(rows), width):
        raise PolicyLoadError(
            f"{policy.folder}: the test forward pass gave logits of shape "
            f"{outputs.logits.shape}, the action space needs ({len(rows)}, {width})"
        )


def _stamp(folder: Path) -> tuple[float, ...]:
    stamps: list[float] = []
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        info = child.stat()
        stamps += [info.st_size, info.st_mtime_ns]
    return tuple(stamps)


_background: set[asyncio.Task[None]] = set()
