"""The decision log on real files, real threads and real processes."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from policy_server.experience import DecisionLog, DecisionLogClosed
from policy_server.experience.files import list_streams, lock_worker, read_records
from policy_server.experience.index import INDEX_NAME
from tests.experience.records import simple

ROOT = Path(__file__).resolve().parents[2]


def logged_ids(directory: Path, kind: str = "decision") -> list[str]:
    return [r["decision_id"] for r in read_records(directory) if r["type"] == kind]


def test_records_are_written_in_order_and_rotated_files_are_gzipped(tmp_path: Path) -> None:
    records = [simple(i) for i in range(300)]
    log = DecisionLog(tmp_path, sync=True, rotate_bytes=20_000)

    async def write() -> None:
        for start in range(0, 300, 7):
            await log.append(records[start : start + 7])

    asyncio.run(write())
    log.close()
    files = [path for _, _, path in list_streams(tmp_path)]
    assert len(files) > 3
    assert all(path.name.endswith(".jsonl.gz") for path in files)
    assert not list(tmp_path.glob("*.jsonl"))
    with gzip.open(files[0], "rb") as first:
        assert first.readline().startswith(b'{"type":"decision"')
    assert logged_ids(tmp_path) == [r["decision_id"] for r in records]


def test_a_file_older_than_rotate_seconds_gets_no_more_records(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path, sync=True, rotate_seconds=0.05)
    log.append_blocking([simple(0)])
    time.sleep(0.1)
    log.append_blocking([simple(1)])
    log.close()
    assert len(list_streams(tmp_path)) == 2


def test_a_restarted_log_starts_a_new_file_after_the_old_ones(tmp_path: Path) -> None:
    for index in range(3):
        log = DecisionLog(tmp_path)
        log.append_blocking([simple(index)])
        log.close()
    assert [n for _, n, _ in list_streams(tmp_path)] == [1, 2, 3]


def test_rewards_join_decisions_logged_before_a_restart_and_unknown_ids_are_reported(
    tmp_path: Path,
) -> None:
    old = [simple(i) for i in range(5)]
    first = DecisionLog(tmp_path, rotate_bytes=1)
    first.append_blocking(old)
    first.close()

    async def late_rewards() -> list[dict[str, object]]:
        log = DecisionLog(tmp_path)
        try:
            return await log.add_rewards(
                [
                    {"decision_id": old[0]["decision_id"], "reward": 1.0},
                    {"decision_id": "not-a-decision", "reward": 1.0},
                    {"decision_id": old[3]["decision_id"], "reward": 2, "terminated": True},
                    {"decision_id": old[3]["decision_id"], "reward": float("nan")},
                ]
            )
        finally:
            await log.aclose()

    results = asyncio.run(late_rewards())
    assert [r["status"] for r in results] == ["joined", "unknown_decision", "joined", "invalid"]
    rewards = [r for r in read_records(tmp_path) if r["type"] == "reward"]
    assert [(r["decision_id"], r["reward"], r["terminated"]) for r in rewards] == [
        (old[0]["decision_id"], 1.0, None),
        (old[3]["decision_id"], 2.0, True),
    ]


def test_a_decision_still_queued_is_known_to_rewards(tmp_path: Path) -> None:
    async def scenario() -> list[dict[str, object]]:
        log = DecisionLog(tmp_path)
        record = simple(0)
        await log.append([record])
        results = await log.add_rewards([{"decision_id": record["decision_id"], "reward": 1.0}])
        await log.aclose()
        return results

    assert asyncio.run(scenario())[0]["status"] == "joined"


def test_workers_sharing_a_directory_know_each_others_decisions(tmp_path: Path) -> None:
    first, second = DecisionLog(tmp_path, worker="a", sync=True), DecisionLog(tmp_path, worker="b")
    record = simple(0)
    first.append_blocking([record])

    async def reward() -> list[dict[str, object]]:
        return await second.add_rewards([{"decision_id": record["decision_id"], "reward": 1.0}])

    assert asyncio.run(reward())[0]["status"] == "joined"
    first.close()
    second.close()
    assert {w for w, _, _ in list_streams(tmp_path)} == {"a", "b"}


def test_one_worker_name_cannot_be_used_by_two_logs_at_once(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    with pytest.raises(RuntimeError, match="another process is logging as worker '0'"):
        DecisionLog(tmp_path, lock_wait_s=0.2)
    log.close()


def test_a_worker_waits_for_its_name_while_another_holds_it(tmp_path: Path) -> None:
    holder = lock_worker(tmp_path, "0")  # as a worker recovering worker 0's files does
    threading.Timer(0.3, holder.close).start()
    log = DecisionLog(tmp_path, lock_wait_s=30)
    log.append_blocking([simple(0)])
    log.close()
    assert len(logged_ids(tmp_path)) == 1


def test_a_reward_waits_for_a_decision_another_worker_has_not_written_yet(
    tmp_path: Path,
) -> None:
    """In async mode a worker answers before writing: a reward sent to another worker at
    once must still join."""
    first, second = DecisionLog(tmp_path, worker="a"), DecisionLog(tmp_path, worker="b")
    record = simple(0, episode_id="e", step=0)
    # Holding the index's write lock keeps the first worker from indexing the record.
    blocker = sqlite3.connect(tmp_path / INDEX_NAME, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, blocker.execute, ["COMMIT"]).start()

    async def scenario() -> list[str]:
        await first.append([record])
        results = await second.add_rewards([{"decision_id": record["decision_id"], "reward": 1}])
        ended = await second.end_episode("e")
        return [results[0]["status"], ended["status"]]

    assert asyncio.run(scenario()) == ["joined", "closed"]
    first.close()
    second.close()
    blocker.close()


def test_episodes_end_only_when_they_have_decisions(tmp_path: Path) -> None:
    async def scenario() -> list[dict[str, object]]:
        log = DecisionLog(tmp_path)
        await log.append([simple(0, episode_id="e1", step=0)])
        results = [await log.end_episode("e1"), await log.end_episode("nobody", truncated=True)]
        await log.aclose()
        return results

    assert [r["status"] for r in asyncio.run(scenario())] == ["closed", "unknown_episode"]
    ends = [r for r in read_records(tmp_path) if r["type"] == "episode_end"]
    assert [(e["episode_id"], e["terminated"], e["truncated"]) for e in ends] == [
        ("e1", True, False)
    ]


def test_a_full_queue_makes_callers_wait_instead_of_growing(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path, max_queue=4)
    depths: list[int] = []

    async def writer(index: int) -> None:
        await log.append([simple(index)])
        depths.append(log.queue_depth)

    async def many() -> None:
        await asyncio.gather(*(writer(i) for i in range(400)))

    asyncio.run(many())
    log.close()
    assert max(depths) <= 4
    assert len(logged_ids(tmp_path)) == 400


def test_a_cancelled_durable_append_does_not_stop_the_writer(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = DecisionLog(tmp_path, sync=True)
        cancelled = asyncio.create_task(log.append([simple(0)]))
        await asyncio.sleep(0)
        cancelled.cancel()
        await log.append([simple(1)])
        await log.aclose()

    asyncio.run(scenario())
    assert simple(1)["obs"] in [r["obs"] for r in read_records(tmp_path)]


def test_a_closed_log_refuses_records_loudly(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    log.close()
    log.close()
    with pytest.raises(DecisionLogClosed):
        log.append_blocking([simple(0)])


def test_metrics_count_decisions_rewards_bytes_and_waiting_decisions(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    log = DecisionLog(tmp_path, sync=True, registry=registry)
    records = [simple(i) for i in range(3)]

    async def scenario() -> None:
        await log.append(records)
        await log.add_rewards([{"decision_id": records[0]["decision_id"], "reward": 1.0}] * 2)
        await log.add_rewards([{"decision_id": "missing", "reward": 1.0}])

    asyncio.run(scenario())
    value = registry.get_sample_value
    assert value("policy_server_decisions_logged_total") == 3
    assert value("policy_server_rewards_joined_total") == 2
    assert value("policy_server_rewards_unknown_total") == 1
    assert value("policy_server_decisions_awaiting_reward") == 2
    assert value("policy_server_decision_log_queue_depth") == 0
    assert (
        value("policy_server_decision_log_write_seconds_count") == 2
    )  # nothing to write for "missing"
    written = sum(path.stat().st_size for _, _, path in list_streams(tmp_path))
    assert value("policy_server_decision_log_bytes_total") == written
    log.close()
    restarted = CollectorRegistry()
    DecisionLog(tmp_path, registry=restarted).close()
    assert restarted.get_sample_value("policy_server_decisions_awaiting_reward") == 2


def start_writer(directory: Path, mode: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.experience.writer_process", str(directory), mode, str(count)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_kill_9_in_sync_mode_loses_no_acknowledged_decision(tmp_path: Path) -> None:
    with start_writer(tmp_path, "sync", 100_000) as process:
        assert process.stdout is not None
        acknowledged = [process.stdout.readline().strip() for _ in range(300)]
        process.kill()
    on_disk = set(logged_ids(tmp_path))
    assert set(acknowledged) <= on_disk

    async def reward_them() -> list[dict[str, object]]:
        # Another worker name: it takes over the dead worker's unfinished file.
        log = DecisionLog(tmp_path, worker="successor")
        try:
            return await log.add_rewards([{"decision_id": i, "reward": 1.0} for i in acknowledged])
        finally:
            await log.aclose()

    assert {r["status"] for r in asyncio.run(reward_them())} == {"joined"}
    assert not list(tmp_path.glob("*.jsonl"))


def test_sigterm_writes_every_queued_decision_before_exit(tmp_path: Path) -> None:
    with start_writer(tmp_path, "async", 3000) as process:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "queued 3000"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    assert len(logged_ids(tmp_path)) == 3000
    assert not list(tmp_path.glob("*.jsonl"))


def test_logs_restored_without_their_index_get_it_rebuilt(tmp_path: Path) -> None:
    records = [simple(i) for i in range(4)]
    first, second = DecisionLog(tmp_path, worker="a"), DecisionLog(tmp_path, worker="b")
    first.append_blocking(records[:2])
    second.append_blocking(records[2:])
    first.close()

    async def reward(log: DecisionLog, index: int) -> str:
        results = await log.add_rewards(
            [{"decision_id": records[index]["decision_id"], "reward": 1}]
        )
        return str(results[0]["status"])

    # Worker a logs the reward of worker b's decision: a's file is read first on rebuild.
    first = DecisionLog(tmp_path, worker="a")
    assert asyncio.run(reward(first, 3)) == "joined"
    first.close()
    second.close()
    for path in tmp_path.glob("index.sqlite*"):
        path.unlink()
    registry = CollectorRegistry()
    rebuilt = DecisionLog(tmp_path, worker="c", registry=registry)
    assert registry.get_sample_value("policy_server_decisions_awaiting_reward") == 3
    assert asyncio.run(reward(rebuilt, 0)) == "joined"
    rebuilt.close()


def test_the_count_awaiting_a_reward_is_the_directorys_not_one_workers(tmp_path: Path) -> None:
    registries = CollectorRegistry(), CollectorRegistry()
    first, second = (
        DecisionLog(tmp_path, worker=name, sync=True, registry=registry)
        for name, registry in zip("ab", registries, strict=True)
    )
    records = [simple(i) for i in range(4)]
    first.append_blocking(records[:3])

    async def reward() -> None:
        await second.add_rewards([{"decision_id": records[0]["decision_id"], "reward": 1.0}])

    asyncio.run(reward())
    second.append_blocking(records[3:])
    awaiting = [r.get_sample_value("policy_server_decisions_awaiting_reward") for r in registries]
    assert awaiting == [3, 3]
    first.close()
    second.close()
