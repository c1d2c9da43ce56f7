"""``bench/loadgen.py``'s trivial server, on uvloop as the benchmark runs it, answers
``inferd bench`` (its transports are not ``asyncio.Transport`` subclasses)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from bench.loadgen import BODY, serve, wait_open
from inferd.loadtest.drivers import CLOSED, measure
from inferd.loadtest.payloads import build
from tests.inferd_process import free_port


def test_the_hello_server_answers_the_bench(tmp_path: Path) -> None:
    port = free_port()
    server = multiprocessing.get_context("fork").Process(target=serve, args=(port,), daemon=True)
    server.start()
    try:
        wait_open(port)
        (tmp_path / "b.json").write_bytes(BODY)
        payload = build(f"http://127.0.0.1:{port}", "rest", "hello", payload=tmp_path / "b.json")
        samples = measure(payload, CLOSED, 2, time.monotonic_ns(), 0.0, 0.3, timeout_s=2)
    finally:
        server.terminate()
        server.join(5)
    assert set(samples.all_statuses) == {"200"}
