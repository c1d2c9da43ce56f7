"""What handing a call to a thread and awaiting it costs the process, in CPU.

    taskset -c 0 .venv/bin/python -m bench.thread_hop [--calls 20000] [--rounds 3]

Awaits a call that does nothing on two threads, from 1, 8 and 64 tasks at once on a uvloop event
loop, through ``loop.run_in_executor`` on a ``ThreadPoolExecutor`` and through inferd's
``ThreadPool``, and prints the CPU per call (``time.process_time``: every thread), the fastest of
``--rounds`` runs. Unbatched model calls too slow for the event loop, and batches, take this hop.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import uvloop

from inferd.threads import ThreadPool

CONCURRENCY = (1, 8, 64)


def nothing(value: int) -> int:
    return value


async def cpu_per_call(call: Callable[[], Awaitable[int]], calls: int, concurrency: int) -> float:
    """CPU seconds per call over ``calls`` calls from ``concurrency`` tasks."""

    async def task(n: int) -> None:
        for _ in range(n):
            await call()

    started = time.process_time()
    await asyncio.gather(*(task(calls // concurrency) for _ in range(concurrency)))
    return (time.process_time() - started) / (calls // concurrency * concurrency)


async def measure(calls: int, rounds: int) -> None:
    loop = asyncio.get_running_loop()
    executor, pool = ThreadPoolExecutor(2), ThreadPool(2, "hop")
    cases: list[tuple[str, Callable[[], Awaitable[int]]]] = [
        ("run_in_executor(ThreadPoolExecutor)", lambda: loop.run_in_executor(executor, nothing, 1)),
        ("ThreadPool.run", lambda: pool.run(nothing, 1)),
    ]
    try:
        for concurrency in CONCURRENCY:
            for name, call in cases:
                await cpu_per_call(call, calls // 10, concurrency)  # warm-up
                best = min([await cpu_per_call(call, calls, concurrency) for _ in range(rounds)])
                print(f"{name:36s} c={concurrency:<3d} {best * 1e6:6.1f} us CPU per call", flush=True)
    finally:
        executor.shutdown()
        pool.shutdown()


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--calls", type=int, default=20_000, help="calls per run (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per case; the fastest counts (default 3)")
    args = parser.parse_args()
    uvloop.run(measure(args.calls, args.rounds))


if __name__ == "__main__":
    main()
