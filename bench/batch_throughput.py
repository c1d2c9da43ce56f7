#!/usr/bin/env python
"""``inferd batch`` rows/s against raw onnxruntime in a tight loop, same model, same batch size.

For each model (the suite's ``digits`` MLP and ``cnn``, see models.py) the same float32 rows are
written to a file, then, alternating, ``raw`` runs ``session.run`` over them in batches of B rows
from memory (onnxruntime's default session options, one calling thread) and ``inferd batch``
scores the file (read, validate, predict, write, in overlapped chunks, one predict call per CPU
at once; its summary's rows/s, which excludes the model load). ``raw`` runs with onnxruntime's
default session options (intra-op threads = cores) and, as ``raw 1-thread``, with inferd's (one
intra-op thread). Medians over the rounds; the target is inferd >= 0.9 x raw.

    .venv/bin/python bench/batch_throughput.py                       # digits and cnn, 3 rounds
    .venv/bin/python bench/batch_throughput.py --models digits --rounds 1 --format parquet
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import models  # noqa: E402

SHAPES = {"digits": (64,), "cnn": (1, 28, 28)}
DEFAULT_ROWS = {"digits": 400_000, "cnn": 40_000}
DEFAULT_BATCH = {"digits": 1024, "cnn": 256}


def raw_rows_per_s(model_file: Path, x: np.ndarray, batch: int, single_thread: bool) -> float:
    """``session.run`` over ``x`` in batches, one calling thread; onnxruntime's default session
    options (intra-op threads = cores, spinning), or inferd's (one intra-op thread, no spinning)."""
    options = ort.SessionOptions()
    if single_thread:
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    session.run(None, {"input": x[:batch]})
    started = time.perf_counter()
    for start in range(0, len(x), batch):
        session.run(None, {"input": x[start : start + batch]})
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
    parser.add_argument("--rows", type=int, help="rows per model (default: 400k digits, 40k cnn)")
    args = parser.parse_args()
    print(
        f"{'model':>6}  {'batch':>5}  {'rows':>7}  {'raw ort rows/s':>14}  {'raw 1-thread rows/s':>18}  "
        f"{'inferd batch rows/s':>19}  {'inferd/raw':>10}"
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
            raw, single, ours = [], [], []
            for _ in range(args.rounds):
                raw.append(raw_rows_per_s(model_file, x, batch, single_thread=False))
                single.append(raw_rows_per_s(model_file, x, batch, single_thread=True))
                ours.append(inferd_rows_per_s(base, source, work / f"{name}-out.npy", batch))
            r, s1, o = (statistics.median(v) for v in (raw, single, ours))
            print(
                f"{name:>6}  {batch:>5}  {rows:>7}  {r:>14,.0f}  {s1:>18,.0f}  {o:>19,.0f}  {o / r:>10.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
