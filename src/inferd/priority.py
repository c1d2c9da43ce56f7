"""Thread priority: work that no client waits for yields the CPU to work that clients wait for.

The shadow's predictions and the capture's Parquet writing run on threads of their own
(``shadow.py``, ``capture.py``), and so can an onnxruntime session's build (``[onnx]
load_nice``). ``lower_this_thread`` raises the calling thread's nice value (by
``BACKGROUND_NICE`` unless told) so that, on a busy CPU, the kernel runs the event loop and the
inference threads first: the background thread computes in the time they leave. Linux applies a
nice value to one thread (``setpriority`` with its thread id), and a thread starts with its
creator's. The GIL is not affected: a background thread still holds it while it runs Python code,
and only gives way to the others while it waits or computes outside Python (a model call, a
Parquet encode).
"""

from __future__ import annotations

import os
import threading

BACKGROUND_NICE = 10
"""How much nicer than the process a background thread runs (Linux nice values: 0 to 19)."""


def lower_this_thread(by: int = BACKGROUND_NICE) -> bool:
    """Lower the calling thread's scheduling priority by ``by`` nice steps (capped at nice 19);
    whether it could (False where the platform has no per-thread nice value or refuses)."""
    if not hasattr(os, "setpriority"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        return False
    return True
