#!/usr/bin/env python
"""How fast is ``inferd bench`` as a load generator? Side by side with wrk, on a trivial endpoint.

A tiny raw-asyncio HTTP/1.1 server (uvloop, keep-alive, answers every request with ``200 ok``)
runs pinned to CPU 0; wrk (``-t1``) and then ``inferd bench`` (one process) load it, each pinned
to CPU 1, with the same POST body and the same connection counts. The ratio bench/wrk is what
bench/README.md and docs/bench.md report (target: at least 0.5).

    .venv/bin/python -m bench.loadgen                      # c = 1, 16, 64; 5 s each
    .venv/bin/python -m bench.loadgen --connections 64 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

from tests.inferd_process import free_port

BODY = json.dumps({"instances": [[0.5] * 64]}).encode()
SERVER_CPU, LOAD_CPU = "0", "1"


class Hello(asyncio.Protocol):
    """Answers each request (headers plus Content-Length body) with 200 ok."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they write.
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        answers = 0
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buffer[:end]).lower()
            at = head.find(b"content-length:")
            length = (
                int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
                if at >= 0
                else 0
            )
            if len(buffer) < end + 4 + length:
                break
            del buffer[: end + 4 + length]
            answers += 1
        if answers:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok" * answers
            )


def serve(port: int) -> None:
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Hello, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    uvloop.run(main())


def wait_open(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("the hello server did not start")


def run_wrk(port: int, connections: int, seconds: float, script: Path) -> float:
    url = f"http://127.0.0.1:{port}/v1/models/hello:predict"
    argv = [
        "taskset",
        "-c",
        LOAD_CPU,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def run_bench(port: int, connections: int, seconds: float, body: Path) -> float:
    argv = [
        "taskset",
        "-c",
        LOAD_CPU,
        sys.executable,
        "-m",
        "inferd",
        "bench",
        f"http://127.0.0.1:{port}",
        "--model=hello",
        f"--payload={body}",
        f"--concurrency={connections}",
        f"--duration={seconds}",
        "--warmup=1",
        "--metrics-url=",
        "--json=-",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    (step,) = json.loads(out)["steps"]
    assert not step["errors"], step["errors"]
    return float(step["requests_per_s"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    port = free_port()
    server = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, sys.executable, "-m", "bench.loadgen", "--serve", str(port)]
    )
    try:
        wait_open(port)
        with tempfile.TemporaryDirectory() as tmp:
            body = Path(tmp) / "body.json"
            body.write_bytes(BODY)
            script = Path(tmp) / "post.lua"
            script.write_text(
                f'wrk.method = "POST"\nwrk.body = [[{BODY.decode()}]]\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
            print(f"{'connections':>11}  {'wrk req/s':>10}  {'inferd bench req/s':>18}  {'ratio':>5}")
            for connections in args.connections:
                wrk = run_wrk(port, connections, args.seconds, script)
                bench = run_bench(port, connections, args.seconds, body)
                print(f"{connections:>11}  {wrk:>10,.0f}  {bench:>18,.0f}  {bench / wrk:>5.2f}", flush=True)
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
    else:
        raise SystemExit(main())
