"""Python's cyclic garbage collector and the objects that live as long as the server.

The collector's oldest generation holds every long-lived object: modules, classes, the runtimes'
wrappers, the models. A collection of it walks them all while the event loop waits: 14-19 ms of CPU
in a server with the CNN and digits models, every few seconds under load (docs/performance.md,
"The garbage collector"). What is alive once the models are loaded stays alive, so ``settle`` collects
once and takes the rest out of the collector's reach (``gc.freeze``): later collections walk only
what came after.

A frozen object is never collected, even once it is a reference cycle's garbage, so an unloaded
version's cycles would be kept. ``release`` therefore puts the frozen objects back in the oldest
generation when a version is unloaded, and ``settle_again`` settles anew a while later (its full
collection is a pause, so at most once a minute). A request in flight at a settle has its objects
frozen too: freed as usual when nothing refers to them, and only its reference cycles kept, until
the next release. Module state: the collector is the process's.
"""

from __future__ import annotations

import gc
import threading
import time

RESETTLE_S = 60.0
"""The least time between two settles when versions are unloaded: each is a full collection."""

_settled_at: float | None = None  # time.monotonic() of the last settle
_released = False  # a release came since the last settle began
_lock = threading.RLock()  # a release from a thread waits for a settle's collection to end


def settle() -> None:
    """Collect every generation, then freeze the objects left. Blocks for the collection."""
    global _settled_at, _released
    with _lock:
        _released = False  # a release during the collection (a finalizer's) asks for the next
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        _settled_at = time.monotonic()


def release() -> None:
    """Make the frozen objects collectable again (a version was unloaded); any thread."""
    global _released
    with _lock:
        gc.unfreeze()
        _released = True


def settle_again(now: float) -> bool:
    """``settle`` when a ``release`` came since the last settle and that one is ``RESETTLE_S`` old
    at ``now`` (``time.monotonic()``); whether it did."""
    if not _released or _settled_at is None or now - _settled_at < RESETTLE_S:
        return False
    settle()
    return True
