"""Turn a policy folder (schema.yaml + saved_model.zip or model.onnx) into a LoadedPolicy."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from policy_server.errors import PolicyLoadError
from policy_server.loading.archive import extract_cached, file_digest
from policy_server.loading.layout import (
    ARCHIVE_NAME,
    EXPECTED,
    ONNX_NAME,
    SCHEMA_NAME,
    UNZIPPED_FOLDER,
)
from policy_server.policy.loaded import LoadedPolicy
from policy_server.policy.schema import PolicySchema, load_schema
from policy_server.runtime.base import PolicyRuntime
from policy_server.runtime.saved_model import SAVED_MODEL_FILES, find_saved_model
from policy_server.settings import PolicySettings, Settings

logger = logging.getLogger(__name__)

CACHED_ONNX = "policy.onnx"


def load_policy(settings: Settings) -> LoadedPolicy:
    """The single policy in `settings.policy_path`, its version named by its content."""
    folder = settings.policy_path
    if not folder.is_dir():
        raise PolicyLoadError(f"{folder}: no such folder; pass the folder holding schema.yaml")
    return load_folder(folder, settings.resolved_policy_name, None, settings)


def load_folder(
    folder: Path,
    name: str,
    version: str | None,
    settings: Settings,
    policy_settings: PolicySettings | None = None,
) -> LoadedPolicy:
    """Load one policy version; `version` None names it by a digest of its model."""
    started = time.perf_counter()
    runtime_choice = (policy_settings or PolicySettings.from_server(settings)).runtime
    schema = load_schema(folder / SCHEMA_NAME)
    if (folder / ONNX_NAME).is_file() and not (folder / ARCHIVE_NAME).is_file():
        runtime, digest = (
            _exported_onnx(folder / ONNX_NAME, schema, settings.onnx_threads),
            file_digest(folder / ONNX_NAME),
        )
    else:
        runtime, digest = _saved_model_runtime(folder, schema, settings, runtime_choice)
    check_width(schema, runtime.observation_width, folder)
    policy = LoadedPolicy(name, version or digest[:12], schema, runtime, folder)
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
    """The SavedModel folder to load and the SHA-256 identifying its content."""
    archive = folder / ARCHIVE_NAME
    if archive.is_file():
        extracted = extract_cached(archive, settings.cache_dir, settings.max_extract_bytes)
        return extracted, extracted.parent.name
    for candidate in (folder / UNZIPPED_FOLDER, folder):
        if candidate.is_dir() and any(candidate.rglob(SAVED_MODEL_FILES[0])):
            root = find_saved_model(candidate, folder)
            return root, file_digest(root / SAVED_MODEL_FILES[0])
    raise PolicyLoadError(f"{folder}: has {SCHEMA_NAME} but no model; {EXPECTED}")


def _saved_model_runtime(
    folder: Path, schema: PolicySchema, settings: Settings, choice: str
) -> tuple[PolicyRuntime, str]:
    model_dir, digest = locate_saved_model(folder, settings)
    cached = settings.cache_dir / digest / CACHED_ONNX
    if choice != "tensorflow" and cached.is_file():
        runtime = _cached_onnx(cached, choice, settings.onnx_threads)
        if runtime is not None:
            return runtime, digest
    from policy_server.runtime.tensorflow import TensorFlowRuntime

    tensorflow = TensorFlowRuntime(model_dir, schema.parameters, source=str(folder))
    if choice == "tensorflow":
        return tensorflow, digest
    try:
        from policy_server.runtime.convert import convert

        return convert(tensorflow, cached, schema, settings.onnx_threads), digest
    except PolicyLoadError as error:
        if choice == "onnx":
            raise
        logger.warning("serving with TensorFlow: no verified ONNX model (%s)", error)
        return tensorflow, digest


def _cached_onnx(path: Path, choice: str, threads: int) -> PolicyRuntime | None:
    from policy_server.runtime.onnx import OnnxRuntime, open_session, stored_layout

    try:
        session = open_session(path)
        layout = stored_layout(session)
        if layout is None:
            raise PolicyLoadError(f"{path}: has no policy-server layout metadata")
        return OnnxRuntime(session, layout, path, threads)
    except PolicyLoadError as error:
        if choice == "onnx":
            raise
        logger.warning("ignoring the cached ONNX model: %s", error)
        return None


def _exported_onnx(path: Path, schema: PolicySchema, threads: int) -> PolicyRuntime:
    """A model.onnx exported elsewhere: schema.yaml says how to read its outputs, and the
    roles of its inputs where their names do not say them."""
    from policy_server.runtime.base import (
        LOGITS_OUTPUTS,
        VALUE_OUTPUTS,
        read_roles,
        recurrence_of,
    )
    from policy_server.runtime.onnx import OnnxLayout, OnnxRuntime, open_session, tensor_infos

    parameters = schema.parameters
    space = parameters.action_space
    if space is None:
        raise PolicyLoadError(
            f"{path}: a model.onnx policy needs parameters.action_space in schema.yaml, "
            "e.g. {type: Discrete, n: 4}"
        )
    session = open_session(path)
    inputs, outputs = tensor_infos(session.get_inputs()), tensor_infos(session.get_outputs())
    roles = read_roles(inputs, outputs, parameters.model, str(path))
    width = inputs[roles.observations].shape[-1]
    if width is None:
        raise PolicyLoadError(f"{path}: its input needs a fixed width, got {width!r}")
    heads = [name for name in outputs if name not in roles.state_out]
    logits = (
        parameters.logits_name
        or next((name for name in LOGITS_OUTPUTS if name in outputs), None)
        or (heads[0] if len(heads) == 1 else None)
    )
    if logits is None:
        raise PolicyLoadError(
            f"{path}: has outputs {sorted(outputs)}; name the logits in schema.yaml as "
            "parameters.model.logits (or logits_output)"
        )
    value = parameters.value_name or next((n for n in VALUE_OUTPUTS if n in outputs), None)
    recurrence = recurrence_of(roles, inputs, space, str(path))
    single = len(inputs) == 1
    layout = OnnxLayout(width, space, logits, value, None if single else roles, recurrence)
    runtime = OnnxRuntime(session, layout, path, threads)
    logits_width = outputs[logits].shape[-1] if logits in outputs else None
    if isinstance(logits_width, int) and logits_width != space.logits_width:
        raise PolicyLoadError(
            f"{path}: output {logits!r} has {logits_width} values but the action space "
            f"{space.describe()} needs {space.logits_width}"
        )
    return runtime


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
