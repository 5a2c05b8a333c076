"""The episode store: shared by workers through SQLite, never on the event loop, indexed and
bounded; in memory for one process, bounded too."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from policy_server.hosting.app import build_app
from policy_server.serving.episodes import Carried, LocalEpisodes, SharedEpisodes, StepKey
from policy_server.settings import Settings
from tests.policies import EXAMPLE, EXAMPLE_KEY
from tests.servers import app_in_thread

OBSERVATION = {
    "cart_position": 0.0,
    "cart_velocity": 0.1,
    "pole_angle": 0.02,
    "pole_angular_velocity": 0.0,
}


def _key(episode: str, step: int | None = None, version: str = "1") -> StepKey:
    return StepKey(episode, "p", version, f"d-{episode}-{step}", step)


def test_workers_share_steps_state_and_secret(tmp_path: Path) -> None:
    path = tmp_path / "episodes.sqlite"
    one, two = SharedEpisodes(path), SharedEpisodes(path)

    async def steps() -> None:
        first = await one.begin([_key("e")])
        assert first[0].step == 0 and first[0].carried is None
        await one.keep([Carried("e", "p", "1", b"\x01\x02\x03\x04")])
        second = await two.begin([_key("e")])
        assert second[0].step == 1 and second[0].carried == b"\x01\x02\x03\x04"
        assert second[0].previous_decision == "d-e-None"
        other = await two.begin([_key("e", version="2")])  # another version: from zeros
        assert other[0].carried is None and other[0].state_reset is True
        await one.end("e")
        assert (await two.begin([_key("e")]))[0].step == 0

    asyncio.run(steps())
    assert one.secret == two.secret
    one.close()
    two.close()


def test_the_shared_store_is_indexed_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "episodes.sqlite"
    store = SharedEpisodes(path, max_episodes=5)
    store.PRUNE_EVERY_S = 0.0  # prune at every call, to see the bound

    async def steps() -> None:
        for index in range(20):
            await store.begin([_key(f"e{index}")])

    asyncio.run(steps())
    store.close()
    db = sqlite3.connect(path)
    indexes = db.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    assert ("episodes_seen",) in indexes
    plan = " ".join(
        str(row) for row in db.execute("EXPLAIN QUERY PLAN DELETE FROM episodes WHERE seen < 1")
    )
    assert "episodes_seen" in plan
    kept = {row[0] for row in db.execute("SELECT episode FROM episodes")}
    assert len(kept) <= 5 and "e19" in kept


def test_idle_and_excess_episodes_are_forgotten_in_memory() -> None:
    store = LocalEpisodes(max_episodes=3, idle_s=60)

    async def steps() -> None:
        for index in range(5):
            await store.begin([_key(f"e{index}")])
        assert len(store._entries) == 3
        late = await store.begin([_key("e0", step=4)])  # evicted: its state is gone
        assert late[0].state_reset is True and late[0].step == 4
        store._idle_s = 0.0  # everything held is now idle
        await asyncio.sleep(0.01)
        idle = await store.begin([_key("e4", step=1)])
        assert idle[0].state_reset is True

    asyncio.run(steps())


def test_a_locked_store_never_holds_up_other_requests(tmp_path: Path, cache_dir: Path) -> None:
    """Another worker holding the store's write lock delays only the steps that need it:
    the worker's event loop keeps answering. (The step counter this store replaces wrote
    SQLite on the event loop, so one lock held 30 s stopped every request of the worker.)"""
    path = tmp_path / "episodes.sqlite"
    store = SharedEpisodes(path)
    settings = Settings(
        policy_path=EXAMPLE, cache_dir=cache_dir, workers=1, metrics_port=0, client_languages=""
    )
    app = build_app(settings, episodes=store)
    headers = {"access-token": EXAMPLE_KEY}
    blocker = sqlite3.connect(path, isolation_level=None)
    with app_in_thread(app) as url, httpx.Client(base_url=url, headers=headers) as client:
        blocker.execute("BEGIN IMMEDIATE")  # another worker's write in progress
        step: dict[str, httpx.Response] = {}

        def send_step() -> None:
            body = {"observation": OBSERVATION, "episode_id": "waiting"}
            step["answer"] = httpx.post(url + "/predict", json=body, headers=headers, timeout=60)

        waiting = threading.Thread(target=send_step)
        waiting.start()
        time.sleep(1.0)  # for the step to reach the server and wait for the lock
        try:
            for _ in range(5):  # answered while the step waits for the lock
                plain = client.post("/predict", json=OBSERVATION, timeout=10)
                assert plain.status_code == 200
            assert waiting.is_alive() and "answer" not in step
        finally:
            blocker.execute("COMMIT")
        waiting.join(timeout=60)
    assert step["answer"].status_code == 200
    assert step["answer"].json()["step"] == 0


@pytest.mark.parametrize("shared", [False, True])
def test_a_client_step_zero_starts_the_episode_over(tmp_path: Path, shared: bool) -> None:
    store = SharedEpisodes(tmp_path / "e.sqlite") if shared else LocalEpisodes()

    async def steps() -> None:
        await store.begin([_key("e")])
        await store.keep([Carried("e", "p", "1", b"abcd")])
        again = await store.begin([_key("e", step=0)])
        assert again[0].carried is None and again[0].state_reset is False
        assert (await store.begin([_key("e")]))[0].step == 1

    asyncio.run(steps())
    store.close()
