"""The Open Inference Protocol's real clients, each in a virtual environment of its own.

`tritonclient` and `kserve` pin protobuf below 7 (and tritonclient ml-dtypes below the
one TensorFlow brings), so they cannot join the suite's environment; and
`tritonclient.grpc` and `kserve` cannot even share one process (both register the
`inference.*` protobuf messages). Each is installed, once, from its requirements file in
`tests/protocols/clients/` into `build/oip-clients/<name>/`, and every client script runs
in a process of its own. The `triton` environment also serves the gRPC port under test: it
reaches the suite's packages through a `.pth` file, after its own.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from tests.policies import ROOT

CLIENTS = ROOT / "tests" / "protocols" / "clients"
VENVS = ROOT / "build" / "oip-clients"
INSTALL_TIMEOUT_S = 1200


def client_python(name: str) -> Path:
    """The Python of the client environment `name` (triton or kserve), built if needed."""
    requirements = CLIENTS / f"requirements-{name}.txt"
    wanted = requirements.read_text()
    folder = VENVS / name
    python = folder / "bin" / "python"
    stamp = folder / ".installed"
    VENVS.mkdir(parents=True, exist_ok=True)
    with (VENVS / f"{name}.lock").open("ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one build, whatever runs the tests
        if stamp.is_file() and stamp.read_text() == wanted:
            return python
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--clear", str(folder)], check=True, timeout=300)
        installed = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements)],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        if installed.returncode != 0:
            pytest.fail(f"cannot install the {name} clients:\n{installed.stderr[-3000:]}")
        if name == "triton":
            _see_suite_packages(folder)
        stamp.write_text(wanted)
    return python


def _see_suite_packages(folder: Path) -> None:
    """The suite's site-packages, after the environment's own (its protobuf and ml-dtypes
    win): the server under test runs on this Python to serve gRPC."""
    purelib = sysconfig.get_paths()["purelib"]
    own = next((folder / "lib").glob("python*/site-packages"))
    (own / "zz-suite-packages.pth").write_text(f"import site; site.addsitedir({purelib!r})\n")


def run_client(name: str, script: str, *arguments: str, timeout: float = 300) -> Any:
    """Run `tests/protocols/clients/<script>` on the `name` clients; returns its JSON."""
    python = client_python(name)
    result = subprocess.run(
        [str(python), str(CLIENTS / script), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])
