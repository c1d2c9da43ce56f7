"""inferd's REST application behind two HTTP front ends: uvicorn, which ``inferd serve`` runs, and
granian's embedded server (``granian.server.embed``, on the caller's event loop), through its
ASGI and its RSGI interface. Issue 17 leaves the front end open, to be chosen by measurement.

    .venv/bin/python -m bench.front_end [--duration 6] [--rounds 2]

Rows, side by side in each round (digits model, TF Serving JSON, one instance per request):

- ``uvicorn``: ``inferd serve`` itself (uvicorn with inferd's connection limits, and its gRPC
  port and repository poll beside it);
- ``granian-asgi``: the same ``HttpApp`` under embedded granian's ASGI interface (no lifespan);
  it learns of a client's disconnect from ``receive()``, as under any ASGI server;
- ``granian-rsgi``: the same ``HttpApp`` under embedded granian's RSGI interface, through an
  adapter here that reads the body once, answers with one ``response_bytes`` call and watches
  the disconnect with ``client_disconnect()`` while the answer is computed. No gRPC port: the
  granian rows do a little less work than the uvicorn row.

Each server is pinned to CPU 0; ``wrk -t1`` (bench/wrk_post.lua), pinned to CPU 1, loads it for
2 s, then measures ``--duration`` seconds at 64 and at 1 connection, each run 6 s after the one
before. Reported: requests/s, p50,
p99 and the server's CPU per request (utime+stime of its process tree over the requests). granian
is installed with ``pip --target`` into bench/.venvs/granian-embed (the project does not depend
on it). Results go to stdout and bench/results/front-end.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import requests

from bench import models, procs
from inferd.protocols.http_connection import WATCH, RequestWatch
from tests.inferd_process import free_port

KINDS = ("uvicorn", "granian-asgi", "granian-rsgi")
GRANIAN = "granian==2.8.9"
HERE = Path(__file__).parent
GRANIAN_DIR = HERE / ".venvs" / "granian-embed"
RESULTS = HERE / "results" / "front-end.json"
CONNECTIONS = (64, 1)
SETTLE_S = 6.0
"""Seconds between two wrk runs: past ``inferd serve``'s 5 s ``--keep_alive_timeout_s``."""


class RsgiWatch(RequestWatch):
    """A ``RequestWatch`` over granian's RSGI protocol object instead of uvicorn's request cycle:
    the disconnect is watched (``client_disconnect()``) only while ``task`` is set, so a client
    that hangs up before is seen only then, and ``send_whole`` answers with one
    ``response_bytes`` call. ``task`` is set once per request, as ``HttpApp`` does."""

    __slots__ = ("_gone", "_proto", "_running", "_watch")

    def __init__(self, proto: Any) -> None:
        self._proto = proto
        self._running: asyncio.Task[Any] | None = None
        self._watch: Any = None
        self._gone = False
        super().__init__()  # sets task to None, through the property below

    @property
    def client_gone(self) -> bool:
        return self._gone

    @property
    def task(self) -> asyncio.Task[Any] | None:
        return self._running

    @task.setter
    def task(self, task: asyncio.Task[Any] | None) -> None:
        self._running = task
        if task is not None:
            self._watch = self._proto.client_disconnect()
            self._watch.add_done_callback(self._disconnected)
        elif self._watch is not None:
            self._watch, watch = None, self._watch
            if not watch.done():
                watch.cancel()

    def _disconnected(self, watch: Any) -> None:
        if not watch.cancelled():
            self._gone = True
            self.hang_up()

    def send_whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        if self._gone:
            return False
        pairs = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        self._proto.response_bytes(status, pairs, body)
        return True


class RsgiApp:
    """``HttpApp`` (an ASGI app) called from RSGI with the scope it reads and an ``RsgiWatch``."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        asgi_scope = {
            "type": "http",
            "method": scope.method,
            "path": scope.path,
            "raw_path": scope.path.encode("latin-1"),
            "query_string": scope.query_string.encode("latin-1"),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in scope.headers.items()],
            "extensions": {WATCH: RsgiWatch(proto)},
        }
        read = False

        async def receive() -> dict[str, Any]:
            nonlocal read
            if not read:
                read = True
                return {"type": "http.request", "body": await proto(), "more_body": False}
            await proto.client_disconnect()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            """Reached only when ``send_whole`` refused: the client is gone, nobody to answer."""

        await self._app(asgi_scope, receive, send)


async def serve_granian(interface: str, repo: Path, port: int) -> None:
    """inferd's REST application on ``port`` behind embedded granian until SIGTERM."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.server.embed import Server as Embedded

    from inferd.config import ServerConfig
    from inferd.server import Server

    server = Server(
        ServerConfig(repository=str(repo), rest_api_port=port, port=0, file_system_poll_wait_seconds=0)
    )
    await server.control.sync()
    app = server.http_app()
    http = Embedded(
        app if interface == "asgi" else RsgiApp(app),
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGINL if interface == "asgi" else Interfaces.RSGI,
        http=HTTPModes.http1,
        websockets=False,
        runtime_threads=1,
        backlog=1024,
        http1_settings=HTTP1Settings(keep_alive=True),
        log_level="warning",
        log_access=False,
    )
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, http.stop)
    await http.serve()
    await server.close()


def launch(kind: str, repo: Path, port: int, log: Path) -> procs.ServerProcess:
    pin = ["taskset", "-c", "0", sys.executable]
    env = dict(os.environ)
    if kind == "uvicorn":
        args = ["-m", "inferd", "serve", str(repo), f"--rest_api_port={port}", f"--port={free_port()}"]
        cmd = [*pin, *args, "--host=127.0.0.1"]
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(GRANIAN_DIR), env.get("PYTHONPATH"))))
        cmd = [*pin, "-m", "bench.front_end", f"--serve={kind}", f"--port={port}", f"--repo={repo}"]
    return procs.ServerProcess(cmd, HERE.parent, env, log)


def wrk(url: str, body: Path, connections: int, seconds: float) -> dict[str, Any]:
    script = HERE / "wrk_post.lua"
    argv = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"]
    out = subprocess.run([*argv, "-s", str(script), url, "--", str(body)], capture_output=True, text=True)
    found = re.search(r"^WRKJSON (.*)$", out.stdout, re.MULTILINE)
    if found is None:
        raise SystemExit(f"wrk gave no results: {out.stdout[-500:]} {out.stderr[-500:]}")
    result: dict[str, Any] = json.loads(found.group(1))
    return result


def measure(kind: str, repo: Path, body: Path, seconds: float, work: Path) -> list[dict[str, Any]]:
    """Start ``kind``, warm it up, and its rows at each of ``CONNECTIONS``."""
    port = free_port()
    server = launch(kind, repo, port, work / f"{kind}.log")
    url = f"http://127.0.0.1:{port}/v1/models/digits:predict"
    try:
        wait_answering(url, body.read_bytes(), server)
        wrk(url, body, 64, 2)
        rows = []
        for connections in CONNECTIONS:
            # Past the keep-alive timeout of the connections the last wrk dropped: new connections
            # inside it get some answers late behind uvicorn (docs/performance.md, the tail).
            time.sleep(SETTLE_S)
            before = procs.cpu_seconds(server.pids())
            result = wrk(url, body, connections, seconds)
            cpu = procs.cpu_seconds(server.pids()) - before
            answered = result["requests"]
            failed = result["non2xx"] + sum(result[k] for k in ("connect_errors", "read_errors", "timeouts"))
            rows.append(
                {
                    "kind": kind,
                    "connections": connections,
                    "requests_per_s": answered / (result["duration_us"] / 1e6),
                    "p50_ms": result["p50_us"] / 1000,
                    "p99_ms": result["p99_us"] / 1000,
                    "cpu_us_per_request": cpu / answered * 1e6,
                    "errors": failed,
                }
            )
        return rows
    finally:
        server.stop()


def wait_answering(url: str, body: bytes, server: procs.ServerProcess) -> None:
    """Wait (at most 60 s) until ``url`` answers ``body`` with 200; exit if the server died."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not server.alive():
            raise SystemExit(f"the server exited:\n{server.log_tail()}")
        try:
            if requests.post(url, data=body, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no answer from {url} within 60 s:\n{server.log_tail()}")


def digits_workspace(prefix: str) -> tuple[Path, Path, Path]:
    """A new folder (named ``prefix...``), a repository in it serving digits, and a predict body
    of one digits instance: (folder, repository, body file)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    repo = work / "models"
    models.build_digits(models.model_path(repo, "digits"))
    body = work / "digits.json"
    body.write_bytes(orjson.dumps({"instances": models.instances("digits", 1).astype(np.float32).tolist()}))
    return work, repo, body


def _install_granian() -> str:
    """granian in ``GRANIAN_DIR`` (installed once); its version."""
    marker = GRANIAN_DIR / ".installed"
    if not marker.exists() or marker.read_text() != GRANIAN:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--target", str(GRANIAN_DIR)]
        subprocess.run([*pip, GRANIAN], check=True)
        marker.write_text(GRANIAN)
    return GRANIAN.split("==")[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per row (default 6)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, servers started afresh (default 2)")
    parser.add_argument("--serve", choices=KINDS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve_granian(args.serve.removeprefix("granian-"), args.repo, args.port))
        return
    procs.install_cleanup()
    granian = _install_granian()
    work, repo, body = digits_workspace("inferd-front-end-")
    rounds = []
    for r in range(args.rounds):
        order = KINDS if r % 2 == 0 else KINDS[::-1]  # alternated, so that no row always runs first
        rows = [row for kind in order for row in measure(kind, repo, body, args.duration, work)]
        for row in sorted(rows, key=lambda row: (-row["connections"], KINDS.index(row["kind"]))):
            print(
                f"round {r + 1}  {row['kind']:13s} c={row['connections']:<3d} "
                f"{row['requests_per_s']:7,.0f} req/s  "
                f"p50 {row['p50_ms']:6.3f} ms  p99 {row['p99_ms']:6.2f} ms  "
                f"{row['cpu_us_per_request']:5.0f} us CPU/req  errors {row['errors']}",
                flush=True,
            )
        rounds.append(rows)
    RESULTS.write_text(
        json.dumps(
            {
                "command": " ".join(["python -m bench.front_end", *sys.argv[1:]]),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "duration_s": args.duration,
                "granian": granian,
                "rounds": rounds,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
