"""The profiler service of a server whose Python cannot import TensorFlow (``tests/e2e/test_profiler.py``
traces a real one): the call says what is missing instead of failing with INTERNAL."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from inferd._proto import profiler_service_pb2 as pb
from inferd._proto import profiler_service_pb2_grpc as pb_grpc
from inferd.protocols import tf_profiler


@asynccontextmanager
async def _serving() -> AsyncIterator[pb_grpc.ProfilerServiceStub]:
    """A stub of the profiler service served alone on a local port, stopped after."""
    server = grpc.aio.server()
    tf_profiler.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.ProfilerServiceStub(channel)
    finally:
        await server.stop(None)


@pytest.fixture
def slow_profiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorFlow's profiler bindings replaced by ``_SlowSession``."""
    monkeypatch.setitem(
        sys.modules, "inferd_tests_slow_profiler", types.SimpleNamespace(ProfilerSession=_SlowSession)
    )
    monkeypatch.setattr(tf_profiler, "_PROFILER", "inferd_tests_slow_profiler")


def test_without_tensorflow_profile_is_unimplemented_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf_profiler, "_PROFILER", "inferd_tests_no_such_profiler_module")

    async def call() -> grpc.aio.AioRpcError:
        async with _serving() as stub:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Profile(pb.ProfileRequest(duration_ms=10, session_id="s"), timeout=10)
            # The refusal left no session running: the next call is refused the same way.
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await stub.Profile(pb.ProfileRequest(duration_ms=10, session_id="t"), timeout=10)
            assert again.value.code() == grpc.StatusCode.UNIMPLEMENTED
            return refused.value

    error = asyncio.run(call())
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "needs TensorFlow" in (error.details() or "")
    assert "inferd[tensorflow]" in (error.details() or "")


class _SlowSession:
    """A stand-in for TensorFlow's ProfilerSession, which refuses to start while another one is
    running ("Another profiling session active.") and takes a while to end."""

    active = 0

    def start(self, folder: str, options: dict[str, object]) -> None:
        if _SlowSession.active:
            raise RuntimeError("Another profiling session active.")
        _SlowSession.active += 1

    def export_to_tb(self) -> None:
        time.sleep(0.5)
        _SlowSession.active -= 1


@pytest.mark.usefixtures("slow_profiler")
def test_a_call_cancelled_while_its_trace_is_collected_holds_the_profiler_until_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session ends on its thread after the call is gone: until it has, another call gets
    ALREADY_EXISTS (which TensorFlow's client retries), not an INTERNAL 'did not start'."""
    monkeypatch.setattr(tf_profiler, "_collect", lambda session, folder: session.export_to_tb())

    async def call() -> list[grpc.StatusCode]:
        async with _serving() as stub:
            first = asyncio.ensure_future(stub.Profile(pb.ProfileRequest(duration_ms=10, session_id="a")))
            await asyncio.sleep(0.25)  # its trace ended; it is being collected
            first.cancel()
            await asyncio.sleep(0.05)  # the cancellation reached the server
            codes = []
            for _ in range(2):
                try:
                    await stub.Profile(pb.ProfileRequest(duration_ms=10, session_id="b"), timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
                await asyncio.sleep(0.5)  # the first session has ended
            return codes

    assert asyncio.run(call()) == [grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OK]
    assert _SlowSession.active == 0


@pytest.mark.usefixtures("slow_profiler")
def test_a_trace_that_cannot_be_collected_is_internal_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure ending the session (a full temporary folder) is INTERNAL naming it, as in
    TensorFlow's server, not grpc's UNKNOWN 'Unexpected <class ...>'; the next call can profile."""
    failures = [OSError(28, "No space left on device")]

    def collect(session: _SlowSession, folder: object) -> None:
        session.export_to_tb()
        if failures:
            raise failures.pop()

    monkeypatch.setattr(tf_profiler, "_collect", collect)

    async def call() -> grpc.aio.AioRpcError:
        async with _serving() as stub:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Profile(pb.ProfileRequest(duration_ms=10, session_id="a"), timeout=10)
            answer = await stub.Profile(pb.ProfileRequest(duration_ms=10, session_id="b"), timeout=10)
            assert answer.empty_trace
            return refused.value

    error = asyncio.run(call())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "the trace could not be collected" in (error.details() or "")
    assert "No space left on device" in (error.details() or "")


def test_a_trace_starts_at_its_start_time_after_a_slow_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """``opts.start_timestamp_ns`` is when the trace starts, however long the first call took to
    import TensorFlow's profiler: the wait is measured once it is imported, not before."""
    started: list[int] = []

    class Session(_SlowSession):
        def start(self, folder: str, options: dict[str, object]) -> None:
            started.append(time.time_ns())

        def export_to_tb(self) -> None:
            pass

    async def slow_import(context: object) -> types.SimpleNamespace:
        await asyncio.sleep(0.6)
        return types.SimpleNamespace(ProfilerSession=Session)

    monkeypatch.setattr(tf_profiler, "_PROFILER", "inferd_tests_no_such_profiler_module")
    monkeypatch.setattr(tf_profiler, "_profiler", slow_import)
    monkeypatch.setattr(tf_profiler, "_collect", lambda session, folder: None)

    async def call() -> int:
        async with _serving() as stub:
            at = time.time_ns() + 800_000_000
            opts = pb.ProfileOptions(duration_ms=10, start_timestamp_ns=at)
            await stub.Profile(pb.ProfileRequest(opts=opts, session_id="a"), timeout=10)
            return at

    at = asyncio.run(call())
    (start,) = started
    assert at <= start < at + 300_000_000, (start - at) / 1e9
