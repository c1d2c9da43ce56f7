"""What grpcio's Python servers cost per call, before any model server runs in them: the gRPC floor.

    .venv/bin/python -m bench.grpc_floor [--duration 5] [--concurrency 64] [--rounds 2]

Each server answers one unary method by returning its request (100 bytes), nothing else, pinned
to CPU 0; the load generator, pinned to CPU 1, is one grpc.aio client process keeping
``--concurrency`` calls in flight on one channel. Rows, side by side in each round:

- ``aio``: ``grpc.aio.server``, the API inferd's gRPC port runs on, without interceptors;
- ``aio+2``: the same with two pass-through interceptors, as many as inferd's port has (the token
  and byte-budget check, the parse guard);
- ``sync``: ``grpc.server`` with a pool of 8 threads, the handler running on a pool thread;
- ``sync->asyncio``: the same, each call handed to an asyncio (uvloop) loop on another thread with
  ``run_coroutine_threadsafe`` and waited for, which an asyncio core behind the sync server pays.

Reported per row: calls per second, the server's CPU per call (its utime+stime over the calls) and
each row's ratio to ``aio``. Results go to stdout and bench/results/grpc-floor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

from bench import procs

KINDS = ("aio", "aio+2", "sync", "sync->asyncio")
METHOD = "/bench.Echo/Echo"
RESULTS = Path(__file__).parent / "results" / "grpc-floor.json"


def _echo_handler(behaviour: Any) -> Any:
    import grpc

    service, method = METHOD.strip("/").split("/")
    return grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(behaviour)}
    )


async def _serve_aio(port: int, interceptors: int) -> None:
    import grpc

    class PassThrough(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            return await continuation(details)

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.aio.server(interceptors=[PassThrough() for _ in range(interceptors)])
    server.add_generic_rpc_handlers((_echo_handler(echo),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _serve_sync(port: int, bridged: bool) -> None:
    import grpc
    import uvloop

    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def work(request: bytes) -> bytes:
        return request

    def echo(request: bytes, context: Any) -> bytes:
        return asyncio.run_coroutine_threadsafe(work(request), loop).result() if bridged else request

    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((_echo_handler(echo),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve(kind: str, port: int) -> None:
    """Run the ``kind`` server on ``port`` until killed."""
    if kind.startswith("aio"):
        asyncio.run(_serve_aio(port, 2 if kind == "aio+2" else 0))
    else:
        _serve_sync(port, bridged=kind == "sync->asyncio")


async def _load(port: int, concurrency: int, seconds: float) -> int:
    """Calls answered in ``seconds``, ``concurrency`` in flight at a time."""
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
        payload = b"x" * 100
        for _ in range(200):  # warm-up
            await call(payload)
        done = 0
        stop = time.monotonic() + seconds

        async def client() -> None:
            nonlocal done
            while time.monotonic() < stop:
                assert await call(payload) == payload
                done += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return done


def measure(kind: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """Start ``kind`` on CPU 0, load it from this process on CPU 1; its row."""
    port = _free_port()
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "bench.grpc_floor", "--serve", kind, f"--port={port}"]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"grpc-floor-{os.getpid()}.log"
    server = procs.ServerProcess(cmd, Path(__file__).parent.parent, dict(os.environ), log)
    try:
        asyncio.run(_load(port, concurrency, 1.0))  # ready, and warm
        before = procs.cpu_seconds(server.pids())
        calls = asyncio.run(_load(port, concurrency, seconds))
        cpu = procs.cpu_seconds(server.pids()) - before
    finally:
        server.stop()
    return {"kind": kind, "calls_per_s": calls / seconds, "cpu_us_per_call": cpu / calls * 1e6}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    procs.install_cleanup()
    os.sched_setaffinity(0, {1})
    rounds = []
    for r in range(args.rounds):
        rows = [measure(kind, args.concurrency, args.duration) for kind in KINDS]
        base = rows[0]["calls_per_s"]
        for row in rows:
            row["ratio_to_aio"] = row["calls_per_s"] / base
            print(
                f"round {r + 1}  {row['kind']:14s} {row['calls_per_s']:8,.0f} calls/s  "
                f"{row['cpu_us_per_call']:6.0f} us CPU/call  {row['ratio_to_aio']:.2f}x aio",
                flush=True,
            )
        rounds.append(rows)
    result = {
        "command": " ".join(["python -m bench.grpc_floor", *sys.argv[1:]]),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "grpcio": _version("grpcio"),
        "rounds": rounds,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


if __name__ == "__main__":
    main()
