#!/usr/bin/env python
"""What a worker process (``isolation = "process"``) adds to one ``predict`` call.

    .venv/bin/python -m bench.worker_overhead [--rounds 7] [--calls 300] [--json out.json]

Loads the benchmark's ``digits`` and ``cnn`` ONNX models twice, in the process and in a worker,
and times ``Model.predict`` from one thread for batches of 1 and 32 rows. The two modes alternate
round by round, so that a shared machine's noise falls on both alike; the figures are the median
and p99 over every call of every round, and their difference is the worker's cost per call
(pickling, two pipe round trips, the copies and the thread hand-offs on both sides).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.models import build_all, instances
from inferd.config import ModelSettings
from inferd.runtimes import Model, load_model


def time_calls(model: Model, inputs: dict[str, np.ndarray], calls: int) -> list[float]:
    """Seconds per call, for ``calls`` calls in a row."""
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        model.predict("serving_default", inputs)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300, help="calls per mode, batch and round")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = build_all(Path(folder))
        for name, path in paths.items():
            models = {
                mode: load_model(path.parent, ModelSettings(isolation=mode), None)[0]
                for mode in ("none", "process")
            }
            for batch in (1, 32):
                inputs = {"input": instances(name, batch)}
                samples: dict[str, list[float]] = {mode: [] for mode in models}
                for model in models.values():
                    time_calls(model, inputs, 20)  # warm up
                for _ in range(args.rounds):
                    for mode, model in models.items():
                        samples[mode] += time_calls(model, inputs, args.calls)
                row: dict[str, Any] = {
                    "model": name,
                    "batch": batch,
                    "input_bytes": int(inputs["input"].nbytes),
                }
                for mode, seconds in samples.items():
                    row[f"{mode}_p50_us"] = round(float(np.percentile(seconds, 50)) * 1e6, 1)
                    row[f"{mode}_p99_us"] = round(float(np.percentile(seconds, 99)) * 1e6, 1)
                row["added_p50_us"] = round(row["process_p50_us"] - row["none_p50_us"], 1)
                rows.append(row)
                print(
                    f"{name:6} batch {batch:2} ({row['input_bytes']:>6} B in): in-process p50 "
                    f"{row['none_p50_us']:7.1f} us p99 {row['none_p99_us']:7.1f} us | "
                    f"worker p50 {row['process_p50_us']:7.1f} us p99 {row['process_p99_us']:7.1f} us | "
                    f"added p50 {row['added_p50_us']:6.1f} us"
                )
            for model in models.values():
                model.close()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
