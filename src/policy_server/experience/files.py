"""The log's files: one JSON-lines stream per worker, rotated by size or age, then gzipped.

A stream is `decisions-<worker>-<n>.jsonl`; once rotated it becomes `...jsonl.gz`. Only the
writer of that worker appends to it, so no two processes ever share a file.
"""

from __future__ import annotations

import fcntl
import gzip
import itertools
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

logger = logging.getLogger(__name__)

_WORKER = re.compile(r"^[A-Za-z0-9_.]+$")
_STREAM = re.compile(r"^decisions-(?P<worker>[A-Za-z0-9_.]+)-(?P<n>\d+)\.jsonl(?P<gz>\.gz)?$")


def check_worker(worker: str) -> str:
    if not _WORKER.match(worker):
        raise ValueError(
            f"worker name {worker!r} must be letters, digits, '_' or '.', since it names files"
        )
    return worker


def stream_path(directory: Path, worker: str, number: int) -> Path:
    return directory / f"decisions-{worker}-{number:06d}.jsonl"


def lock_worker(directory: Path, worker: str, wait: float = 0.0) -> IO[bytes]:
    """Hold an exclusive lock on the worker's name: two writers on one stream would interleave.

    Waits up to `wait` seconds for it: a starting worker may find its lock held by another
    worker that is recovering the files a killed predecessor left.
    """
    handle = _lock_path(directory, worker).open("ab")
    deadline = time.monotonic() + wait
    for attempt in itertools.count():
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            if attempt == 0:
                logger.info("%s: waiting up to %.0fs for worker %r's lock", directory, wait, worker)
            time.sleep(0.05)
    handle.close()
    raise RuntimeError(
        f"{directory}: another process is logging as worker {worker!r}; give each process its "
        "own worker name"
    )


def other_workers(directory: Path, worker: str) -> bool:
    """Whether any other worker has ever logged to the directory (its lock file stays)."""
    own = _lock_path(directory, worker).name
    return any(path.name != own for path in directory.glob("decisions-*.lock"))


def _lock_path(directory: Path, worker: str) -> Path:
    return directory / f"decisions-{worker}.lock"


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file itself durable, not only its content."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def compress(path: Path) -> Path:
    """Gzip a finished stream: write aside, fsync, rename, then remove the original.

    A crash at any point leaves either the original or a complete `.gz` (or both, and
    readers then prefer the `.gz`).
    """
    target = path.with_name(path.name + ".gz")
    partial = path.with_name(path.name + ".gz.tmp")
    with path.open("rb") as source, partial.open("wb") as raw:
        with gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, compresslevel=6) as out:
            shutil.copyfileobj(source, out, 1 << 20)
        raw.flush()
        os.fsync(raw.fileno())
    partial.rename(target)
    fsync_directory(path.parent)
    path.unlink()
    return target


class Compressor:
    """Gzips rotated files on its own thread, so the writer never waits for compression."""

    def __init__(self) -> None:
        self._paths: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="decision-log-gzip", daemon=True)
        self._thread.start()

    def submit(self, path: Path) -> None:
        self._paths.put(path)

    def close(self) -> None:
        self._paths.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (path := self._paths.get()) is not None:
            try:
                compress(path)
            except OSError:
                # The file stays readable uncompressed; the next start compresses it again.
                logger.exception("could not compress %s", path)


@dataclass
class RotatingStream:
    """The current file of one worker's stream. Used by the writer thread only."""

    directory: Path
    worker: str
    rotate_bytes: int
    rotate_seconds: float
    on_rotated: Callable[[Path], None]
    number: int = 0
    size: int = 0
    _file: IO[bytes] | None = field(default=None, repr=False)
    _opened_at: float = 0.0

    def __post_init__(self) -> None:
        self.number = max(
            (n for w, n, _ in list_streams(self.directory) if w == self.worker), default=0
        )

    def write(self, data: bytes | bytearray) -> None:
        if self._file is None:
            self.number += 1
            self._file = stream_path(self.directory, self.worker, self.number).open("xb")
            self._opened_at, self.size = time.monotonic(), 0
            fsync_directory(self.directory)
        self._file.write(data)
        self.size += len(data)

    def flush(self, durable: bool) -> None:
        if self._file is not None:
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())

    def seconds_to_rotation(self) -> float | None:
        if self._file is None:
            return None
        return max(0.0, self._opened_at + self.rotate_seconds - time.monotonic())

    def rotate_if_due(self) -> None:
        if self._file is None:
            return
        if self.size >= self.rotate_bytes or self.seconds_to_rotation() == 0.0:
            self.close()

    def close(self) -> None:
        if self._file is None:
            return
        self.flush(durable=True)
        self._file.close()
        self._file = None
        self.on_rotated(stream_path(self.directory, self.worker, self.number))


def list_streams(directory: Path) -> list[tuple[str, int, Path]]:
    """Every stream file as (worker, number, path): a `.gz` hides its uncompressed twin."""
    found: dict[tuple[str, int], Path] = {}
    for path in directory.iterdir():
        match = _STREAM.match(path.name)
        if match is None:
            continue
        key = (match["worker"], int(match["n"]))
        if match["gz"] or key not in found:
            found[key] = path
    return [(worker, number, found[worker, number]) for worker, number in sorted(found)]


def leftovers(directory: Path, worker: str) -> list[Path]:
    """Uncompressed files of this worker left by a previous run that did not close cleanly."""
    for partial in directory.glob(f"decisions-{worker}-*.jsonl.gz.tmp"):
        partial.unlink()
    return [
        path for w, _, path in list_streams(directory) if w == worker and path.suffix == ".jsonl"
    ]


def workers_with_leftovers(directory: Path) -> set[str]:
    return {w for w, _, path in list_streams(directory) if path.suffix == ".jsonl"}


@dataclass
class ReadStats:
    files: int = 0
    records: int = 0
    damaged_lines: int = 0


def read_records(directory: Path, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every record in the directory, file by file, in each file's order."""
    stats = stats if stats is not None else ReadStats()
    for _, _, path in list_streams(directory):
        yield from read_file(path, stats)


def read_file(path: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """The records of one stream file.

    A line that does not parse is counted and skipped: a `kill -9` can cut the last line of
    a file in half, and in sync mode that record was never acknowledged.
    """
    stats.files += 1
    with _open_stream(path) as lines:
        for line in lines:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                stats.damaged_lines += 1
                logger.warning("%s: skipping a damaged line (cut by a crash?)", path)
                continue
            stats.records += 1
            yield record


def _open_stream(path: Path) -> IO[bytes] | gzip.GzipFile:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    try:
        return path.open("rb")
    except FileNotFoundError:
        # Rotated and compressed since the directory was listed.
        return gzip.open(path.with_name(path.name + ".gz"), "rb")
