"""Shared fixtures: a real ``inferd serve`` process per test (``tests/inferd_process.py``, which
bench/ uses too, holds the process, its free ports and its waits)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.inferd_process import ServerProcess, free_port, launch

__all__ = ["ServerProcess", "free_port", "launch", "start_server"]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``inferd serve`` with the given arguments (see ``launch``), polling every 0.2 s so
    that hot-reload tests run fast; every server started is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(*args: str, wait: bool = True) -> ServerProcess:
        server = launch(tmp_path, *args, poll_s=0.2, wait=wait)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
