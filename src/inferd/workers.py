"""``--workers N``: one supervisor process and N worker processes that share the REST and gRPC
ports.

The supervisor binds nothing it serves: it reserves both ports (``_reserve``: bound, never
listening, so that another server cannot take them, not even while no worker listens yet), makes
a private folder, and forks the workers before it has loaded anything (no model, no thread, no
event loop: forking is safe and cheap). Each worker is a whole server (``server.run``): it binds
its own listening sockets with ``SO_REUSEPORT`` on both ports, so the kernel spreads new
connections over the workers, loads every model, and tells the supervisor when it listens. The
private folder carries what the workers share: the admin state (``control.AdminStateFile``), the
rollouts (``rollout.RolloutBook``) and each worker's metrics socket (``worker_metrics``).

The supervisor restarts a worker that exits (logged; at once if it had been serving, after a
growing pause of up to ``MAX_RESTART_DELAY_S`` while it keeps failing to start), forwards
SIGTERM and SIGINT to every worker (a second signal ends their drain at once, as for one
process), and exits 0 once they have all exited; it exits with a worker's status only when the
workers cannot start (a worker exits before any of them listened). A worker whose supervisor is
gone drains and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from inferd.config import ServerConfig
from inferd.errors import ConfigError

log = logging.getLogger(__name__)

MAX_RESTART_DELAY_S = 30.0
"""Longest pause before restarting a worker that keeps exiting before it serves."""


@dataclass(frozen=True, slots=True)
class WorkerLink:
    """What a worker knows of its supervisor: its number (0 to N-1, kept by its successors), the
    folder the workers share, and its end of a socket pair with the supervisor (it writes once
    when it listens; end of file on it means the supervisor is gone)."""

    number: int
    folder: Path
    channel: socket.socket

    def ready(self) -> None:
        """Tell the supervisor this worker listens on both ports."""
        self.channel.sendall(b"r")


@dataclass(slots=True)
class _Worker:
    number: int
    pid: int
    channel: socket.socket
    ready: bool = False


class Supervisor:
    """Runs ``count`` workers of ``config`` (see the module's docstring). Single-threaded; call
    ``run`` from the main thread."""

    def __init__(self, config: ServerConfig, count: int) -> None:
        self._config = config
        self._count = count
        self._reserved: list[socket.socket] = []
        self._loose: dict[int, str] = {}  # index in _reserved -> flag, of those bound loosely
        self._workers: dict[int, _Worker] = {}  # by pid
        self._restarts: dict[int, float] = {}  # worker number -> monotonic time to start it
        self._delays: dict[int, float] = {}  # worker number -> pause before its next restart
        self._signals = 0
        self._forwarded = 0
        self._serving = False  # some worker has listened
        self._status = 0
        self._folder = Path()

    def run(self) -> int:
        """Reserve the ports, start the workers, supervise them until a signal (or until they
        cannot start); returns the exit status.

        Raises:
            ConfigError: a port cannot be bound.
        """
        config = self._reserve_ports()
        self._folder = Path(tempfile.mkdtemp(prefix="inferd-workers-"))
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for number in range(self._count):
                self._start(config, number)
            self._supervise(config)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for reserved in self._reserved:
                reserved.close()
            shutil.rmtree(self._folder, ignore_errors=True)
        return self._status

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1

    def _reserve_ports(self) -> ServerConfig:
        """Reserve the REST and gRPC ports; the config the workers get (a REST port of 0 is
        replaced by the one chosen)."""
        host, rest = self._config.host, self._config.rest_api_port
        rest = self._hold(host, rest, "--rest_api_port", "REST")
        config = dataclasses.replace(self._config, rest_api_port=rest)
        if config.port:
            self._hold(host, config.port, "--port", "gRPC")
        return config

    def _hold(self, host: str, port: int, flag: str, what: str) -> int:
        reserved, strict = _reserve(host, port, flag, what)
        if not strict:
            self._loose[len(self._reserved)] = flag
        self._reserved.append(reserved)
        return int(reserved.getsockname()[1])

    def _tighten(self) -> None:
        """Replace each loose reservation with a strict one once the port allows it."""
        for index, flag in list(self._loose.items()):
            loose = self._reserved[index]
            with contextlib.suppress(OSError):
                self._reserved[index] = _strict(loose.family, loose.getsockname())
                loose.close()
                del self._loose[index]
                log.info("%s: the port is reserved strictly again", flag)

    def _start(self, config: ServerConfig, number: int) -> None:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                ours.close()
                for other in [*self._reserved, *(w.channel for w in self._workers.values())]:
                    other.close()
                status = _work(config, WorkerLink(number, self._folder, theirs))
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        theirs.close()
        self._workers[pid] = _Worker(number, pid, ours)
        log.info("worker %d started (pid %d)", number, pid)

    def _supervise(self, config: ServerConfig) -> None:
        stopping = False
        while self._workers or (self._restarts and not stopping):
            channels = {w.channel.fileno(): w for w in self._workers.values()}
            readable, _, _ = select.select(list(channels), [], [], 0.2)
            for fd in readable:
                worker = channels[fd]
                if worker.channel.recv(16) and not worker.ready:
                    worker.ready = True
                    self._delays.pop(worker.number, None)
                    self._serving = True
                    if len(self._workers) == self._count and all(w.ready for w in self._workers.values()):
                        log.info("all %d workers serving", self._count)
            self._reap(stopping)
            if self._loose:
                self._tighten()
            if self._signals > self._forwarded:
                stopping = True
                self._restarts.clear()
                self._forward(signal.SIGTERM)
            if not self._serving and self._status and not stopping:  # the workers cannot start
                stopping = True
                self._restarts.clear()
                self._forward(signal.SIGTERM)
            now = time.monotonic()
            for number, due in list(self._restarts.items()):
                if due <= now and not stopping:
                    del self._restarts[number]
                    self._start(config, number)

    def _forward(self, sig: signal.Signals) -> None:
        self._forwarded = self._signals
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                os.kill(worker.pid, sig)

    def _reap(self, stopping: bool) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            worker.channel.close()
            code = os.waitstatus_to_exitcode(wait_status)
            how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            if stopping:
                log.info("worker %d (pid %d) exited (%s)", worker.number, pid, how)
            elif not self._serving:
                log.error("worker %d (pid %d) could not start (%s)", worker.number, pid, how)
                self._status = self._status or (code if code > 0 else 1)
            else:
                delay = 0.0 if worker.ready else self._delays.get(worker.number, 0.5)
                if not worker.ready:
                    self._delays[worker.number] = min(2 * delay, MAX_RESTART_DELAY_S)
                log.warning(
                    "worker %d (pid %d) exited (%s); starting a new one%s",
                    worker.number,
                    pid,
                    how,
                    f" in {delay:.1f} s" if delay else "",
                )
                self._restarts[worker.number] = time.monotonic() + delay


def _reserve(host: str, port: int, flag: str, what: str) -> tuple[socket.socket, bool]:
    """A socket bound to ``host:port``, never listening, that keeps other servers off the port
    while the workers listen on it with their own ``SO_REUSEPORT`` sockets; and whether it is
    strict (see ``_strict``). Loose only when the port still holds connections in TIME_WAIT of a
    server without ``SO_REUSEPORT`` (up to a minute): then another server could bind the port
    until a worker listens, so it is logged, and the supervisor tightens it once it can.

    Raises:
        ConfigError: the port is in use or cannot be bound.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        raise ConfigError(
            f"cannot listen for {what} on {host}:{port} (--host): {exc.strerror or exc}"
        ) from exc
    probe = socket.socket(family, kind, proto)
    try:
        # First as another server would bind it (SO_REUSEADDR, no SO_REUSEPORT): a port another
        # server shares among its own processes is as taken as a port one process listens on.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        address = probe.getsockname()
        probe.close()
        try:
            return _strict(family, address), True
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        loose = socket.socket(family, kind, proto)
        try:
            loose.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            loose.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            loose.bind(address)
        except OSError:
            loose.close()
            raise
    except OSError as exc:
        probe.close()
        reason = "is the port in use?" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ConfigError(f"cannot listen for {what} on {host}:{port} ({flag}); {reason}") from exc
    log.warning(
        "%s: the port still holds closed connections of another server (TIME_WAIT); until they "
        "expire or a worker listens, another server could start on it too",
        flag,
    )
    return loose, False


def _strict(family: int, address: tuple[Any, ...]) -> socket.socket:
    """A socket bound to ``address`` with ``SO_REUSEPORT`` and without ``SO_REUSEADDR``. Linux
    lets a socket with ``SO_REUSEADDR`` bind beside any bound socket that has it too and does
    not listen (a reservation with it kept no one out while the workers loaded their models);
    beside this one, only ``SO_REUSEPORT`` sockets of the same user bind: the workers', not the
    first bind of another inferd server, nor most servers'.

    Raises:
        OSError: the address cannot be bound (EADDRINUSE: in use, or in TIME_WAIT).
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _work(config: ServerConfig, link: WorkerLink) -> int:
    """A worker's life: a whole server on the shared ports; returns its exit status."""
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor alone, which forwards it once
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    prefix = f"%(asctime)s %(levelname)s worker {link.number} %(name)s: %(message)s"
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(prefix))
    from inferd import server

    try:
        server.run(config, link)  # exits the process itself once it has drained
    except ConfigError as exc:
        print(f"inferd: {exc.message}", file=sys.stderr)
        return 2
    return 0
