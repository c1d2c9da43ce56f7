"""Per-request timing for the metrics: when each stage of an inference request ended."""

from __future__ import annotations

import time
from dataclasses import dataclass

from inferd.metrics import Metrics
from inferd.service import InferenceService
from inferd.types import InferenceResponse


@dataclass(slots=True)
class RequestTiming:
    """When one inference request's stages ended (``time.perf_counter``), for the metrics:
    ``decoded`` when its tensors were ready, ``resumed`` when the adapter got the answer back."""

    started: float
    decoded: float = 0.0
    resumed: float = 0.0
    response: InferenceResponse | None = None

    def answered(self, response: InferenceResponse) -> InferenceResponse:
        """Note the service's answer and the time it came back; returns it."""
        self.resumed = time.perf_counter()
        self.response = response
        return response


def record_request(
    metrics: Metrics, service: InferenceService, protocol: str, model: str, status: str, timing: RequestTiming
) -> None:
    """Count a finished inference request and, when it was answered, time its stages."""
    response = timing.response
    if response is None:
        metrics.count_request(model if service.knows(model) else "", "", protocol, status)
        return
    version = str(response.model_id.version)
    metrics.count_request(model, version, protocol, status)
    ended = time.perf_counter()
    # handoff: from decoded to resumed, what was neither features, queue nor predict: validation,
    # and the event loop's delay in taking the answer back from the predict thread.
    measured = response.features_s + response.queue_s + response.predict_s
    metrics.timer(model, version, protocol).observe(
        timing.decoded - timing.started,
        response.features_s,
        response.queue_s,
        response.predict_s,
        max(0.0, timing.resumed - timing.decoded - measured),
        ended - timing.resumed,
        ended - timing.started,
    )
