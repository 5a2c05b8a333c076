"""Safe extraction of `saved_model.zip` into a cache folder keyed by the archive's hash."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from policy_server.errors import PolicyLoadError

_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """The archive's SHA-256, hex: the key of everything cached for it."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def extract_cached(archive: Path, cache_dir: Path, max_bytes: int) -> Path:
    """Extract `archive` once into `cache_dir/<sha256>/model` and return that folder.

    Extraction goes to a temporary sibling first and is renamed into place, so a crash
    or a concurrent start never leaves a half-written model behind.
    """
    target = cache_dir / file_digest(archive) / "model"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        safe_extract(archive, staging, max_bytes)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def safe_extract(archive: Path, target: Path, max_bytes: int) -> None:
    """Unzip `archive` into `target`, refusing links, escaping paths and oversized content."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            declared = sum(member.file_size for member in members)
            if declared > max_bytes:
                raise PolicyLoadError(_too_large(archive, max_bytes))
            written = 0
            for member in members:
                destination = _destination(target, member, archive)
                if member.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                written = _copy_member(bundle, member, destination, written, max_bytes, archive)
    except zipfile.BadZipFile as error:
        raise PolicyLoadError(f"{archive}: not a valid zip archive ({error})") from None


def _destination(target: Path, member: zipfile.ZipInfo, archive: Path) -> Path:
    name = PurePosixPath(member.filename)
    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise PolicyLoadError(f"{archive}: refuses symbolic link {member.filename!r}")
    if name.is_absolute() or ".." in name.parts or "\\" in member.filename:
        raise PolicyLoadError(f"{archive}: entry {member.filename!r} would escape the folder")
    destination = (target / name).resolve()
    if not destination.is_relative_to(target.resolve()):
        raise PolicyLoadError(f"{archive}: entry {member.filename!r} would escape the folder")
    return destination


def _copy_member(
    bundle: zipfile.ZipFile,
    member: zipfile.ZipInfo,
    destination: Path,
    written: int,
    max_bytes: int,
    archive: Path,
) -> int:
    # The sizes in the zip's directory can lie; count the bytes really produced.
    with bundle.open(member) as source, destination.open("wb") as sink:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise PolicyLoadError(_too_large(archive, max_bytes))
            sink.write(chunk)
    return written


def _too_large(archive: Path, max_bytes: int) -> str:
    return (
        f"{archive}: unzips to more than {max_bytes} bytes; raise --max-extract-bytes "
        "if the model really is that large"
    )
