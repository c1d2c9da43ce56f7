"""``/metrics`` over every replica. The replica a scrape reaches asks each running replica of the
application for its own exposition (Serve's ``DeploymentHandle.broadcast``, a call to
``InferdReplica.metrics_exposition`` on every replica) and merges them as ``inferd serve
--workers`` merges its workers' (``worker_metrics.merge``): the ``worker`` label of
``inferd_worker_requests_total`` is a replica's id, and ``inferd_workers_scraped`` counts the
replicas merged. When the replicas do not all answer within ``TIMEOUT_S`` (one starting or
stopping), that scrape holds this replica's own metrics and those that did answer.

Summed counters fall back when a replica goes away (scaled down, replaced): Prometheus' ``rate``
reads such a drop as a counter reset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ray import serve

from inferd.worker_metrics import merge

log = logging.getLogger(__name__)

TIMEOUT_S = 2.0
"""How long a scrape waits for the replicas' expositions."""

METHOD = "metrics_exposition"
"""The replica method that answers its own exposition (replica id, text)."""


class ClusterMetrics:
    """One replica's side. ``exposition`` is the merged text for ``/metrics``; ``handle`` makes
    the deployment handle to broadcast on (Serve's, by default), once, at the first scrape."""

    def __init__(self, replica: str, own: Callable[[], bytes], handle: Callable[[], Any]) -> None:
        self._replica = replica
        self._own = own
        self._make_handle = handle
        self._handle: Any = None

    def own(self) -> tuple[str, bytes]:
        """This replica's id and its own exposition."""
        return self._replica, self._own()

    async def exposition(self) -> bytes:
        """Every replica's metrics, merged (see the module's docstring)."""
        if self._handle is None:
            self._handle = self._make_handle()
        try:
            answers = await self._handle.broadcast(METHOD).results_async(
                timeout_s=TIMEOUT_S, return_exceptions=True
            )
        except Exception as exc:  # a timeout, or no replica list yet: this replica's own
            log.warning("replicas' metrics left out of this scrape: %s", exc)
            answers = []
        parts: dict[int | str, bytes] = {}
        for answer in answers:
            if isinstance(answer, tuple) and len(answer) == 2:
                parts[str(answer[0])] = bytes(answer[1])
            else:
                log.info("a replica's metrics left out of this scrape: %s", answer)
        if self._replica not in parts:  # the broadcast missed this replica (it started since)
            parts[self._replica] = self._own()
        return merge(sorted(parts.items(), key=lambda part: str(part[0])))


def deployment_handle(app_name: str) -> Callable[[], Any]:
    """Makes the handle of ``app_name``'s deployment of the same name (inferd's app)."""
    return lambda: serve.get_deployment_handle(app_name, app_name)
