#!/usr/bin/env python
"""What shadow and capture add to the event loop's work per request, measured in process.

    .venv/bin/python -m bench.rollouts_hot_path

On a shared 2-CPU machine an A/B of two servers cannot resolve a few percent (see
bench/rollouts.py); this times what a request's ``InferenceService.answered`` hooks do on the
event loop's thread: the sampling draw and, when drawn, the put on the bounded queue
(``ShadowMirror.offer`` at fraction 1.0 with its queue full, so nothing is computed;
``TrafficCapture.offer`` at 1%). The shadow's own predict and the capture's Parquet writing run
on threads of their own and cost CPU only where the machine has it to spare.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from inferd.capture import TrafficCapture
from inferd.config import CaptureSettings, ModelSettings, ShadowSettings
from inferd.manager import ModelManager, _Entry
from inferd.metrics import Metrics
from inferd.servable import Servable, ServableFactory
from inferd.service import InferenceService
from inferd.shadow import ShadowMirror
from inferd.threads import ThreadPool
from inferd.types import InferenceResponse, ModelId

CALLS = 100_000


async def per_call_s(settings: ModelSettings, hook: str) -> float:
    metrics = Metrics()
    with ThreadPoolExecutor(1) as pool:
        factory = ServableFactory(ThreadPool(1, "inferd-infer"))
        manager: ModelManager[Servable] = ModelManager(pool, factory.load)
        manager._models["digits"] = _Entry(settings=settings)
        service = InferenceService(manager, metrics)
        if hook == "shadow":
            shadow = ShadowMirror(manager, metrics)
            service.answered.append(shadow.offer)
        elif hook == "capture":
            capture = TrafficCapture(manager, metrics)
            service.answered.append(capture.offer)
        response = InferenceResponse(ModelId("digits", 1), {"y": np.zeros((1, 10), np.float32)}, None)
        started = time.perf_counter()
        for _ in range(CALLS):
            with service.call("tfserving_rest", "digits", "r1") as call:
                call.response = response
        elapsed = (time.perf_counter() - started) / CALLS
        if hook == "capture":
            capture.close()
        return elapsed


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        plain = asyncio.run(per_call_s(ModelSettings(), ""))
        shadow = asyncio.run(per_call_s(ModelSettings(shadow=ShadowSettings(2, 1.0, queue=1)), "shadow"))
        capture = asyncio.run(
            per_call_s(ModelSettings(capture=CaptureSettings(Path(tmp), 0.01, flush_s=0.5)), "capture")
        )
    print(f"a call with no hook:      {plain * 1e6:.2f} us")
    print(f"shadow at 1.0 (enqueue):  +{(shadow - plain) * 1e6:.2f} us a request")
    print(f"capture at 1%:            +{(capture - plain) * 1e6:.2f} us a request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
