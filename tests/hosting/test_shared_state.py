"""What the workers of `serve --workers N` share: an admin's traffic change is recorded in
the run folder's state file without holding up the worker's event loop while another worker
holds the file's lock. A whole worker server in this process, on small ONNX policies."""

from __future__ import annotations

import asyncio
import fcntl
import threading
from pathlib import Path

from policy_server.hosting.shared_state import SharedPolicyManager, SharedState
from policy_server.metrics import Metrics
from policy_server.serving.lifecycle import PolicyManager
from policy_server.serving.registry import PolicyRegistry
from policy_server.settings import Settings
from tests.inprocess import ADMIN_KEY, in_process, repository, settings


def test_a_traffic_change_waits_for_the_state_lock_off_the_event_loop(tmp_path: Path) -> None:
    state = SharedState(tmp_path / "state.json")
    slot = (tmp_path / "worker-0.lock").open("ab")

    def manager(values: Settings, registry: PolicyRegistry, metrics: Metrics) -> PolicyManager:
        return SharedPolicyManager(values, registry, metrics, state, slot)

    released = threading.Event()
    order: list[str] = []

    async def scenario() -> None:
        root = repository(tmp_path / "repository", {"1": 1, "2": 2}, {"1": 50, "2": 50})
        async with in_process(settings(root, tmp_path / "cache"), managers=manager) as server:
            with state.path.with_suffix(".lock").open("ab") as other_worker:
                fcntl.flock(other_worker.fileno(), fcntl.LOCK_EX)

                # Released later in any case, so that a blocked event loop cannot hang the test.
                def release() -> None:
                    released.set()
                    other_worker.close()

                timer = threading.Timer(5.0, release)
                timer.start()
                change = asyncio.create_task(
                    server.client.put(
                        "/admin/policies/p/traffic",
                        json={"traffic": {"1": 100}},
                        headers={"access-token": ADMIN_KEY},
                    )
                )
                await asyncio.sleep(0.1)
                health = await server.client.get("/")
                assert health.status_code == 200
                order.append("health answered" + (" after" if released.is_set() else " before"))
                timer.join()
            response = await change
            assert response.status_code == 200, response.text
            assert response.json()["traffic"] == {"1": 100.0}

    asyncio.run(scenario())
    slot.close()
    assert order == ["health answered before"], "the loop answered while the lock was held"
    assert state.read().traffic == {"p": ({"1": 100}, None)}
