"""What one request costs inferd's REST connection (its HTTP parsing, request cycle, scope and
answer writing) in CPU, in process: no sockets, and an application that only answers.

    .venv/bin/python -m bench.connection_cost [--requests 20000] [--rounds 5]

Feeds a kept-alive connection of ``inferd serve``'s protocol class (``connection_class``) one
TF Serving predict request at a time, as a socket read would bring it whole, through a transport
that only counts its writes; the application answers with ``RequestWatch.send_whole``, as
inferd's does. Prints the CPU per request (``time.process_time``), the fastest of ``--rounds``
runs, including the two turns of the event loop that let the request's task run. Run it pinned
(``taskset -c 0``) on an idle machine, and against another commit with that checkout's ``src``
on ``PYTHONPATH``, alternately, to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import uvicorn
import uvloop
from uvicorn.server import ServerState

from inferd.protocols.http_connection import WATCH, ConnectionLimits, connection_class

REQUEST = (
    b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: 127.0.0.1:8501\r\nContent-Length: 11\r\n"
    b'Content-Type: application/json\r\n\r\n{"a": 1.0}\n'
)
ANSWER = b'{"predictions": [[1.0]]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]


class Transport:
    """What the connection uses of an asyncio transport; counts the writes."""

    def __init__(self) -> None:
        self.writes = 0
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8501), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the body, answer it whole."""
    await receive()
    if not scope["extensions"][WATCH].send_whole(200, HEADERS, ANSWER):
        raise RuntimeError("the answer was not written whole")


async def measure(requests: int, rounds: int) -> float:
    """The least CPU seconds per request of ``rounds`` runs of ``requests``, after a warm-up."""
    protocol = connection_class(ConnectionLimits(100, 60.0, 60.0, 65536))
    config = uvicorn.Config(
        app, lifespan="off", proxy_headers=False, loop="none", log_level="warning", http=protocol
    )
    config.load()
    connection = protocol(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]

    async def run(n: int) -> float:
        started = time.process_time()
        for _ in range(n):
            connection.data_received(REQUEST)
            await asyncio.sleep(0)  # the request's task reads the body and answers
            await asyncio.sleep(0)  # its done callbacks
        return (time.process_time() - started) / n

    await run(requests // 10)
    best = min([await run(requests) for _ in range(rounds)])
    if transport.writes < requests or transport.closing:
        raise SystemExit(f"answered {transport.writes} requests, closed: {transport.closing}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000, help="requests per run (default 20,000)")
    parser.add_argument("--rounds", type=int, default=5, help="runs; the fastest counts (default 5)")
    args = parser.parse_args()
    best = uvloop.run(measure(args.requests, args.rounds))
    print(f"inferd's REST connection: {best * 1e6:.2f} us CPU per request (with 2 turns of the event loop)")


if __name__ == "__main__":
    main()
