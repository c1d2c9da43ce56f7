"""Server processes: start in their own process group, find their whole tree, measure CPU and
memory from /proc, and kill the tree for sure (at exit, on exceptions and on Ctrl-C too)."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
_LIVE: list[ServerProcess] = []


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces: split after its closing parenthesis. Fields then start at 3 (state).
    return raw[raw.rindex(")") + 2 :].split()


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def tree(root: int, pgid: int, sid: int) -> set[int]:
    """The root, its descendants, and anything in its process group or session (daemons that
    re-parented themselves to init, as Ray's do, stay in the session unless they call setsid)."""
    parent: dict[int, int] = {}
    found = {root}
    for pid in _all_pids():
        st = _stat(pid)
        if st is None:
            continue
        ppid, pg, s = int(st[1]), int(st[2]), int(st[3])
        parent[pid] = ppid
        if pg == pgid or s == sid:
            found.add(pid)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return {p for p in found if _stat(p) is not None}


def cpu_seconds(pids: set[int]) -> float:
    """utime+stime of each live process plus cutime+cstime (its reaped children)."""
    total = 0
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            total += int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])
    return total / CLK_TCK


def memory_bytes(pids: set[int]) -> int:
    """Sum of PSS over the tree (shared pages split between the processes that map them, so forked
    workers are not counted twice); RSS where smaps_rollup cannot be read."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            st = _stat(pid)
            if st is not None:
                total += int(st[21]) * PAGE
    return total


class ServerProcess:
    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.pgid = self.sid = self.pid
        self._known: set[int] = {self.pid}
        _LIVE.append(self)

    def pids(self) -> set[int]:
        found = tree(self.pid, self.pgid, self.sid) if self.alive() else set()
        self._known |= found
        return found

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace: float = 10.0) -> None:
        if self in _LIVE:
            _LIVE.remove(self)
        pids = self.pids() | self._known
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, sig)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
            while time.monotonic() < deadline:
                self.proc.poll()
                if not any((st := _stat(p)) is not None and st[0] != "Z" for p in pids):
                    break
                time.sleep(0.1)
            else:
                continue
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()


class MemorySampler:
    """Samples the tree's memory every ``period`` seconds in a thread; ``peak`` is the maximum."""

    def __init__(self, server: ServerProcess, period: float = 0.25) -> None:
        self.server, self.period, self.peak = server, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, memory_bytes(self.server.pids()))
            self._stop.wait(self.period)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stop_all() -> None:
    for server in list(_LIVE):
        server.stop(grace=5)


def _on_signal(signum: int, frame: object) -> None:
    stop_all()
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(stop_all)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
