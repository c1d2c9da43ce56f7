"""The profiler service of a server whose Python cannot import TensorFlow (``tests/e2e/test_profiler.py``
traces a real one): the call says what is missing instead of failing with INTERNAL."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from inferd._proto import profiler_service_pb2 as pb
from inferd._proto import profiler_service_pb2_grpc as pb_grpc
from inferd.protocols import tf_profiler


def test_without_tensorflow_profile_is_unimplemented_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf_profiler, "_PROFILER", "inferd_tests_no_such_profiler_module")

    async def call() -> grpc.aio.AioRpcError:
        server = grpc.aio.server()
        tf_profiler.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.ProfilerServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Profile(pb.ProfileRequest(duration_ms=10, session_id="s"), timeout=10)
                # The refusal left no session running: the next call is refused the same way.
                with pytest.raises(grpc.aio.AioRpcError) as again:
                    await stub.Profile(pb.ProfileRequest(duration_ms=10, session_id="t"), timeout=10)
                assert again.value.code() == grpc.StatusCode.UNIMPLEMENTED
                return refused.value
        finally:
            await server.stop(None)

    error = asyncio.run(call())
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "needs TensorFlow" in (error.details() or "")
    assert "inferd[tensorflow]" in (error.details() or "")
