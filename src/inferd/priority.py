"""Thread priority: work that no client waits for yields the CPU to work that clients wait for.

The shadow's predictions and the capture's Parquet writing run on threads of their own
(``shadow.py``, ``capture.py``). ``lower_this_thread`` raises the calling thread's nice value by
``BACKGROUND_NICE`` so that, on a busy CPU, the kernel runs the event loop and the inference
threads first: the background thread computes in the time they leave. Linux applies a nice
value to one thread (``setpriority`` with its thread id); the GIL is not affected, so a
background thread still holds it while it runs Python code, and only gives way to the others
while it waits or computes outside Python (a model call, a Parquet encode).
"""

from __future__ import annotations

import os
import threading

BACKGROUND_NICE = 10
"""How much nicer than the process a background thread runs (Linux nice values: 0 to 19)."""


def lower_this_thread() -> bool:
    """Lower the calling thread's scheduling priority by ``BACKGROUND_NICE`` (capped at nice 19);
    whether it could (False where the platform has no per-thread nice value)."""
    if not hasattr(os, "setpriority"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except OSError:
        return False
    return True
