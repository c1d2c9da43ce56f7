#!/usr/bin/env python
"""What loading and closing one ONNX version costs the rest of the server, weights embedded in
``model.onnx`` against weights saved apart and served mapped. Opt-in (not CI).

    .venv/bin/python -m bench.load_close [--mb 50] [--cycles 12] [--pin]

Builds one ``y = table[i]`` model of ``--mb`` MB twice: as one file, and as ``model.onnx`` plus
``model.onnx.data`` (``inferd optimize``'s ``onnx-mapped`` variant) served with ``[onnx]
share_weights = true``. For each, a thread loads the version with inferd's own loader
(``load_model``, glibc's mmap threshold fixed as under ``--memory_budget``), answers one request
and closes it, ``--cycles`` times, while the main thread runs a Python loop that notes every gap
of more than 0.5 ms between two of its turns: time it could not run, as the event loop could not
(the loader held the GIL, or the CPU). Reported for loads and for closes: the wall time (median
and max), and the main thread's gaps that overlapped them (count, total, longest). With
``--pin`` both threads share CPU 0, as a server pinned to one core does.

Results go to stdout and bench/results/load-close.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.multimodel import write_table
from inferd.config import ModelSettings
from inferd.devices import return_large_blocks
from inferd.runtimes import load_model

BENCH = Path(__file__).resolve().parent
GAP_S = 0.0005


def measure(folder: Path, settings: ModelSettings, cycles: int) -> dict[str, Any]:
    """Load, call and close the version in ``folder`` ``cycles`` times on a thread while this
    thread notes its own gaps; returns the timings (milliseconds). A gap counts for a load or a
    close when it overlaps one."""
    spans: dict[str, list[tuple[float, float]]] = {"load": [], "close": []}
    gaps: list[tuple[float, float]] = []

    def cycle() -> None:
        for _ in range(cycles):
            started = time.perf_counter()
            model, _ = load_model(folder, settings, "onnx")
            spans["load"].append((started, time.perf_counter()))
            model.predict("serving_default", {"i": np.array([0], np.int64)})
            time.sleep(0.05)
            started = time.perf_counter()
            model.close()
            del model
            spans["close"].append((started, time.perf_counter()))
            time.sleep(0.05)

    worker = threading.Thread(target=cycle)
    worker.start()
    last = time.perf_counter()
    while worker.is_alive():
        now = time.perf_counter()
        if now - last > GAP_S:
            gaps.append((last, now))
        last = now
    worker.join()
    result: dict[str, Any] = {}
    for name, found in spans.items():
        took = [end - start for start, end in found]
        during = [b - a for a, b in gaps if any(a < end and b > start for start, end in found)]
        result[name] = {
            "median_ms": _ms(statistics.median(took)),
            "max_ms": _ms(max(took)),
            "main_thread_gaps": len(during),
            "gaps_total_ms": _ms(sum(during)),
            "longest_gap_ms": _ms(max(during, default=0.0)),
        }
    return result


def _ms(seconds: float) -> float:
    return round(1e3 * seconds, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="the model's weights, in MB")
    parser.add_argument("--cycles", type=int, default=12, help="loads and closes per case")
    parser.add_argument("--pin", action="store_true", help="both threads on CPU 0")
    args = parser.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {0})
    return_large_blocks()
    work = Path(tempfile.mkdtemp(prefix="inferd-load-close-"))
    nbytes = int(args.mb * 10**6)
    write_table(work / "embedded", nbytes, 1)
    write_table(work / "mapped", nbytes, 1, external=True)
    cases = {
        "embedded": (work / "embedded", ModelSettings()),
        "mapped": (work / "mapped", ModelSettings(runtime_tables={"onnx": {"share_weights": True}})),
    }
    result: dict[str, Any] = {"mb": args.mb, "cycles": args.cycles, "pinned": args.pin}
    for name, (folder, settings) in cases.items():
        measure(folder, settings, 1)  # onnxruntime's first session in the process pays its start-up
        result[name] = measure(folder, settings, args.cycles)
        print(name, json.dumps(result[name]), flush=True)
    (BENCH / "results" / "load-close.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
