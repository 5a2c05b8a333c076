"""Safe extraction of `saved_model.zip` into a cache folder keyed by the archive's hash."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from policy_server.errors import PolicyLoadError

_CHUNK = 1 << 20
# A SavedModel has a handful of files; tens of thousands of entries is an attack.
MAX_ENTRIES = 10_000
_DRIVE = re.compile(r"^[A-Za-z]:")
_REEXPORT = "re-export the policy or download its saved_model.zip again"


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
            _check_directory(members, archive, max_bytes)
            written = 0
            for member in members:
                destination = _destination(target, member, archive)
                if member.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                written = _copy_member(bundle, member, destination, written, max_bytes, archive)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise PolicyLoadError(
            f"{archive}: not a valid zip archive, or a damaged or truncated one ({error}); "
            f"{_REEXPORT}"
        ) from None
    except (NotImplementedError, RuntimeError) as error:
        # Unsupported compression methods and encrypted entries.
        raise PolicyLoadError(
            f"{archive}: cannot be unzipped ({error}); zip it again without encryption, "
            "with the deflate method"
        ) from None
    except OSError as error:
        raise PolicyLoadError(f"{archive}: cannot be unzipped into {target} ({error})") from None


def _check_directory(members: list[zipfile.ZipInfo], archive: Path, max_bytes: int) -> None:
    """What the central directory alone gives away: size, entry count, duplicates, overlaps."""
    if len(members) > MAX_ENTRIES:
        raise PolicyLoadError(
            f"{archive}: has {len(members)} entries, more than the {MAX_ENTRIES} a policy "
            f"may hold; {_REEXPORT}"
        )
    if sum(member.file_size for member in members) > max_bytes:
        raise PolicyLoadError(_too_large(archive, max_bytes))
    names = [member.filename.rstrip("/") for member in members]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PolicyLoadError(
            f"{archive}: entry {duplicates[0]!r} appears more than once; {_REEXPORT}"
        )
    # Entries that share their compressed data are a zip's hard links, and the heart of
    # the overlapping-files zip bomb: each entry must own its own bytes.
    spans = sorted((m.header_offset, m.header_offset + m.compress_size) for m in members)
    for (start, end), (next_start, _) in itertools.pairwise(spans):
        if next_start < end or next_start == start:
            raise PolicyLoadError(
                f"{archive}: entries share their data (the zip form of hard links); {_REEXPORT}"
            )


def _destination(target: Path, member: zipfile.ZipInfo, archive: Path) -> Path:
    name = PurePosixPath(member.filename)
    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise PolicyLoadError(
            f"{archive}: refuses symbolic link {member.filename!r}; zip the real files instead"
        )
    kind = stat.S_IFMT(mode)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise PolicyLoadError(
            f"{archive}: entry {member.filename!r} is a special file (mode {oct(kind)}); "
            "a policy holds regular files and folders only"
        )
    if (
        name.is_absolute()
        or ".." in name.parts
        or "\\" in member.filename
        or _DRIVE.match(member.filename)
        or "\x00" in member.filename
    ):
        raise PolicyLoadError(
            f"{archive}: entry {member.filename!r} would escape the folder it is unzipped "
            f"into; {_REEXPORT}"
        )
    destination = (target / name).resolve()
    if not destination.is_relative_to(target.resolve()):
        raise PolicyLoadError(
            f"{archive}: entry {member.filename!r} would escape the folder it is unzipped "
            f"into; {_REEXPORT}"
        )
    return destination


def _copy_member(
    bundle: zipfile.ZipFile,
    member: zipfile.ZipInfo,
    destination: Path,
    written: int,
    max_bytes: int,
    archive: Path,
) -> int:
    # O_EXCL | O_NOFOLLOW: never write through a file or link that is already there.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        handle = os.open(destination, flags, 0o644)
    except FileExistsError:
        raise PolicyLoadError(
            f"{archive}: entry {member.filename!r} collides with another entry; {_REEXPORT}"
        ) from None
    # The sizes in the zip's directory can lie; count the bytes really produced.
    with bundle.open(member) as source, os.fdopen(handle, "wb") as sink:
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
