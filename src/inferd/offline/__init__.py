"""``inferd batch``: score files offline in large batches with bounded memory (``batch``)."""

from inferd.offline.batch import (
    BatchOptions,
    Engine,
    Job,
    Scored,
    Summary,
    open_scorer,
    run,
    score_chunk,
)

__all__ = [
    "BatchOptions",
    "Engine",
    "Job",
    "Scored",
    "Summary",
    "open_scorer",
    "run",
    "score_chunk",
]
