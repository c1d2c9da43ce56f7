"""``inferd.ray.cluster_metrics``: a scrape merges every replica that answers the broadcast, and
keeps this replica's own metrics when the broadcast fails or times out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from inferd.metrics import Metrics
from inferd.ray.cluster_metrics import METHOD, TIMEOUT_S, ClusterMetrics
from tests.unit.test_worker_metrics import _table


def _replica(requests: int) -> Metrics:
    metrics = Metrics()
    for _ in range(requests):
        metrics.count_request("m", "1", "tfserving_rest", "OK")
    return metrics


class Broadcast:
    """Serve's broadcast as ``ClusterMetrics`` uses it: answers, or raises, what it is given."""

    def __init__(self, answers: list[Any] | Exception) -> None:
        self.answers = answers
        self.calls: list[tuple[str, float | None, bool]] = []
        self._method = ""

    def broadcast(self, method: str) -> Broadcast:
        self._method = method
        return self

    async def results_async(
        self, *, timeout_s: float | None = None, return_exceptions: bool = False
    ) -> list[Any]:
        self.calls.append((self._method, timeout_s, return_exceptions))
        if isinstance(self.answers, Exception):
            raise self.answers
        return self.answers


def _requests(text: bytes) -> tuple[float, dict[str, float], float]:
    table = _table(text)
    by_worker = {
        dict(labels)["worker"]: value
        for (name, labels), value in table.items()
        if name == "inferd_worker_requests_total"
    }
    total = sum(value for (name, _), value in table.items() if name == "inferd_requests_total")
    return total, by_worker, table[("inferd_workers_scraped", frozenset())]


def test_a_scrape_merges_every_replica_that_answers() -> None:
    me, other = _replica(2), _replica(3)
    handle = Broadcast([("b", other.exposition()), RuntimeError("replica stopping"), ("a", me.exposition())])
    metrics = ClusterMetrics("a", me.exposition, lambda: handle)
    assert _requests(asyncio.run(metrics.exposition())) == (5.0, {"a": 2.0, "b": 3.0}, 2.0)
    assert handle.calls == [(METHOD, TIMEOUT_S, True)]
    replica, own = metrics.own()
    assert replica == "a"
    assert _steady(own) == _steady(me.exposition())


def _steady(text: bytes) -> dict[Any, float]:
    """An exposition's samples but the process collector's (memory and CPU move between scrapes)."""
    return {key: value for key, value in _table(text).items() if not key[0].startswith("process_")}


@pytest.mark.parametrize(
    "failure", [TimeoutError("Timed out waiting for broadcast results."), RuntimeError("no router")]
)
def test_without_the_broadcast_a_scrape_holds_this_replicas_own(failure: Exception) -> None:
    me = _replica(4)
    metrics = ClusterMetrics("a", me.exposition, lambda: Broadcast(failure))
    assert _requests(asyncio.run(metrics.exposition())) == (4.0, {"a": 4.0}, 1.0)


def test_a_replica_the_broadcast_missed_adds_its_own() -> None:
    # This replica started after the handle read its list of replicas.
    me = _replica(4)
    metrics = ClusterMetrics("a", me.exposition, lambda: Broadcast([("b", _replica(1).exposition())]))
    assert _requests(asyncio.run(metrics.exposition())) == (5.0, {"a": 4.0, "b": 1.0}, 2.0)
