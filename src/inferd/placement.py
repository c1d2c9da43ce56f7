"""Where a model call runs: on the event loop's thread when the calls of its signature have shown
it to be fast, else on an inference thread (docs/performance.md, "The model call on the event
loop")."""

from __future__ import annotations

from collections import deque

INLINE_PREDICT_S = 50e-6
"""A call whose expected model time is at most this runs on the event loop's thread instead of an
inference thread: handing a call to a thread and back costs more than that (about 90 us of CPU
per request measured on one core with the digits model), and blocking the loop that briefly
delays the other requests less than the hand-off would."""
SAMPLES = 8
"""How many recent calls of a signature judge it; the fastest counts, so that calls stretched by
the scheduler or, on a thread, by waiting for the GIL change nothing unless all of them were."""


class CallCosts:
    """The model time of one signature's last ``SAMPLES`` calls, batched or not. Event loop
    thread only.

    A call of ``n`` rows is expected to take the fastest recent seconds per row times ``n``, and
    never less than the fastest recent call took whole: a call's fixed cost (a GPU's
    synchronisation, say), spread over a large batch's rows, does not shrink for a small one.
    """

    __slots__ = ("_allowed", "_per_row", "_seconds")

    def __init__(self, allowed: bool = True) -> None:
        """``allowed`` False: every call goes to a thread (a model in a worker process, whose
        call waits on another process)."""
        self._seconds: deque[float] = deque(maxlen=SAMPLES)
        self._per_row: deque[float] = deque(maxlen=SAMPLES)
        self._allowed = allowed

    def inline(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows may run on the event loop: it is expected to take at
        most ``INLINE_PREDICT_S``; never before a first call."""
        return (
            self._allowed
            and bool(self._seconds)
            and min(self._seconds) <= INLINE_PREDICT_S
            and min(self._per_row) * rows <= INLINE_PREDICT_S
        )

    def add(self, rows: int, seconds: float) -> None:
        """Record a call of ``rows`` rows (at least 1 counted) that took ``seconds`` of model time."""
        self._seconds.append(seconds)
        self._per_row.append(seconds / max(rows, 1))
