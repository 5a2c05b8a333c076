"""A fresh clone and fresh virtual environments, as a new user gets them: the checkout's own
files (tracked, or new and not ignored) copied into a folder of their own, and `pip install
-e '.[extra]'` into a new venv from there. pip's cache makes a second install quick."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.policies import ROOT

PIP_TIMEOUT_S = 1200


def fresh_clone(into: Path) -> Path:
    """The checkout as a clone of it would be, with its uncommitted changes: no venv, no
    caches, no build output."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return into


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what points into the suite's own venv."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not name.startswith("PIP_")
    }
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"} | extra


def base_python() -> str:
    """The Python this suite's venv was made from: the one a new user has."""
    for name in ("python3", "python"):
        found = Path(sys.base_prefix) / "bin" / name
        if found.is_file():
            return str(found)
    return sys.executable


def fresh_venv(clone: Path, venv: Path, extras: str) -> Path:
    """`python -m venv VENV && VENV/bin/pip install -e '.[EXTRAS]'` in `clone`; returns
    VENV/bin. `extras` may be empty: the server's own dependencies only."""
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, timeout=300)
    target = f".[{extras}]" if extras else "."
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "-e", target],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
        env=clean_env(),
    )
    assert install.returncode == 0, f"pip install -e '{target}':\n{install.stderr[-4000:]}"
    return venv / "bin"
