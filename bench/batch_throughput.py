#!/usr/bin/env python
"""``inferd batch`` rows/s against raw onnxruntime in a tight loop, same model, same batch size.

For each model (the suite's ``digits`` MLP and ``cnn``, see models.py) the same float32 rows are
written to a file, then, alternating:

- ``raw ort``: one thread loops ``session.run`` over the rows in memory, in batches of B rows,
  with onnxruntime's default session options (intra-op threads = cores). The target's reference.
- ``raw per-core``: one loop per core, each over its share of the batches in memory, sharing a
  session with inferd's options (one intra-op thread, no spinning): what inferd's threads could
  do if reading, checking and writing cost nothing.
- ``inferd batch``: scores the file (read, check, predict, write, overlapped), its summary's
  rows/s (model load excluded).

Rows/s are medians over the rounds, ratios the median of each round's ratio; the load average
before and after each model is shown. The target is inferd >= 0.9 x raw ort. On a shared
machine read the ratios, not the rows/s.

    .venv/bin/python -m bench.batch_throughput                       # digits and cnn, 3 rounds
    .venv/bin/python -m bench.batch_throughput --models digits --rounds 1 --format parquet
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq

from bench import models

BENCH = Path(__file__).resolve().parent


SHAPES = {"digits": (64,), "cnn": (1, 28, 28)}
DEFAULT_ROWS = {"digits": 2_000_000, "cnn": 100_000}
"""About half a second of compute or more for each on an idle 2-core machine, so that the one
chunk read before the first batch and the one written after the last are not what is timed."""
DEFAULT_BATCH = {"digits": 1024, "cnn": 256}


def raw_rows_per_s(model_file: Path, x: np.ndarray, batch: int) -> float:
    """``session.run`` over ``x`` in batches, one calling thread, default session options."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    session.run(None, {"input": x[:batch]})
    started = time.perf_counter()
    for start in range(0, len(x), batch):
        session.run(None, {"input": x[start : start + batch]})
    return len(x) / (time.perf_counter() - started)


def per_core_rows_per_s(model_file: Path, x: np.ndarray, batch: int) -> float:
    """One thread per core, each looping ``session.run`` over its share of the batches, on one
    session with inferd's options (one intra-op thread, no spinning)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    session.run(None, {"input": x[:batch]})
    starts = list(range(0, len(x), batch))
    cores = os.cpu_count() or 1

    def loop(share: list[int]) -> None:
        for start in share:
            session.run(None, {"input": x[start : start + batch]})

    threads = [threading.Thread(target=loop, args=(starts[i::cores],)) for i in range(cores)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(x) / (time.perf_counter() - started)


def inferd_rows_per_s(base: Path, source: Path, out: Path, batch: int) -> float:
    summary = out.with_suffix(".json")
    argv = [
        sys.executable,
        "-m",
        "inferd",
        "batch",
        str(base),
        str(source),
        str(out),
        f"--batch-size={batch}",
        "--progress=none",
        "--log_level=warning",
        f"--summary-json={summary}",
    ]
    subprocess.run(argv, check=True, stderr=subprocess.DEVNULL)
    out.unlink()
    return float(json.loads(summary.read_text())["rows_per_s"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--format", choices=["npy", "parquet"], default="npy")
    parser.add_argument("--rows", type=int, help="rows per model (default: 2M digits, 100k cnn)")
    args = parser.parse_args()
    print(
        f"{'model':>6}  {'batch':>5}  {'rows':>9}  {'load avg':>9}  {'raw ort':>10}  {'raw per-core':>12}  "
        f"{'inferd batch':>12}  {'inferd/raw ort':>14}  {'inferd/per-core':>15}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            base = work / name
            model_file = base / "1" / "model.onnx"
            getattr(models, f"build_{name}")(model_file)
            rows, batch = args.rows or DEFAULT_ROWS[name], DEFAULT_BATCH[name]
            x = np.random.default_rng(0).random((rows, *SHAPES[name]), dtype=np.float32)
            source = work / f"{name}.{args.format}"
            if args.format == "npy":
                np.save(source, x)
            else:
                flat = x.reshape(rows, -1)
                pq.write_table(
                    pa.table({f"f{i}": flat[:, i] for i in range(flat.shape[1])}),
                    source,
                    row_group_size=65536,
                )
            raw, per_core, ours = [], [], []
            load_before = os.getloadavg()[0]
            for _ in range(args.rounds):
                raw.append(raw_rows_per_s(model_file, x, batch))
                per_core.append(per_core_rows_per_s(model_file, x, batch))
                ours.append(inferd_rows_per_s(base, source, work / f"{name}-out.npy", batch))
            load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
            r, c, o = (statistics.median(v) for v in (raw, per_core, ours))
            # Ratios within a round (measured a few seconds apart), then their median.
            to_raw = statistics.median(b / a for a, b in zip(raw, ours, strict=True))
            to_core = statistics.median(b / a for a, b in zip(per_core, ours, strict=True))
            print(
                f"{name:>6}  {batch:>5}  {rows:>9,}  {load:>9}  {r:>10,.0f}  {c:>12,.0f}  {o:>12,.0f}  "
                f"{to_raw:>14.2f}  {to_core:>15.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
