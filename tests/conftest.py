"""Fixtures shared by the suite: the model cache, and the bundled example served on a
loopback port. Helpers live in plain modules (tests/policies.py, tests/servers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.policies import EXAMPLE, EXAMPLE_KEY
from tests.servers import RunningServer, free_port, serving


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def example_server(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with serving(EXAMPLE, cache_dir, tmp_path_factory.mktemp("example"), EXAMPLE_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def example_with_metrics(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, str]]:
    """The bundled example with its metrics port on; yields the server and the /metrics URL."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("metrics")
    with serving(EXAMPLE, cache_dir, tmp, EXAMPLE_KEY, "--metrics-port", str(port)) as server:
        yield server, f"http://127.0.0.1:{port}/metrics"
