"""The lifecycle manager: what the folders hold becomes what the registry serves, at start-up
and on each reload. In-process, on small ONNX policies written by the test."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from policy_server.errors import PolicyLoadError
from policy_server.serving.lifecycle import PolicyManager
from policy_server.serving.registry import PolicyRegistry, PolicyVersion, State
from tests.inprocess import onnx_policy, repository, settings


def broken(folder: Path) -> None:
    onnx_policy(folder)
    (folder / "schema.yaml").write_text("parameters: {discrete: maybe}\n")


def manager_of(root: Path, cache: Path) -> tuple[PolicyManager, list[str]]:
    """A manager whose hooks record what became ready and what was unloaded."""
    registry = PolicyRegistry()
    manager = PolicyManager(settings(root, cache), registry)
    events: list[str] = []

    async def ready(version: PolicyVersion) -> None:
        events.append(f"ready {version.version}")

    async def unloaded(version: PolicyVersion) -> None:
        events.append(f"unloaded {version.version}")

    registry.on_ready.append(ready)
    registry.on_unload.append(unloaded)
    return manager, events


def test_a_broken_policy_refuses_the_start_with_its_reason(tmp_path: Path) -> None:
    root = repository(tmp_path / "repository", {"1": 1}, None)
    broken(root / "p" / "2")
    manager, _ = manager_of(root, tmp_path / "cache")
    with pytest.raises(PolicyLoadError, match="discrete"):
        manager.load_initial()


def test_reloads_add_remove_and_refuse_versions_while_the_rest_serves(tmp_path: Path) -> None:
    root = repository(tmp_path / "repository", {"1": 1, "2": 2}, None)
    manager, events = manager_of(root, tmp_path / "cache")
    registry = manager.registry

    async def scenario() -> None:
        manager.load_initial()
        await manager.start()
        assert events == ["ready 1", "ready 2"]
        onnx_policy(root / "p" / "3", seed=3)
        shutil.rmtree(root / "p" / "1")
        broken(root / "p" / "4")
        report = await manager.reload()
        assert report.loaded == ["p/3"] and report.unloaded == ["p/1"]
        assert list(report.failed) == ["p/4"] and "discrete" in report.failed["p/4"]
        await asyncio.sleep(0.01)  # the drain runs in the background
        entry = registry.entry("p")
        states = {label: v.state for label, v in entry.versions.items()}
        assert states == {"2": State.READY, "3": State.READY, "4": State.FAILED}
        assert registry.resolve("p").version == "3"
        assert events[2:] == ["ready 3", "unloaded 1"]
        again = await manager.reload()
        assert again.as_dict() == {"loaded": [], "failed": {}, "unloaded": [], "error": None}
        await manager.close()

    asyncio.run(scenario())


def test_an_admin_traffic_change_holds_until_repository_yaml_changes(tmp_path: Path) -> None:
    root = repository(tmp_path / "repository", {"1": 1, "2": 2}, {"1": 100})
    manager, _ = manager_of(root, tmp_path / "cache")

    async def scenario() -> None:
        manager.load_initial()
        await manager.start()
        with pytest.raises(PolicyLoadError, match="no version '9'"):
            await manager.set_traffic("p", {"9": 1}, None)
        entry = await manager.set_traffic("p", {"2": 100}, "1")
        assert (entry.traffic, entry.shadow) == ({"2": 100}, "1")
        await manager.reload()
        assert manager.registry.resolve("p").version == "2", "a reload keeps the change"
        (root / "repository.yaml").write_text('policies:\n  p:\n    traffic: {"1": 50}\n')
        await manager.reload()
        entry = manager.registry.entry("p")
        assert (entry.traffic, entry.shadow) == ({"1": 50}, None), "the newer change wins"
        await manager.close()

    asyncio.run(scenario())


def test_an_unreadable_repository_config_is_reported_and_changes_nothing(tmp_path: Path) -> None:
    root = repository(tmp_path / "repository", {"1": 1}, None)
    manager, _ = manager_of(root, tmp_path / "cache")

    async def scenario() -> None:
        manager.load_initial()
        await manager.start()
        (root / "repository.yaml").write_text("policies: [not, a, mapping]\n")
        report = await manager.reload()
        assert report.error is not None and "repository.yaml" in report.error
        assert manager.registry.resolve("p").version == "1"
        await manager.close()

    asyncio.run(scenario())
