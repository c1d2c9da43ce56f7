"""Worker processes: a model version loaded and run in a child process (``isolation = "process"``).

The child is a fresh interpreter (``python -c "...worker import main; main(FD)"``) that
inherits nothing but one end of a socket pair, loads the version with the runtime it would use
in-process, and answers ``predict`` calls over the socket. Calls are pipelined: each carries an
id, the child runs them on a thread pool of its own and answers in any order, so several calls
at once stay several calls at once. Tensors travel pickled (protocol 5): those of 64 KiB or more
as out-of-band buffers, written as they lie in memory and read straight into a fresh writable
buffer on the other side (one copy per direction); smaller ones inside the pickle, which costs
less than one more message.

When the child dies (a segfault, ``os._exit``, a kill), the calls it had are answered at once
with ``WorkerDied`` (INTERNAL), every later call too, and the ``on_exit`` callback given to
``supervise`` is told why; the manager then takes the version out of service. The child exits
by itself when the server's end of the pipe closes, so it never outlives the server.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

from inferd.config import ModelSettings
from inferd.errors import InferdError, Internal, ModelLoadError
from inferd.types import Signature, Tensors

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<QBI")
"""Every message starts with: call id, kind, number of out-of-band buffers; then their sizes."""

_OK, _ERROR, _CALL, _STOP = range(4)
_LOAD_CALL = 0
"""The id of the child's first message: the outcome of loading."""

IN_BAND_BYTES = 64 * 1024
"""Tensors smaller than this travel inside the pickle; larger ones as messages of their own."""

STOP_TIMEOUT_S = 10.0
"""How long ``close`` waits for the child to finish its calls and exit before killing it."""


class WorkerDied(Internal):
    """The model's worker process died; the version is out of service until it is reloaded."""


def load_in_worker(
    version_dir: Path, settings: ModelSettings, platform: str | None
) -> tuple[WorkerModel, str]:
    """Start a worker process and load the version in it; blocking.

    Returns:
        The model, whose calls go to the worker, and the runtime's name.

    Raises:
        ModelLoadError: the runtime refused the files, or the worker died while loading.
    """
    server_end, worker_end = multiprocessing.Pipe()
    process = subprocess.Popen(
        [sys.executable, "-c", f"from {__name__} import main; main({worker_end.fileno()})"],
        pass_fds=(worker_end.fileno(),),
    )
    worker_end.close()  # the worker holds the only copy now, so its death reads as end-of-file here
    in_process = dataclasses.replace(settings, isolation="none")
    level = logging.getLogger().getEffectiveLevel()
    try:
        _send(server_end, _LOAD_CALL, _CALL, (version_dir, in_process, platform, level))
        _, kind, data, buffers = _receive(server_end)
    except (EOFError, OSError):
        server_end.close()
        raise ModelLoadError(
            f"the worker process loading {version_dir} died: {_exit_reason(_reap(process))}"
        ) from None
    payload = pickle.loads(data, buffers=buffers)
    if kind == _ERROR:
        server_end.close()
        _reap(process)
        raise _rebuild_error(payload, ModelLoadError)
    runtime, signatures = payload
    log.info("%s runs in worker process %d", version_dir, process.pid)
    return WorkerModel(process, server_end, signatures, str(version_dir)), runtime


class WorkerModel:
    """A model version in a worker process, behind the ``Model`` protocol; thread-safe."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        conn: Connection,
        signatures: Mapping[str, Signature],
        name: str,
    ) -> None:
        self._process = process
        self._conn = conn
        self._signatures = dict(signatures)
        self._name = name
        self._ids = itertools.count(_LOAD_CALL + 1)
        self._calls: dict[int, Future[Tensors]] = {}
        self._lock = threading.Lock()  # guards _calls, _failure, _stopping, _on_exit
        self._send_lock = threading.Lock()
        self._failure: str | None = None
        self._stopping = False
        self._on_exit: Callable[[str], None] | None = None
        self._reader = threading.Thread(target=self._read_replies, name=f"inferd-worker-{process.pid}")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def signatures(self) -> Mapping[str, Signature]:
        return self._signatures

    def supervise(self, name: str, on_exit: Callable[[str], None]) -> None:
        """Name the version in messages, and have ``on_exit(reason)`` called once, from another
        thread, if the worker dies unexpectedly (at once if it already has)."""
        with self._lock:
            self._name = name
            failure = self._failure
            self._on_exit = on_exit if failure is None else None
        if failure is not None:
            on_exit(failure)

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors:
        """Run one call in the worker; blocks until it answers.

        Raises:
            WorkerDied: the worker died before answering.
            InferdError: as the in-process model would raise it (e.g. InvalidArgument).
            RuntimeError: the model failed otherwise; the message has its exception.
        """
        future: Future[Tensors] = Future()
        with self._lock:
            if self._failure is not None:
                raise WorkerDied(self._failure)
            call_id = next(self._ids)
            self._calls[call_id] = future
        try:
            with self._send_lock:
                _send(self._conn, call_id, _CALL, (signature_name, dict(inputs)))
        except (OSError, ValueError):
            pass  # the worker is gone: the reader sees the end of the pipe and fails the call
        except Exception:  # inputs that do not pickle
            with self._lock:
                self._calls.pop(call_id, None)
            raise
        return future.result()

    def close(self) -> None:
        """Let the worker finish its calls and exit (killed after ``STOP_TIMEOUT_S``); reaps it."""
        with self._lock:
            self._stopping = True
        try:
            with self._send_lock:
                _send(self._conn, _LOAD_CALL, _STOP, None)
        except (OSError, ValueError):
            pass  # already gone
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("worker process %d of %s did not stop; killing it", self._process.pid, self._name)
            _reap(self._process)
        self._reader.join()
        self._conn.close()

    def _read_replies(self) -> None:
        try:
            while True:
                frame = _receive(self._conn)
                with self._lock:
                    future = self._calls.pop(frame[0], None)
                if future is None:
                    continue
                _, kind, data, buffers = frame
                try:
                    payload = pickle.loads(data, buffers=buffers)
                except Exception as exc:  # e.g. outputs holding objects of the user's own classes
                    future.set_exception(RuntimeError(f"the worker's answer did not unpickle: {exc!r}"))
                    continue
                if kind == _OK:
                    future.set_result(payload)
                else:
                    future.set_exception(_rebuild_error(payload, RuntimeError))
        except (EOFError, OSError):
            pass
        self._worker_ended(_reap(self._process))

    def _worker_ended(self, exitcode: int) -> None:
        with self._lock:
            expected = self._stopping
            reason = (
                f"model {self._name} is unloaded"
                if expected
                else f"model {self._name}: its worker process {self._process.pid} died, "
                f"{_exit_reason(exitcode)}; it is out of service until it is reloaded"
            )
            self._failure = reason
            pending, self._calls = list(self._calls.values()), {}
            on_exit, self._on_exit = self._on_exit, None
        for future in pending:
            future.set_exception(WorkerDied(reason))
        if expected:
            return
        log.error("%s (%d call(s) in flight failed)", reason, len(pending))
        if on_exit is not None:
            try:
                on_exit(reason)
            except Exception:  # e.g. the event loop already closed at shutdown
                log.exception("reporting the death of %s's worker failed", self._name)


def _reap(process: subprocess.Popen[bytes]) -> int:
    """Wait for ``process`` to exit (killed after a short grace), so that no zombie is left."""
    try:
        return process.wait(1.0)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _exit_reason(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name} (signal {-exitcode})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _send(conn: Connection, call_id: int, kind: int, payload: object) -> None:
    """Write one message: a header with the pickle, then each large buffer as it lies."""
    raws: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < IN_BAND_BYTES:
            return True  # in the pickle: one copy is cheaper than one more message to wait for
        raws.append(raw)
        return False

    data = pickle.dumps(payload, protocol=5, buffer_callback=out_of_band)
    sizes = struct.pack(f"<{len(raws)}Q", *(raw.nbytes for raw in raws))
    conn.send_bytes(_HEADER.pack(call_id, kind, len(raws)) + sizes + data)
    for raw in raws:
        conn.send_bytes(raw)


def _receive(conn: Connection) -> tuple[int, int, memoryview, list[bytearray]]:
    """Read one message: call id, kind, the pickle and its buffers (not unpickled yet)."""
    head = memoryview(conn.recv_bytes())
    call_id, kind, count = _HEADER.unpack_from(head)
    sizes = struct.unpack_from(f"<{count}Q", head, _HEADER.size)
    buffers = []
    for size in sizes:
        buffer = bytearray(size)
        if size:
            conn.recv_bytes_into(buffer)
        else:
            conn.recv_bytes()
        buffers.append(buffer)
    return call_id, kind, head[_HEADER.size + 8 * count :], buffers


def _error_payload(exc: BaseException) -> tuple[type[InferdError] | None, str]:
    """An exception as something that unpickles in the server: inferd's own error classes keep
    their class; anything else (the user's exception classes do not import there) its text."""
    if isinstance(exc, InferdError):
        return type(exc), exc.message
    return None, f"{type(exc).__name__}: {exc}"


def _rebuild_error(payload: tuple[type[InferdError] | None, str], other: type[Exception]) -> Exception:
    cls, message = payload
    return cls(message) if cls is not None else other(message)


def main(fd: int) -> None:
    """The worker process: load the version the server sends, then answer calls until told to
    stop or the server's end of the pipe closes."""
    from inferd.runtimes.runtime import load_model

    faulthandler.enable()  # a crash prints the Python stack of every thread to the server's log
    conn = Connection(fd)
    _, _, data, buffers = _receive(conn)
    version_dir, settings, platform, log_level = pickle.loads(data, buffers=buffers)
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {os.getpid()}]: %(message)s",
    )
    try:
        model, runtime = load_model(version_dir, settings, platform)
    except Exception as exc:  # every load failure goes back to the server as the load's outcome
        _send(conn, _LOAD_CALL, _ERROR, _error_payload(exc))
        return
    _send(conn, _LOAD_CALL, _OK, (runtime, dict(model.signatures)))
    send_lock = threading.Lock()

    def answer(call_id: int, data: memoryview, buffers: list[bytearray]) -> None:
        result: object
        try:
            signature_name, inputs = pickle.loads(data, buffers=buffers)
            kind, result = _OK, model.predict(signature_name, inputs)
        except Exception as exc:  # the model's failure is the call's answer
            kind, result = _ERROR, _error_payload(exc)
        with send_lock:
            try:
                _send(conn, call_id, kind, result)
            except (OSError, ValueError):
                pass  # the server is gone
            except Exception as exc:  # outputs that do not pickle
                _send(conn, call_id, _ERROR, _error_payload(exc))

    pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="inferd-worker")
    try:
        while True:
            call_id, kind, data, buffers = _receive(conn)
            if kind == _STOP:
                break
            pool.submit(answer, call_id, data, buffers)
    except (EOFError, OSError):
        pass  # the server's end closed: the server is gone
    finally:
        pool.shutdown(wait=True)
        model.close()
