"""Where a model call runs: on the event loop's thread when the calls of its signature have shown
it to be fast, else on an inference thread (docs/performance.md, "The model call on the event
loop")."""

from __future__ import annotations

from collections import deque

INLINE_PREDICT_S = 50e-6
"""A call whose expected model time (the signature's recent seconds per row times the call's
rows) is at most this runs on the event loop's thread instead of an inference thread: handing a
call to a thread and back costs more than that (about 90 us of CPU per request measured on one
core with the digits model), and blocking the loop that briefly delays the other requests less
than the hand-off would."""
SAMPLES = 8
"""How many recent calls of a signature judge it; the fastest counts, so that calls stretched by
the scheduler or, on a thread, by waiting for the GIL change nothing unless all of them were."""


class CallCosts:
    """The model seconds per row of one signature's last ``SAMPLES`` calls, batched or not.
    Event loop thread only."""

    __slots__ = ("_per_row",)

    def __init__(self) -> None:
        self._per_row: deque[float] = deque(maxlen=SAMPLES)

    def inline(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows may run on the event loop: the fastest recent call's
        seconds per row times ``rows`` is at most ``INLINE_PREDICT_S``; never before a first call."""
        per_row = self._per_row
        return bool(per_row) and min(per_row) * rows <= INLINE_PREDICT_S

    def add(self, rows: int, seconds: float) -> None:
        """Record a call of ``rows`` rows (at least 1 counted) that took ``seconds`` of model time."""
        self._per_row.append(seconds / max(rows, 1))
