"""``inferd.ray.cold_start``: while no replica runs, a retry-safe request waits a bounded time,
then gets 503 with Retry-After while Serve keeps it queued; everything else passes untouched.
The inner app stands in for Serve's proxy: it reads the request, then answers when told to."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from inferd.ray import cold_start
from inferd.ray.cold_start import ColdStartWait

WAIT_S = 0.2
PREDICT = "/v1/models/m:predict"


class Proxy:
    """Serve's proxy as the middleware sees it: reads the body, watches for a disconnect while
    it waits for ``answer`` (a disconnect withdraws the request), then answers 200."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.withdrawn = False
        self.answered = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"
        disconnect = asyncio.ensure_future(receive())
        answer = asyncio.ensure_future(self.answer.wait())
        await asyncio.wait({disconnect, answer}, return_when=asyncio.FIRST_COMPLETED)
        if disconnect.done():
            self.withdrawn = True
            answer.cancel()
            return
        disconnect.cancel()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        self.answered = True


class Client:
    """uvicorn's side: one request body, then a disconnect once the response is complete (as
    uvicorn reports it) or when ``leave`` is set."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.leave = asyncio.Event()
        self._body_sent = False

    async def receive(self) -> Message:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.leave.set()

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.messages[0]["headers"]}


def _scope(path: str = PREDICT, method: str = "POST") -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": []}


class Replicas:
    """Counts the router reports, in order; the last one repeats."""

    def __init__(self, *counts: int | None) -> None:
        self.counts = list(counts)

    def __call__(self, scope: Scope) -> int | None:
        return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]


def test_with_no_replica_a_prediction_gets_503_after_the_wait_and_serve_keeps_it_queued() -> None:
    async def scenario() -> None:
        proxy, client = Proxy(), Client()
        wait = ColdStartWait(proxy, Replicas(0), WAIT_S)
        started = time.monotonic()
        await wait(_scope(), client.receive, client.send)
        took = time.monotonic() - started
        assert WAIT_S <= took < WAIT_S + 0.5
        assert client.status == 503
        assert client.headers["retry-after"] == "1"
        assert "scaling up from zero" in json.loads(client.messages[1]["body"])["error"]
        await asyncio.sleep(0.05)  # the client has gone; Serve still holds the request
        assert wait.held == 1
        assert not proxy.withdrawn
        proxy.answer.set()  # a replica ran it: its answer goes nowhere
        await asyncio.sleep(0.05)
        assert proxy.answered
        assert wait.held == 0
        assert len(client.messages) == 2

    asyncio.run(scenario())


def test_an_answer_within_the_wait_passes_through() -> None:
    proxy, client = Proxy(), Client()

    async def answer_soon() -> None:
        await asyncio.sleep(WAIT_S / 4)
        proxy.answer.set()

    async def call() -> None:
        soon = asyncio.ensure_future(answer_soon())
        await ColdStartWait(proxy, Replicas(0), WAIT_S)(_scope(), client.receive, client.send)
        await soon

    asyncio.run(call())
    assert client.status == 200
    assert proxy.answered


def test_a_replica_running_at_the_deadline_keeps_the_request_waiting_for_its_answer() -> None:
    proxy, client = Proxy(), Client()

    async def answer_late() -> None:
        await asyncio.sleep(WAIT_S * 2)
        proxy.answer.set()

    async def call() -> float:
        late = asyncio.ensure_future(answer_late())
        started = time.monotonic()
        await ColdStartWait(proxy, Replicas(0, 1), WAIT_S)(_scope(), client.receive, client.send)
        await late
        return time.monotonic() - started

    assert asyncio.run(call()) >= WAIT_S * 2
    assert client.status == 200


@pytest.mark.parametrize(
    ("scope", "replicas"),
    [
        (_scope(), Replicas(1)),  # replicas run: Serve routes at once
        (_scope(), Replicas(None)),  # another application
        (_scope("/v1/models/m/versions/2:load"), Replicas(0)),  # not safe to run once more
        ({"type": "websocket", "path": "/ws"}, Replicas(0)),
    ],
)
def test_other_requests_are_never_refused(scope: Scope, replicas: Replicas) -> None:
    proxy, client = Proxy(), Client()

    async def call() -> None:
        asyncio.get_running_loop().call_later(WAIT_S * 2, proxy.answer.set)
        await ColdStartWait(proxy, replicas, WAIT_S)(scope, client.receive, client.send)

    asyncio.run(call())
    assert client.status == 200


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/models/m"), ("HEAD", "/"), ("POST", "/v2/models/m/infer")]
)
def test_reads_and_predictions_are_retry_safe(method: str, path: str) -> None:
    assert cold_start.retry_safe(_scope(path, method))


def test_a_client_leaving_before_the_deadline_withdraws_its_request() -> None:
    proxy, client = Proxy(), Client()

    async def call() -> None:
        asyncio.get_running_loop().call_later(WAIT_S / 4, client.leave.set)
        await ColdStartWait(proxy, Replicas(0), WAIT_S)(_scope(), client.receive, client.send)

    asyncio.run(call())
    assert proxy.withdrawn
    assert not client.messages


def test_past_held_max_a_refused_request_is_withdrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cold_start, "HELD_MAX", 1)

    async def scenario() -> None:
        wait = ColdStartWait(Proxy(), Replicas(0), WAIT_S)
        first, second = Proxy(), Proxy()
        for proxy in (first, second):
            wait._app = proxy
            client = Client()
            await wait(_scope(), client.receive, client.send)
        await asyncio.sleep(0.05)
        assert wait.held == 1
        assert not first.withdrawn
        assert not first.answered
        assert not second.answered  # cancelled, never answered

    asyncio.run(scenario())


@pytest.fixture
def no_wait_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(cold_start.WAIT_ENV, raising=False)
    return monkeypatch


def test_the_wait_comes_from_the_environment(no_wait_env: pytest.MonkeyPatch) -> None:
    assert cold_start.wait_s() == 0
    no_wait_env.setenv(cold_start.WAIT_ENV, "2.5")
    assert cold_start.wait_s() == 2.5
    no_wait_env.setenv(cold_start.WAIT_ENV, "-1")
    with pytest.raises(ValueError, match=cold_start.WAIT_ENV):
        cold_start.wait_s()


def test_only_serves_proxy_is_wrapped(no_wait_env: pytest.MonkeyPatch) -> None:
    class Router:
        def match_route(self, path: str) -> Any:
            return None

    class HttpProxy:
        proxy_router = Router()

    class RequestId:  # Serve's first middleware around its proxy
        _app = HttpProxy()

    replica_app = Proxy()
    no_wait_env.setenv(cold_start.WAIT_ENV, "3")
    assert ColdStartWait.around(replica_app) is replica_app
    assert isinstance(ColdStartWait.around(RequestId()), ColdStartWait)  # type: ignore[arg-type]
    no_wait_env.setenv(cold_start.WAIT_ENV, "0")
    assert not isinstance(ColdStartWait.around(RequestId()), ColdStartWait)  # type: ignore[arg-type]
