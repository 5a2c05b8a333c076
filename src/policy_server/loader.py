"""Turn a policy folder (schema.yaml + saved_model.zip) into a LoadedPolicy, or refuse it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from policy_server.archive import extract_cached, file_digest
from policy_server.errors import PolicyLoadError
from policy_server.registry import LoadedPolicy
from policy_server.runtime.base import PolicyRuntime
from policy_server.schema import PolicySchema, load_schema
from policy_server.settings import Settings

logger = logging.getLogger(__name__)

ARCHIVE_NAME = "saved_model.zip"
UNZIPPED_FOLDER = "models"


def load_policy(settings: Settings) -> LoadedPolicy:
    folder = settings.policy_path
    if not folder.is_dir():
        raise PolicyLoadError(f"{folder}: no such folder; pass the folder holding schema.yaml")
    started = time.perf_counter()
    schema = load_schema(folder / "schema.yaml")
    model_dir, version = locate_saved_model(folder, settings)
    runtime = _load_runtime(model_dir, schema)
    check_width(schema, runtime.observation_width, folder)
    policy = LoadedPolicy(settings.resolved_policy_name, version, schema, runtime)
    logger.info(
        "loaded policy %s version %s (%s, %s) in %.2fs",
        policy.name,
        policy.version,
        runtime.name,
        runtime.action_space.describe(),
        time.perf_counter() - started,
    )
    return policy


def locate_saved_model(folder: Path, settings: Settings) -> tuple[Path, str]:
    """The SavedModel folder to load and a version string identifying its content."""
    archive = folder / ARCHIVE_NAME
    if archive.is_file():
        extracted = extract_cached(archive, settings.cache_dir, settings.max_extract_bytes)
        return extracted, extracted.parent.name[:12]
    for candidate in (folder, folder / UNZIPPED_FOLDER):
        if (candidate / "saved_model.pb").is_file():
            return candidate, file_digest(candidate / "saved_model.pb")[:12]
    raise PolicyLoadError(
        f"{folder}: found neither {ARCHIVE_NAME} nor an unzipped SavedModel (saved_model.pb)"
    )


def _load_runtime(model_dir: Path, schema: PolicySchema) -> PolicyRuntime:
    from policy_server.runtime.tensorflow import TensorFlowRuntime

    return TensorFlowRuntime(model_dir, schema.parameters)


def check_width(schema: PolicySchema, model_width: int, folder: Path) -> None:
    """Refuse a schema whose observations cannot fill the model's input exactly."""
    if not schema.has_observations:
        return
    declared = schema.width
    if declared is not None and declared != model_width:
        raise PolicyLoadError(
            f"{folder}: schema.yaml describes {declared} observation values but the model "
            f"takes {model_width}; fix the observations in schema.yaml (a scalar counts 1, "
            "a list its max_items)"
        )
    fixed = sum(f.width or f.min_items or 0 for f in schema.observations)
    if declared is None and fixed > model_width:
        raise PolicyLoadError(
            f"{folder}: schema.yaml describes at least {fixed} observation values but the "
            f"model takes {model_width}"
        )
