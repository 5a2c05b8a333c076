"""Where a SavedModel is inside the folder a policy's archive unzips to."""

from __future__ import annotations

from pathlib import Path

from policy_server.errors import PolicyLoadError

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


def find_saved_model(folder: Path, source: str | Path | None = None) -> Path:
    """The folder that holds `saved_model.pb`: `folder` itself or one or two levels down.

    Some exports zip the SavedModel inside a `saved_model/` folder, beside TensorBoard files.
    `source` names the policy in the message (default: `folder`).
    """
    levels = [[folder], sorted(folder.glob("*/")), sorted(folder.glob("*/*/"))]
    for candidates in levels:
        found = [path for path in candidates if _holds_saved_model(path)]
        if len(found) == 1:
            return found[0]
        if found:
            names = [str(path.relative_to(folder)) for path in found]
            raise PolicyLoadError(
                f"{source or folder}: holds several SavedModels ({', '.join(names)}); "
                "keep the one to serve"
            )
    raise PolicyLoadError(
        f"{source or folder}: not a SavedModel: no saved_model.pb at its top or in a folder "
        "below; zip the folder that tf.saved_model.save (or RLlib's export) wrote"
    )


def _holds_saved_model(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in SAVED_MODEL_FILES)
