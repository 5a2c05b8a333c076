"""The original server's file commands (`python generate.py ...`), on a policy folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from policy_server.errors import PolicyLoadError
from policy_server.loading.archive import safe_extract
from policy_server.loading.layout import ARCHIVE_NAME, SCHEMA_NAME, UNZIPPED_FOLDER
from policy_server.settings import Settings


class PolicyFiles:
    """Manage schema.yaml, saved_model.zip and models/ in BASE_PATH (default: the working
    folder)."""

    def __init__(self) -> None:
        self._settings = Settings()
        self._base = self._settings.policy_path

    def copy_server_files(self, source: str) -> str:
        """Copy SOURCE/schema.yaml and SOURCE/saved_model.zip into BASE_PATH and unzip the
        model into BASE_PATH/models, as the original did."""
        folder = Path(source)
        if not folder.is_dir():
            raise PolicyLoadError(
                f"{folder}: no such folder; pass the folder holding {SCHEMA_NAME}"
            )
        for name in (SCHEMA_NAME, ARCHIVE_NAME):
            if not (folder / name).is_file():
                raise PolicyLoadError(f"{folder}: has no {name}")
        self._base.mkdir(parents=True, exist_ok=True)
        for name in (SCHEMA_NAME, ARCHIVE_NAME):
            shutil.copyfile(folder / name, self._base / name)
        copied = f"copied {SCHEMA_NAME} and {ARCHIVE_NAME} from {folder} to {self._base}"
        return f"{copied}; {self.unzip()}"

    def unzip(self) -> str:
        """Extract BASE_PATH/saved_model.zip into BASE_PATH/models (safely)."""
        archive = self._base / ARCHIVE_NAME
        if not archive.is_file():
            raise PolicyLoadError(f"{self._base}: has no {ARCHIVE_NAME} to unzip")
        target = self._base / UNZIPPED_FOLDER
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        safe_extract(archive, target, self._settings.max_extract_bytes)
        return f"extracted {archive} into {target}"

    def clean(self) -> str:
        """Remove the copied schema.yaml, saved_model.zip and models/ from BASE_PATH."""
        shutil.rmtree(self._base / UNZIPPED_FOLDER, ignore_errors=True)
        for name in (SCHEMA_NAME, ARCHIVE_NAME):
            (self._base / name).unlink(missing_ok=True)
        return f"removed {SCHEMA_NAME}, {ARCHIVE_NAME} and {UNZIPPED_FOLDER}/ from {self._base}"
