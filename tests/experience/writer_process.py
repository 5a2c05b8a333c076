"""A worker process for the crash tests: logs decisions and prints each acknowledged id.

Usage: writer_process.py DIRECTORY sync|async COUNT
With sync, each id is printed once `append` returned, i.e. once it is durable. With async
it prints "queued N" after queuing everything, then waits for SIGTERM and closes the log.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from policy_server.experience import DecisionLog
from tests.experience.records import simple


async def durable(log: DecisionLog, count: int) -> None:
    async def one(index: int) -> None:
        record = simple(index)
        await log.append([record])
        print(record["decision_id"], flush=True)

    # Many concurrent appends, so group commits hold several records.
    for start in range(0, count, 16):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + 16))))
    await asyncio.Event().wait()  # the parent kills us


async def queued(log: DecisionLog, count: int) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    for index in range(count):
        await log.append([simple(index)])
    print(f"queued {count}", flush=True)
    await stop.wait()
    await log.aclose()


def main() -> None:
    directory, mode, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    log = DecisionLog(directory, sync=mode == "sync", max_queue=100_000)
    asyncio.run(durable(log, count) if mode == "sync" else queued(log, count))


if __name__ == "__main__":
    main()
