"""The registry of policy versions: lookups, the traffic split, sticky episodes, leases and
retirement. In-process, on runtimes made in the test."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from policy_server.errors import PolicyNotFound, PolicyUnavailable
from policy_server.serving.registry import PolicyRegistry, PolicyVersion, State
from policy_server.settings import PolicySettings
from tests.runtimes import loaded, ready_entry


def test_a_pinned_version_must_exist_and_be_ready() -> None:
    registry = PolicyRegistry()
    entry = ready_entry(registry, "p", ["1", "2"])
    assert registry.resolve("p", "2") is entry.versions["2"]
    with pytest.raises(PolicyNotFound, match=r"no version '9'; it has \['1', '2'\]"):
        registry.resolve("p", "9")
    registry.fail(entry, PolicyVersion("p", "3", Path(".")), "schema.yaml: bad")
    with pytest.raises(PolicyUnavailable, match=r"'3' is failed: schema\.yaml: bad"):
        registry.resolve("p", "3")
    with pytest.raises(PolicyNotFound, match=r"no policy named 'q'; serving \['p'\]"):
        registry.resolve("q")


def test_no_policy_and_no_ready_version_are_told_apart() -> None:
    registry = PolicyRegistry()
    with pytest.raises(PolicyNotFound, match="no policy is loaded"):
        registry.resolve()
    registry.ensure_entry("p", PolicySettings())
    with pytest.raises(PolicyUnavailable, match="has no ready version"):
        registry.resolve("p")
    assert not registry.all_ready()


def test_unpinned_requests_follow_the_weights_and_episodes_stay_put() -> None:
    registry = PolicyRegistry()
    entry = ready_entry(registry, "p", ["1", "2", "3"], traffic={"1": 3, "2": 1, "3": 0})
    draws = Counter(registry.resolve("p").version for _ in range(4000))
    assert set(draws) == {"1", "2"}, "a version of weight 0 takes no unpinned traffic"
    assert 0.2 < draws["2"] / 4000 < 0.3
    for episode in (f"e{i}" for i in range(50)):
        first = registry.resolve("p", episode_id=episode)
        assert all(registry.resolve("p", episode_id=episode) is first for _ in range(5))
    assert entry.weight_of(entry.versions["1"]) == 75.0
    assert entry.primary is entry.versions["2"], "the newest routable version"


def test_without_weights_the_newest_ready_version_answers() -> None:
    registry = PolicyRegistry()
    entry = ready_entry(registry, "p", ["1", "2", "10"])
    assert registry.resolve("p") is entry.versions["10"], "versions are ordered as numbers"
    entry.traffic = {"7": 100}
    entry.refresh()
    assert registry.resolve("p") is entry.versions["10"], "no named version is ready"


def test_a_retired_version_waits_for_its_leases_then_unloads() -> None:
    registry = PolicyRegistry()
    entry = ready_entry(registry, "p", ["1", "2"])
    first, second = entry.versions["1"], entry.versions["2"]
    unloaded: list[str] = []

    async def on_unload(version: PolicyVersion) -> None:
        unloaded.append(version.version)

    registry.on_unload.append(on_unload)

    async def scenario() -> None:
        with registry.lease(first, second):
            retiring = asyncio.create_task(registry.retire(entry, first, timeout_s=30))
            await asyncio.sleep(0.01)
            assert first.state is State.DRAINING and unloaded == []
            assert registry.resolve("p") is second, "a draining version takes no new requests"
            assert first.loaded is not None, "a leased version keeps its policy"
        await retiring
        assert unloaded == ["1"] and first.state.value == "unloaded"
        assert "1" not in entry.versions and second.in_flight == 0

    asyncio.run(scenario())


def test_a_lease_that_outlives_the_drain_time_out_is_unloaded_anyway() -> None:
    registry = PolicyRegistry()
    entry = ready_entry(registry, "p", ["1"])
    version = entry.versions["1"]

    async def scenario() -> None:
        with registry.lease(version):
            await registry.retire(entry, version, timeout_s=0.05)
            assert version.state is State.UNLOADED

    asyncio.run(scenario())


def test_a_version_is_ready_only_after_its_hooks_ran() -> None:
    registry = PolicyRegistry()
    entry = ready_entry(registry, "p", ["1"])
    seen: list[tuple[State, str | None]] = []

    async def on_ready(version: PolicyVersion) -> None:
        primary = entry.primary
        seen.append((version.state, None if primary is None else primary.version))

    registry.on_ready.append(on_ready)
    version = PolicyVersion("p", "2", Path("."))
    asyncio.run(registry.add(entry, version, loaded("p", "2")))
    assert seen == [(State.LOADING, "1")], "version 1 answered while 2's hooks ran"
    assert entry.primary is version


def test_removing_the_default_policy_names_another() -> None:
    registry = PolicyRegistry()
    ready_entry(registry, "p", ["1"])
    ready_entry(registry, "q", ["1"])
    assert registry.default_name == "p"
    registry.remove_entry("p")
    assert registry.default_name == "q" and registry.resolve().name == "q"
