"""OpenTelemetry traces of inference requests, exported over OTLP (``--otel_endpoint``).

One span per request (``inferd <protocol>``) with a child per stage: decode, features, queue,
predict, encode. The spans are made when the request ends, from the times ``service.Call``
measured anyway, so the request path pays nothing for them beyond this module's one call; the
stage spans are laid end to end from the measured durations (features, then queue, then predict
after decode). The exporter speaks gRPC or HTTP/protobuf as ``OTEL_EXPORTER_OTLP_PROTOCOL`` says
(``grpc``, the default, or ``http/protobuf``), as the OpenTelemetry SDK reads it, and sends spans
in batches from a thread of its own (``OTEL_BSP_*`` tune it).

A client's W3C ``traceparent`` (a REST header or gRPC metadata) is set in ``TRACEPARENT`` by the
adapters for the request's task; the request's span is then its child, and sampled as the client
decided (its sampled flag). Otherwise (none, or a malformed one) a random ``sample_rate`` (0 to 1)
of the requests are traced; the others cost a context-variable read and a random draw.

The feature join sets ``STORE_LOOKUP`` in the same task when it asked its store; the lookup becomes
a CLIENT span under the request's span (beside the stages) with the store's attributes: for Redis,
the database semantic conventions' ``db.system.name``, ``db.operation.name``, ``db.namespace``,
``server.address`` and ``server.port``. The request span's ``inferd.batch_size`` is the rows of the
batch the model computed the request in (with other requests' rows, when batched),
``inferd.request_rows`` the request's own.

The OpenTelemetry SDK and exporters (the ``inferd[otel]`` extra) are imported only when tracing
is configured; without ``--otel_endpoint`` no ``Tracing`` exists and nothing here runs.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from inferd.errors import ConfigError

TRACEPARENT: ContextVar[str | None] = ContextVar("inferd_traceparent", default=None)
"""The W3C ``traceparent`` the current request arrived with, if any."""

STAGE_SPANS = ("decode", "features", "queue", "predict", "encode")


@dataclass(frozen=True, slots=True)
class StoreLookup:
    """One request's round trip to its feature store (merged with other requests' lookups):
    when it was sent and answered (``time.perf_counter`` seconds), how many entities it asked
    for, the store's span attributes, and the error kind when it failed."""

    started: float
    ended: float
    entities: int
    attributes: Mapping[str, str | int]
    error: str | None = None


STORE_LOOKUP: ContextVar[StoreLookup | None] = ContextVar("inferd_store_lookup", default=None)
"""The current request's store lookup, set by the feature join in the request's task."""


class Tracing:
    """Builds and exports request spans.

    Args:
        endpoint: the OTLP receiver: ``host:port`` or ``http://host:port`` for gRPC, a URL for
            HTTP (``/v1/traces`` is added when the URL has no path).
        sample_rate: the share of requests without a client ``traceparent`` that are traced.

    Raises:
        ConfigError: the ``otel`` extra is not installed, the rate is outside [0, 1], or the
            protocol is not one the exporter knows.
    """

    def __init__(self, endpoint: str, sample_rate: float = 1.0) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ConfigError(f"--otel_sample_rate: expected a number from 0 to 1, got {sample_rate}")
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
            from opentelemetry.trace import (
                SpanKind,
                Status,
                StatusCode,
                get_current_span,
                set_span_in_context,
            )
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as error:
            raise ConfigError(
                f"--otel_endpoint needs OpenTelemetry: pip install 'inferd[otel]' ({error})"
            ) from None
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "inferd")}),
            sampler=ParentBased(ALWAYS_ON),  # roots are drawn in ``record``, before any span exists
        )
        self._provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
        self._tracer = self._provider.get_tracer("inferd")
        self._rate = sample_rate
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = set_span_in_context
        self._span_in = get_current_span
        self._error = Status(StatusCode.ERROR)
        self._client = SpanKind.CLIENT
        # perf_counter seconds -> Unix nanoseconds, for spans made after the fact
        self._epoch_ns = time.time_ns() - int(time.perf_counter() * 1e9)

    def _ns(self, perf_counter_s: float) -> int:
        return self._epoch_ns + int(perf_counter_s * 1e9)

    def record(
        self,
        protocol: str,
        model: str,
        version: str,
        status: str,
        request_id: str,
        rows: int,
        started: float,
        ended: float,
        stages: tuple[float, float, float, float, float] | None,
        batch_rows: int = 0,
    ) -> None:
        """Export the spans of one finished request.

        Args:
            rows: the request's own rows (0: not known).
            batch_rows: the rows of the batch the model computed it in (0: not computed).
            started, ended: the request's first byte and its encoded answer, perf_counter seconds.
            stages: ``(decoded, features_s, queue_s, predict_s, resumed)``: when decoding ended
                and the answer came back (perf_counter seconds), and the stage durations in
                seconds; None when the request ended before it was computed (no stage spans).
        """
        traceparent = TRACEPARENT.get()
        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        if parent is not None and not self._span_in(parent).get_span_context().is_valid:
            parent = None  # a malformed traceparent is ignored (W3C): it must not force a trace
        if parent is None and self._rate < 1.0 and (self._rate == 0.0 or random.random() >= self._rate):
            return  # not sampled: no span is made at all
        attributes: dict[str, Any] = {
            "inferd.model": model,
            "inferd.protocol": protocol,
            "inferd.status": status,
            "inferd.request_id": request_id,
        }
        if version:
            attributes["inferd.version"] = int(version)
        if rows:
            attributes["inferd.request_rows"] = rows
        if batch_rows:
            attributes["inferd.batch_size"] = batch_rows
        span = self._tracer.start_span(
            f"inferd {protocol}", context=parent, start_time=self._ns(started), attributes=attributes
        )
        if not span.is_recording():
            return
        if status != "OK":
            span.set_status(self._error)
        if stages is not None:
            decoded, features_s, queue_s, predict_s, resumed = stages
            context = self._in_context(span)
            at = decoded
            bounds = [
                ("decode", started, decoded),
                ("features", at, at + features_s),
                ("queue", at + features_s, at + features_s + queue_s),
                ("predict", at + features_s + queue_s, at + features_s + queue_s + predict_s),
                ("encode", resumed, ended),
            ]
            for name, begin, end in bounds:
                child = self._tracer.start_span(name, context=context, start_time=self._ns(begin))
                child.end(end_time=self._ns(max(begin, end)))
        lookup = STORE_LOOKUP.get()
        if lookup is not None:
            self._lookup_span(span, lookup)
        span.end(end_time=self._ns(ended))

    def _lookup_span(self, parent: Any, lookup: StoreLookup) -> None:
        """The request's feature store lookup, a CLIENT span under ``parent`` named as the
        database conventions say (the operation, else the database system, else ``features
        lookup``)."""
        attributes: dict[str, Any] = {**lookup.attributes, "inferd.feature_entities": lookup.entities}
        name = str(
            attributes.get("db.operation.name") or attributes.get("db.system.name") or "features lookup"
        )
        if lookup.error is not None:
            attributes["error.type"] = lookup.error
        child = self._tracer.start_span(
            name,
            context=self._in_context(parent),
            kind=self._client,
            start_time=self._ns(lookup.started),
            attributes=attributes,
        )
        if lookup.error is not None:
            child.set_status(self._error)
        child.end(end_time=self._ns(lookup.ended))

    def close(self, timeout_s: float = math.inf) -> None:
        """Export what is buffered and stop the exporter's thread, waiting ``timeout_s`` at most:
        an export to a receiver that does not answer (the exporter's own timeout and retries take
        10 s and more) is then left to a daemon thread, so that it cannot hold the exit."""
        closing = threading.Thread(target=self._provider.shutdown, name="inferd-tracing-close", daemon=True)
        closing.start()
        closing.join(None if math.isinf(timeout_s) else timeout_s)


def _exporter(endpoint: str) -> Any:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = not endpoint.startswith("https://")
        return OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        url = endpoint if "://" in endpoint else "http://" + endpoint
        scheme, _, rest = url.partition("://")
        if "/" not in rest:
            url = f"{scheme}://{rest}/v1/traces"
        return HttpSpanExporter(endpoint=url)
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: expected 'grpc' or 'http/protobuf', got {protocol!r}")
