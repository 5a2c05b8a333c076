"""What the policy folders hold: policies, their versions, and `repository.yaml`.

A PATH is one of:

- a policy folder (`PATH/schema.yaml` beside the model), one unversioned policy;
- a folder of policy folders (`PATH/<name>/schema.yaml`);
- a versioned repository (`PATH/<name>/<version>/schema.yaml`), as TensorFlow Serving and
  Triton lay theirs out.

An unversioned policy's version is a digest of its model file, so that a changed file is a
new version. Scanning reads folders and file metadata only; models are loaded elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policy_server.errors import PolicyLoadError
from policy_server.loading.archive import file_digest
from policy_server.loading.layout import EXPECTED, MODEL_FILES, SCHEMA_NAME
from policy_server.loading.rollout_spec import RolloutSpec

CONFIG_NAME = "repository.yaml"
POLICY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PolicyConfig(BaseModel):
    """One policy's entry in repository.yaml."""

    model_config = ConfigDict(extra="forbid")

    traffic: dict[str, float] | None = Field(
        default=None,
        description="Weights of the versions that answer unpinned requests; versions not "
        "named get none. Without it, the newest ready version answers everything.",
    )
    shadow: str | None = Field(
        default=None,
        description="A version that scores the same observations off the request path.",
    )
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Per-policy settings: runtime, max_batch_size, max_batch_wait_ms, "
        "max_batch_observations, rollout_reward_low/high, rollout_reward_cutoff_s, "
        "rollout_offline_ess.",
    )
    rollout: RolloutSpec | None = Field(
        default=None,
        description="A rollout of a candidate version, started when the server finds it "
        "(once: not again after a restart, nor after it finished).",
    )


class RepositoryConfig(BaseModel):
    """repository.yaml: the default policy and each policy's traffic, shadow and settings."""

    model_config = ConfigDict(extra="forbid")

    default: str | None = None
    policies: dict[str, PolicyConfig] = Field(default_factory=dict)

    @classmethod
    def coerce(cls, document: Any, source: str) -> RepositoryConfig:
        if document is None:
            return cls()
        policies = document.get("policies") if isinstance(document, dict) else None
        if isinstance(policies, dict):
            # YAML reads `{2: 80}` as an int key; version names are strings.
            for entry in policies.values():
                if isinstance(entry, dict):
                    for key in ("traffic",):
                        if isinstance(entry.get(key), dict):
                            entry[key] = {str(k): v for k, v in entry[key].items()}
                    if entry.get("shadow") is not None:
                        entry["shadow"] = str(entry["shadow"])
                    rollout = entry.get("rollout")
                    if isinstance(rollout, dict) and isinstance(rollout.get("candidate"), int):
                        rollout["candidate"] = str(rollout["candidate"])
        try:
            config = cls.model_validate(document)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
            )
            raise PolicyLoadError(f"{source}: {problems}") from None
        for name, policy in config.policies.items():
            for where, message in policy.rollout.problems() if policy.rollout else []:
                raise PolicyLoadError(f"{source}: policies.{name}.rollout.{where}: {message}")
            for version, weight in (policy.traffic or {}).items():
                if weight < 0:
                    raise PolicyLoadError(
                        f"{source}: policies.{name}.traffic.{version}: a weight must be >= 0"
                    )
        return config


@dataclass(frozen=True)
class VersionSource:
    """Where one version of one policy lives."""

    policy: str
    version: str
    folder: Path
    versioned: bool


@dataclass
class Scan:
    """Every policy version found in the PATHs, and the merged repository.yaml."""

    versions: dict[str, dict[str, VersionSource]] = field(default_factory=dict)
    config: RepositoryConfig = field(default_factory=RepositoryConfig)
    repository: bool = False  # True when any PATH is a folder of policies

    def add(self, source: VersionSource) -> None:
        versions = self.versions.setdefault(source.policy, {})
        if source.version in versions and versions[source.version].folder != source.folder:
            raise PolicyLoadError(
                f"policy {source.policy!r} version {source.version!r} is found twice: "
                f"{versions[source.version].folder} and {source.folder}"
            )
        versions[source.version] = source


class Scanner:
    """Scans the PATHs; remembers digests by (size, mtime) so polls hash only what changed."""

    def __init__(self, paths: list[Path], single_name: str | None = None) -> None:
        self.paths = paths
        self.single_name = single_name
        self._digests: dict[Path, tuple[tuple[int, int], str]] = {}

    def scan(self) -> Scan:
        result = Scan()
        for path in self.paths:
            self._scan_path(path, result)
        if not result.versions:
            raise PolicyLoadError(f"{', '.join(map(str, self.paths))}: {_LAYOUTS}")
        _check_config(result)
        return result

    def _scan_path(self, path: Path, result: Scan) -> None:
        if not path.exists():
            raise PolicyLoadError(f"{path}: no such folder; pass the folder holding schema.yaml")
        if not path.is_dir():
            raise PolicyLoadError(
                f"{path}: is a file, not a folder; pass the folder that holds schema.yaml "
                "and saved_model.zip"
            )
        model = next((name for name in MODEL_FILES if (path / name).is_file()), None)
        if model is not None and not (path / SCHEMA_NAME).is_file():
            raise PolicyLoadError(f"{path}: has {model} but no {SCHEMA_NAME}; {EXPECTED}")
        if (path / SCHEMA_NAME).is_file():
            name = self.single_name or path.resolve().name or "policy"
            result.add(VersionSource(_checked_name(name, path), self._digest(path), path, False))
            return
        result.repository = True
        config_file = path / CONFIG_NAME
        if config_file.is_file():
            _merge(result.config, _read_config(config_file))
        for child in _subfolders(path):
            if (child / SCHEMA_NAME).is_file():
                name = _checked_name(child.name, child)
                result.add(VersionSource(name, self._digest(child), child, False))
                continue
            for version in _subfolders(child):
                if (version / SCHEMA_NAME).is_file():
                    name = _checked_name(child.name, child)
                    result.add(VersionSource(name, version.name, version, True))

    def _digest(self, folder: Path) -> str:
        model = next((folder / n for n in MODEL_FILES if (folder / n).is_file()), None)
        target = model or folder / SCHEMA_NAME
        info = target.stat()
        stamp = (info.st_size, info.st_mtime_ns)
        known = self._digests.get(target)
        if known is None or known[0] != stamp:
            known = (stamp, file_digest(target)[:12])
            self._digests[target] = known
        return known[1]


_LAYOUTS = (
    "holds no policy; expected PATH/schema.yaml beside PATH/saved_model.zip or model.onnx "
    "(one policy), PATH/<name>/schema.yaml beside its model (several) or "
    "PATH/<name>/<version>/schema.yaml beside its model (a versioned repository)"
)


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _checked_name(name: str, folder: Path) -> str:
    if not POLICY_NAME.match(name):
        raise PolicyLoadError(
            f"{folder}: {name!r} cannot name a policy; use letters, digits, '_', '-' or '.' "
            "(at most 64, starting with a letter or digit)"
        )
    return name


def _read_config(path: Path) -> RepositoryConfig:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise PolicyLoadError(f"{path}: not valid YAML: {error}") from None
    return RepositoryConfig.coerce(document, str(path))


def _merge(into: RepositoryConfig, other: RepositoryConfig) -> None:
    if other.default is not None:
        into.default = into.default or other.default
    into.policies.update(other.policies)


def _check_config(scan: Scan) -> None:
    config = scan.config
    if config.default is not None and config.default not in scan.versions:
        raise PolicyLoadError(
            f"{CONFIG_NAME}: default policy {config.default!r} is not in the repository; "
            f"it has {sorted(scan.versions)}"
        )
    for name in config.policies:
        if name not in scan.versions:
            raise PolicyLoadError(
                f"{CONFIG_NAME}: policies.{name}: no such policy; the repository has "
                f"{sorted(scan.versions)}"
            )


def version_order(versions: list[str], loaded_at: dict[str, float]) -> list[str]:
    """Oldest first: as integers when every name is one, else by load time."""
    if all(v.isdigit() for v in versions):
        return sorted(versions, key=int)
    return sorted(versions, key=lambda v: (loaded_at.get(v, float("inf")), v))
