"""ConnectionLimits: read from the server config, checked at start, 0 connections meaning auto;
the limited protocol leaves no per-request cyclic garbage; a request steps aside for others."""

from __future__ import annotations

import asyncio
import gc
import resource
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvicorn

from inferd.config import ServerConfig
from inferd.errors import ConfigError
from inferd.protocols.http_connection import (
    AUTO_CONNECTIONS_CAP,
    WATCH,
    BadRequest,
    ConnectionLimits,
    RequestWatch,
    UnsupportedCoding,
    _unsupported_codings,
    auto_max_connections,
    connection_class,
    raise_open_file_limit,
)


def test_limits_come_from_the_server_config() -> None:
    config = ServerConfig(max_connections=7, header_timeout_s=2.5, body_timeout_s=3.0, max_header_bytes=100)
    assert ConnectionLimits.of(config) == ConnectionLimits(7, 2.5, 3.0, 100)


def test_zero_connections_is_a_quarter_of_the_open_file_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = (
        AUTO_CONNECTIONS_CAP if soft == resource.RLIM_INFINITY else min(AUTO_CONNECTIONS_CAP, soft // 4)
    )
    assert auto_max_connections() == max(1, expected)
    assert ConnectionLimits.of(ServerConfig()).max_connections == auto_max_connections()


@pytest.mark.parametrize(
    ("config", "flag"),
    [
        (ServerConfig(max_connections=-1), "--max_connections"),
        (ServerConfig(header_timeout_s=0), "--header_timeout_s"),
        (ServerConfig(body_timeout_s=-1), "--body_timeout_s"),
        (ServerConfig(keep_alive_timeout_s=0), "--keep_alive_timeout_s"),
    ],
)
def test_bad_limits_name_their_flag(config: ServerConfig, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ConnectionLimits.of(config)


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    # Raising the soft limit up to the hard one is always allowed, without privileges.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    try:
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _serve_while(
    app: Any, client: Callable[[int], Awaitable[None]], max_header_bytes: int = 8192
) -> None:
    """Serve ``app`` over the limited protocol on a free port until ``client(port)`` returns."""
    listener = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        http=connection_class(ConnectionLimits(8, 5.0, 5.0, max_header_bytes)),
        lifespan="off",
        loop="none",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        await asyncio.sleep(0.01)
    await client(listener.getsockname()[1])
    server.should_exit = True
    await serving


def test_an_answered_request_is_freed_without_the_cycle_collector() -> None:
    """A request's objects go by reference counting once answered: none is left for the cyclic
    collector, whose full passes over per-request garbage paused the loop for tens of ms."""
    seen: list[weakref.ref[Any]] = []
    watched: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        watched.append(WATCH in scope["extensions"])
        seen.append(weakref.ref(receive.__self__))  # the request's Exchange
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):  # one kept-alive connection: uvicorn lets go of a request at the next
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await reader.readuntil(b"ok")
        writer.close()

    gc.disable()
    try:
        asyncio.run(asyncio.wait_for(_serve_while(app, client), 30))
        assert watched == [True, True, True]
        assert [request() is None for request in seen[:2]] == [True, True], "a request outlived its answer"
    finally:
        gc.enable()


def test_requests_read_in_one_turn_are_computed_then_answered_in_steps() -> None:
    """Two requests that one read of the sockets brought are taken in steps (both computed, then
    both answered); a request alone, or beside finished ones, does not wait."""
    events: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path, watch = scope["path"], scope["extensions"][WATCH]
        if path == "/block":  # hold the loop while the client sends /a and /b
            time.sleep(0.3)
        await watch.step()
        events.append(f"{path} computed")
        await watch.step()
        events.append(f"{path} answered")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def client(port: int) -> None:
        a, b, c = (socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3))
        with a, b, c:
            c.sendall(b"GET /block HTTP/1.1\r\nhost: x\r\n\r\n")
            time.sleep(0.1)
            a.sendall(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            b.sendall(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n")
            for conn in (c, a, b):
                answer = b""
                while not answer.endswith(b"ok") and (chunk := conn.recv(4096)):  # may come in parts
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200 ")
                assert answer.endswith(b"ok")

    async def in_thread(port: int) -> None:
        await asyncio.to_thread(client, port)

    asyncio.run(asyncio.wait_for(_serve_while(app, in_thread), 30))
    assert events == [
        "/block computed",
        "/block answered",
        "/a computed",
        "/b computed",
        "/a answered",
        "/b answered",
    ]


def test_a_request_steps_aside_only_while_others_are_in_progress() -> None:
    """``step`` waits one turn of the event loop when the port has other request tasks, so that
    they reach their next step first, and returns at once for a request alone."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        this = asyncio.current_task()
        assert this is not None
        finished = loop.create_task(asyncio.sleep(0))
        await finished
        other = loop.create_task(asyncio.Event().wait())
        order: list[str] = []
        loop.call_soon(order.append, "ready before")
        await RequestWatch(tasks={this}).step()
        order.append("alone")
        await RequestWatch(tasks={this, finished}).step()
        order.append("beside a finished one")
        loop.call_soon(order.append, "ready before, again")
        await RequestWatch(tasks={this, finished, other}).step()
        order.append("among others")
        await RequestWatch().step()  # no port: as alone
        order.append("no port")
        other.cancel()
        return order

    assert asyncio.run(main()) == [
        "alone",
        "beside a finished one",
        "ready before",
        "ready before, again",
        "among others",
        "no port",
    ]


def test_concurrent_receives_each_see_the_disconnect_and_a_cancelled_one_disturbs_none() -> None:
    """After the body, every ``receive`` waiting at once returns ``http.disconnect`` when the
    client hangs up, also when another of them was cancelled meanwhile (as uvicorn's event
    allowed)."""
    outcome: list[list[Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["body"] == b"ok"
        first, second, cancelled = (asyncio.ensure_future(receive()) for _ in range(3))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        outcome.append(await asyncio.wait_for(asyncio.gather(first, second), 5))

    async def client(port: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nok")
        await asyncio.sleep(0.2)
        writer.close()
        for _ in range(100):
            if outcome:
                return
            await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(_serve_while(app, client), 30))
    assert outcome == [[{"type": "http.disconnect"}, {"type": "http.disconnect"}]]


@pytest.mark.parametrize(
    ("max_header_bytes", "line", "expected"),
    [
        (8192, b"GET /?" + b"q" * 70_000, b"HTTP/1.1 413 Content Too Large"),  # past the limit
        (200_000, b"GET /?" + b"q" * 70_000, b"HTTP/1.1 414 URI Too Long"),  # past what httptools parses
        (8192, b"CONNECT inferd:8500", b"HTTP/1.1 400 Bad Request"),  # authority-form: no path
    ],
)
def test_a_request_target_that_cannot_be_parsed_is_refused_with_its_reason(
    max_header_bytes: int, line: bytes, expected: bytes
) -> None:
    """A head read whole whose target httptools cannot parse is refused with its reason named
    (not httptools' "User callback error") and the connection closes; the server reads on."""
    answers: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def client(port: int) -> None:
        for head in (line, b"GET /"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            answers.append(await reader.read())  # to the close
            writer.close()

    asyncio.run(asyncio.wait_for(_serve_while(app, client, max_header_bytes), 30))
    refused, served = answers
    assert refused.startswith(expected), refused
    assert b"User callback error" not in refused
    assert b"connection: close" in refused
    assert served.startswith(b"HTTP/1.1 200 OK"), served


def test_an_absolute_form_target_without_a_path_is_the_path_slash() -> None:
    """``GET http://host`` and ``GET http://host?q`` (absolute form, empty path) reach the
    application as the path ``/`` (RFC 9110 4.2.3), not as httptools' "User callback error"."""
    seen: list[tuple[str, bytes, bytes]] = []
    answers: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["path"], scope["raw_path"], scope["query_string"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def client(port: int) -> None:
        for target in (b"http://inferd", b"http://inferd:8501?q=1"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET " + target + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            answers.append(await reader.read())  # to the close
            writer.close()

    asyncio.run(asyncio.wait_for(_serve_while(app, client), 30))
    assert [answer.split(b"\r\n", 1)[0] for answer in answers] == [b"HTTP/1.1 200 OK"] * 2, answers
    assert seen == [("/", b"/", b""), ("/", b"/", b"q=1")]


@pytest.mark.parametrize(
    ("codings", "refused"),
    [
        (b"chunked,", False),
        (b"Chunked ,", False),
        (b", chunked,", False),  # an empty list element is allowed (RFC 9110 5.6.1)
        (b"gzip,", False),  # chunked not last: the parser's 400 (RFC 9112 6.3)
        (b"chunked, gzip,", False),
        (b"gzip, chunked,", True),
        (b"gzip,chunked,", True),  # two Transfer-Encoding lines
        (b"identity, chunked,", True),
        (b"br;q=1 , CHUNKED,", True),
    ],
)
def test_a_transfer_coding_before_chunked_is_refused(codings: bytes, refused: bool) -> None:
    refusal = _unsupported_codings(codings)
    assert (refusal is not None) == refused
    if refusal is not None:
        assert isinstance(refusal, UnsupportedCoding)  # 501
        assert str(refusal).startswith("Transfer-Encoding: "), refusal
        assert "only the chunked transfer coding" in str(refusal)


@pytest.mark.parametrize("codings", [b"chunked, chunked,", b"chunked,chunked,", b"gzip, chunked, chunked,"])
def test_chunked_twice_is_a_bad_request_not_an_unsupported_coding(codings: bytes) -> None:
    """No sender may apply chunked twice (RFC 9112 7.1): a malformed request, 400, where it got the
    501 for a coding the server does not decode, whose message said chunked is what it decodes."""
    refusal = _unsupported_codings(codings)
    assert isinstance(refusal, BadRequest)
    assert not isinstance(refusal, UnsupportedCoding)
    assert "chunked more than once" in str(refusal)
