"""A slow forward pass (the TensorFlow fallback, a large batch, a big model) neither holds up
the worker's other connections nor outlives --inference-timeout-s. A whole server in this
process, with its own micro-batcher, on a real ONNX model that takes about 20 ms a row."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.inprocess import in_process, onnx_policy, settings

# About 335 MFLOP a row: 240 rows are over a second of model time even on a fast machine,
# far past the 0.3 s time-out.
SLOW_ROWS = 240


def test_a_slow_batch_times_out_and_other_requests_are_answered_meanwhile(
    tmp_path: Path,
) -> None:
    order: list[str] = []

    async def scenario() -> int:
        onnx_policy(tmp_path / "slow", slow=True)
        values = settings(tmp_path / "slow", tmp_path / "cache", inference_timeout_s=0.3)
        async with in_process(values) as server:
            body = {"observations": [[0.1, 0.2, 0.3, 0.4]] * SLOW_ROWS}

            async def slow() -> int:
                response = await server.client.post("/predict_raw_batch", json=body)
                order.append("slow batch")
                return response.status_code

            async def health() -> None:
                await asyncio.sleep(0.05)  # the slow batch is in the model by now
                assert (await server.client.get("/")).status_code == 200
                ready = await server.client.get("/ready")
                assert ready.json()["ready"] is True
                order.append("health and readiness")

            status, _ = await asyncio.gather(slow(), health())
            return status

    assert asyncio.run(scenario()) == 504
    assert order == ["health and readiness", "slow batch"]
