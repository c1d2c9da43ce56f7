"""``inferd bench``: load a TF Serving or V2 server and report latency, throughput, errors (``runner``)."""

from inferd.loadtest.runner import (
    PERCENTILES,
    BenchOptions,
    StepReport,
    error_messages,
    plot,
    progress_line,
    run,
    steps_of,
    table,
    to_json,
)

__all__ = [
    "PERCENTILES",
    "BenchOptions",
    "StepReport",
    "error_messages",
    "plot",
    "progress_line",
    "run",
    "steps_of",
    "table",
    "to_json",
]
