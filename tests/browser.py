"""Debian's Chromium, headless, driven by Playwright: without the background-networking
flags it keeps trying to reach Google's hosts, which this machine's closed network refuses."""

from __future__ import annotations

import shutil
from typing import Any

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "Chromium is missing: `make test` installs Debian's chromium package"
    return path


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=chromium(), args=ARGS)
