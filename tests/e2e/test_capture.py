"""Traffic capture: the files are valid Parquet whose rows are the answers clients got, only the
allowed columns are written, and ``inferd select --data`` ranks candidates on a capture folder."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests

from tests.conftest import ServerProcess
from tests.e2e.test_select import _gaussian_nb, _select, _write_onnx
from tests.models import digits, write_onnx_digits

REQUESTS = 20
ROWS = 5
FIELDS = ["request_id", "time", "version", "latency_ms", "X", "output.label"]


def captured(folder: Path) -> pa.Table | None:
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    return pa.concat_tables(pq.read_table(f) for f in files) if files else None


def test_capture_files_hold_the_answers_clients_got_and_select_ranks_on_them(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = tmp_path / "digits"
    write_onnx_digits(base / "1")
    (base / "inferd.toml").write_text(
        f'[capture]\npath = "captures"\nfraction = 1.0\nflush_s = 0.2\nfields = {json.dumps(FIELDS)}\n'
    )
    server = start_server(f"--model_base_path={base}", "--model_name=digits")
    x, _ = digits()
    answers: dict[str, list[int]] = {}
    for i in range(REQUESTS):
        batch = x[i * ROWS : (i + 1) * ROWS].astype(np.float32)
        reply = requests.post(
            f"{server.url}/v2/models/digits/infer",
            json={
                "id": f"q{i}",
                "inputs": [
                    {
                        "name": "X",
                        "datatype": "FP32",
                        "shape": list(batch.shape),
                        "data": batch.ravel().tolist(),
                    }
                ],
                "outputs": [{"name": "label"}],
            },
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        answers[f"q{i}"] = reply.json()["outputs"][0]["data"]

    folder = base / "captures"
    server.wait_for(
        lambda: (table := captured(folder)) is not None and table.num_rows == REQUESTS * ROWS,
        "every captured row to be written",
    )
    table = captured(folder)
    assert table is not None
    assert table.column_names == FIELDS
    assert not list(folder.glob(".*"))  # no half-written file is left in the folder
    rows = table.to_pylist()
    for i, (request_id, labels) in enumerate(answers.items()):
        mine = [row for row in rows if row["request_id"] == request_id]
        assert [row["output.label"] for row in mine] == labels
        assert [row["X"] for row in mine] == x[i * ROWS : (i + 1) * ROWS].astype(np.float32).tolist()
        assert {row["version"] for row in mine} == {1}
        assert all(row["latency_ms"] > 0 for row in mine)

    same, other = tmp_path / "same", tmp_path / "other"
    write_onnx_digits(same / "1")
    # Replay with inferd batch, reading the capture folder as it is: the same answers again.
    scored = tmp_path / "replayed.parquet"
    replay = subprocess.run(
        [
            sys.executable,
            "-m",
            "inferd",
            "batch",
            str(same),
            str(folder),
            str(scored),
            "--id_column=request_id",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    replayed = pq.read_table(scored).to_pylist()
    assert len(replayed) == REQUESTS * ROWS
    assert sorted((r["request_id"], r["label"]) for r in replayed) == sorted(
        (row["request_id"], row["output.label"]) for row in rows
    )

    # Replay: rank two candidates by how often they agree with what production answered.
    _write_onnx(other / "1", _gaussian_nb())
    report = tmp_path / "report.json"
    done = _select(
        same, other, "--data", folder, "--label", "output.label", "--optimize", "accuracy", "--json", report
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_bytes())
    by_name = {c["name"]: c for c in result["candidates"]}
    assert result["winner"] == "same"
    assert by_name["same"]["metrics"]["accuracy"] == 1.0
    assert by_name["other"]["metrics"]["accuracy"] < 1.0
    assert by_name["same"]["details"]["rows"] == REQUESTS * ROWS
