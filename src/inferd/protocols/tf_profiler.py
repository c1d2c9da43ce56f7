"""TensorFlow's profiler service (``tensorflow.ProfilerService``) on the gRPC port, as TF Serving
serves it: ``tf.profiler.experimental.client.trace(...)``, ``capture_tpu_profile`` and TensorBoard's
"Capture profile" take a trace of the server's process, with TensorFlow's own profiler.

``Profile`` traces for the request's ``opts.duration_ms`` (or its ``duration_ms``), from its
``opts.start_timestamp_ns`` when that is still ahead, and answers the trace (an XSpace) as the
tool data ``xplane.pb``: the client writes it to
``<logdir>/plugins/profile/<session_id>/<host>_<port>.xplane.pb``, where TensorBoard's profile
plugin reads it. Unlike TF Serving, which writes that file under the client's
``repository_root`` itself, inferd writes no file: the logdir need not be reachable from the
server, and no caller chooses a path the server writes to. One profile at a time (TensorFlow's
profiler traces the whole process): a call meanwhile gets ALREADY_EXISTS, which the client
retries. ``Terminate`` ends a running session's ``Profile`` early; ``Monitor`` answers
UNIMPLEMENTED, as TensorFlow's own profiler server does. TensorFlow is imported at the first
``Profile`` (on a thread); without it, the call answers UNIMPLEMENTED. Under ``--workers`` a call
profiles the one worker process whose connection it came on.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from inferd._proto import profiler_service_pb2 as pb
from inferd._proto import profiler_service_pb2_grpc as pb_grpc
from inferd.protocols.grpc_status import Context, details

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ProfilerService"].full_name
MAX_DURATION_MS = 600_000
"""The longest trace (and the longest wait for a start time) a call may ask for, in ms: a trace
is held in the server's memory until it ends."""
_PROFILER = "tensorflow.python.profiler.internal._pywrap_profiler"


class ProfilerServicer(pb_grpc.ProfilerServiceServicer):
    """See the module docstring."""

    def __init__(self) -> None:
        self._running: str | None = None  # the session id being traced
        self._stop = asyncio.Event()  # set by Terminate for the running session
        tempfile.gettempdir()  # found once (it tries writing there), not in the first Profile

    async def Profile(self, request: pb.ProfileRequest, context: Context) -> pb.ProfileResponse:  # noqa: N802
        duration_ms = request.opts.duration_ms or request.duration_ms
        if not 0 < duration_ms <= MAX_DURATION_MS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"opts.duration_ms (or duration_ms) must be from 1 to {MAX_DURATION_MS}, got {duration_ms}",
            )
        delay_s = (request.opts.start_timestamp_ns - time.time_ns()) / 1e9
        if delay_s > MAX_DURATION_MS / 1000:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"opts.start_timestamp_ns is {delay_s:.0f} s ahead; at most {MAX_DURATION_MS // 1000} s",
            )
        if self._running is not None:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"another profile (session {self._running!r}) is being taken; retry when it ends",
            )
        self._running, self._stop = request.session_id, asyncio.Event()
        collecting: asyncio.Future[bytes | None] | None = None
        try:
            profiler = sys.modules.get(_PROFILER) or await _profiler(context)
            delay_s = (request.opts.start_timestamp_ns - time.time_ns()) / 1e9  # after the import
            if delay_s > 0 and await _stopped(self._stop, delay_s):
                return pb.ProfileResponse(empty_trace=True)
            try:
                folder = tempfile.mkdtemp(prefix="inferd-profile-")
            except OSError as exc:
                await context.abort(grpc.StatusCode.INTERNAL, details(f"the profiler has no folder: {exc}"))
            session = profiler.ProfilerSession()
            try:  # inline, a fraction of a millisecond: the trace starts as soon as it can
                session.start(folder, {})
            except Exception as exc:  # tensorflow's errors: another profiler in this process
                shutil.rmtree(folder, ignore_errors=True)
                await context.abort(grpc.StatusCode.INTERNAL, details(f"the profiler did not start: {exc}"))
            try:
                await _stopped(self._stop, duration_ms / 1000)
            finally:  # also when the client went away: the session must end
                collecting = asyncio.ensure_future(asyncio.to_thread(_collect, session, Path(folder)))
                try:
                    xspace = await asyncio.shield(collecting)
                except Exception as exc:  # OSError (a full temporary folder), tensorflow's errors
                    await context.abort(
                        grpc.StatusCode.INTERNAL, details(f"the trace could not be collected: {exc}")
                    )
        finally:
            if collecting is None or collecting.done():
                self._running = None
            else:  # the call went away while its session ends: the next may start once it has
                collecting.add_done_callback(self._ended)
        if xspace is None:
            return pb.ProfileResponse(empty_trace=True)
        return pb.ProfileResponse(tool_data=[pb.ProfileToolData(name="xplane.pb", data=xspace)])

    def _ended(self, collecting: asyncio.Future[bytes | None]) -> None:
        """The session of a call that went away has ended (its trace is dropped)."""
        self._running = None
        if not collecting.cancelled() and (error := collecting.exception()) is not None:
            log.warning("a cancelled profile's trace could not be collected: %s", error)

    async def Terminate(self, request: pb.TerminateRequest, context: Context) -> pb.TerminateResponse:  # noqa: N802
        if self._running is not None and request.session_id == self._running:
            self._stop.set()
        return pb.TerminateResponse()

    async def Monitor(self, request: pb.MonitorRequest, context: Context) -> pb.MonitorResponse:  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Monitor is not implemented; use Profile")
        raise AssertionError("context.abort raises")


async def _profiler(context: Context) -> Any:
    """TensorFlow's profiler bindings, imported on a thread (importing TensorFlow takes seconds);
    aborts the call with UNIMPLEMENTED when they cannot be imported."""
    try:
        return await asyncio.to_thread(importlib.import_module, _PROFILER)
    except Exception as exc:  # ImportError, or a TensorFlow that does not match its protobuf
        message = (
            f"the profiler needs TensorFlow, which cannot be imported ({exc}); "
            "pip install 'inferd[tensorflow]'"
        )
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, details(message))
        raise AssertionError("context.abort raises") from exc


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop`` is set; whether it was."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True


def _collect(session: Any, folder: Path) -> bytes | None:
    """End ``session`` and return its trace, a serialized XSpace, or None when it holds no event.
    The session writes it under ``folder`` (``plugins/profile/<run>/<host>.xplane.pb``;
    ``stop()`` would answer the older trace-events format instead), which is then removed."""
    try:
        session.export_to_tb()
        # One file; were there several, their concatenation is the XSpace that merges them.
        xspace = b"".join(path.read_bytes() for path in folder.glob("plugins/profile/*/*.xplane.pb"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    space = pb.XSpace.FromString(xspace)
    return xspace if any(line.events for plane in space.planes for line in plane.lines) else None


def add_to_server(server: grpc.aio.Server) -> None:
    """Serve ``tensorflow.ProfilerService`` on ``server`` (see ``ProfilerServicer``)."""
    pb_grpc.add_ProfilerServiceServicer_to_server(ProfilerServicer(), server)  # type: ignore[no-untyped-call]
