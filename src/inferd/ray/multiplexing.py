"""Routing by model through Serve's own router (``--proxy=python``, and Serve's fallback proxy):
each replica tells Serve which models it holds, as ``@serve.multiplexed`` does for its models, so
that Serve's router sends a request naming its model in the ``serve_multiplexed_model_id`` header
to a replica that holds it (a model no replica holds goes to a replica holding the fewest). What a
replica holds is inferd's to decide (``--memory_budget``, ``idle_unload_s``): a model is held
while one of its versions is loaded. Serve's router does not read inferd's memory budget, only
these names.

Uses Serve's internal ``record_request_routing_info`` (Ray 2.60, what ``@serve.multiplexed``
calls); with HAProxy the header is hashed by HAProxy instead (``deployment.PROXY_ENV``).
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve._private.common import RequestRoutingInfo
from ray.serve.context import _get_global_client

from inferd.control import ModelControl

log = logging.getLogger(__name__)

ANNOUNCE_S = 0.5
"""How often a replica compares what it holds with what it last told Serve, in seconds."""
REFRESH_S = 10.0
"""A replica tells Serve again after this long even without a change (a restarted controller)."""


class Announcer:
    """Tells Serve's controller the models this replica holds, when they change.

    Args:
        control: the replica's model control (its loaded versions).
    """

    def __init__(self, control: ModelControl) -> None:
        self._control = control
        self.announced: list[str] = []
        """The models Serve was last told this replica holds."""

    def held(self) -> list[str]:
        """The models with a version loaded here, sorted."""
        resident, _ = self._control.residency()
        return sorted({name for name, _ in resident})

    def announce(self) -> None:
        """Tell Serve what this replica holds now."""
        held = self.held()
        replica = serve.get_replica_context().replica_id
        client = _get_global_client()
        if client is None:
            raise RuntimeError("no Serve controller to tell which models this replica holds")
        client.record_request_routing_info(RequestRoutingInfo(replica_id=replica, multiplexed_model_ids=held))
        self.announced = held

    async def run(self) -> None:
        """Announce at start, on every change, and every ``REFRESH_S``; until cancelled."""
        last = -REFRESH_S
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self.held() != self.announced or loop.time() - last >= REFRESH_S:
                    self.announce()
                    last = loop.time()
            except Exception:  # the controller is away: told again next time
                log.exception("telling Serve which models this replica holds failed")
            await asyncio.sleep(ANNOUNCE_S)
