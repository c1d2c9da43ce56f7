"""Per-version inference statistics: what Triton's statistics extension reports, counted by
``InferenceService`` from its own clock readings.

A request is counted, when it ends, on the version its reference names then (a request for an
unknown model or version counts nowhere): ``success`` or ``fail`` with the seconds it spent in
the core (validation, feature join, queue, model,
output checks; decoding and encoding the wire format are in ``/metrics``), and ``queue`` and
``compute_infer`` for its share of the wait and the model call. ``compute_input`` is the rest of
the core's time before and after the model call. Each model call is an execution:
``execution_count`` and ``batch_stats`` by rows per call; ``inference_count`` is rows computed.
Record from the event loop's thread only; no lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from inferd.types import ModelId

_NS = 1_000_000_000


@dataclass(slots=True)
class Duration:
    """How many times something happened and the nanoseconds it took in all."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * _NS))


@dataclass(slots=True)
class BatchStatistics:
    """Model calls of one batch size (rows per call)."""

    batch_size: int
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class VersionStatistics:
    """The counts of one loaded model version (a reloaded version starts again from zero)."""

    model_id: ModelId
    last_inference_ms: int = 0
    """Wall-clock milliseconds since the epoch of the last request counted; 0: none yet."""
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStatistics] = field(default_factory=dict)

    def succeeded(self, total_s: float, queue_s: float, infer_s: float) -> None:
        """A request answered after ``total_s`` seconds in the core, ``queue_s`` of them queued and
        ``infer_s`` in the model call that computed it."""
        # Arithmetic written out: this runs once per request on the event loop.
        self.last_inference_ms = time.time_ns() // 1_000_000
        total, queue, infer = int(total_s * _NS), int(queue_s * _NS), int(infer_s * _NS)
        for duration, ns in (
            (self.success, total),
            (self.queue, queue),
            (self.compute_infer, infer),
            (self.compute_input, total - queue - infer),
        ):
            duration.count += 1
            duration.ns += ns if ns > 0 else 0
        self.compute_output.count += 1

    def failed(self, total_s: float) -> None:
        """A request that reached this version and failed after ``total_s`` seconds."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.fail.add(total_s)

    def executed(self, rows: int, infer_s: float) -> None:
        """One model call on ``rows`` rows that took ``infer_s`` seconds."""
        self.execution_count += 1
        self.inference_count += rows
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchStatistics(rows)
        batch.compute_input.count += 1
        infer = batch.compute_infer
        infer.count += 1
        infer.ns += max(0, int(infer_s * _NS))
        batch.compute_output.count += 1
