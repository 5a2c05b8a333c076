"""Policy servers the demo page starts itself (a bundled example or an upload), each in a
temporary folder of its own that goes when the server stops. No Streamlit here."""

from __future__ import annotations

import atexit
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from policy_server.extras import missing_extra

try:
    import httpx
except ImportError as error:
    raise missing_extra("ui", "the demo page", cause=error) from None

from policy_server.loading.layout import ARCHIVE_NAME, SCHEMA_NAME
from policy_server.ui.client import ServerError


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Backend:
    """A policy server this page started, and its own temporary folder (its log and, for an
    upload, the policy), which goes when the server stops."""

    process: subprocess.Popen[bytes]
    folder: Path
    workdir: Path
    url: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self in _STARTED:
            _STARTED.remove(self)


_STARTED: list[Backend] = []


@atexit.register
def _stop_backends() -> None:
    for backend in list(_STARTED):
        backend.stop()


def start_backend(folder: Path, workdir: Path) -> Backend:
    """Start `policy-server serve folder` on a free port and wait for it. On failure the
    server is stopped, `workdir` removed, and the server's last log line is the error."""
    port = _free_port()
    log = workdir / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "policy_server.hosting.cli", "serve", str(folder)),
                *("--port", str(port), "--metrics-port", "0", "--client-languages", ""),
                "--no-auth",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    backend = Backend(process, folder, workdir, f"http://127.0.0.1:{port}")
    _STARTED.append(backend)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            reason = log.read_text(errors="replace").strip().splitlines()
            backend.stop()
            raise ServerError(reason[-1] if reason else "the server exited")
        try:
            if httpx.get(backend.url + "/", timeout=1).status_code == 200:
                return backend
        except httpx.HTTPError:
            time.sleep(0.2)
    backend.stop()
    raise ServerError("the server did not start within 180 s")


def start_upload(name: str, archive: bytes, schema: bytes) -> Backend:
    """Serve an uploaded policy under `name` (the folder's name is the policy's name)."""
    workdir = Path(tempfile.mkdtemp(prefix="policy-server-ui-"))
    folder = workdir / policy_folder_name(name)
    folder.mkdir()
    (folder / ARCHIVE_NAME).write_bytes(archive)
    (folder / SCHEMA_NAME).write_bytes(schema)
    return start_backend(folder, workdir)


def policy_folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-") or "uploaded"
