"""``inferd batch`` run as users run it (the CLI in a subprocess), checked against onnxruntime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper

from tests.models import digits, write_onnx_digits, write_onnx_two_inputs, write_python_model


def batch(*args: object, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "inferd", "batch", *map(str, args)]
    if not any(str(a).startswith("--progress") for a in args):
        argv.append("--progress=log")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if check is not None:
        assert done.returncode == check, done.stderr
    return done


def start_batch(*args: object) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "inferd", "batch", *map(str, args), "--progress=log"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("repo") / "digits"
    write_onnx_digits(base / "1")
    return base


def expected(model: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"X": x.astype(np.float32)})
    return label, probabilities


def features(rows: int | None = None) -> tuple[np.ndarray, pa.Table]:
    x = digits()[0] if rows is None else np.resize(digits()[0], (rows, 64))
    columns = {"id": np.arange(len(x)) * 10, **{f"px{i}": x[:, i] for i in range(64)}}
    return x, pa.table(columns)


def write_input(table: pa.Table, path: Path) -> None:
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=500)
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))


def read_output(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix == ".csv":
        return pacsv.read_csv(path)
    return pa.Table.from_pylist([json.loads(line) for line in path.read_text().splitlines()])


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_each_tabular_format_matches_onnxruntime(tmp_path: Path, model: Path, suffix: str) -> None:
    x, table = features()
    source = tmp_path / f"in{suffix}"
    write_input(table, source)
    out = tmp_path / "out.parquet"
    summary = tmp_path / "summary.json"
    batch(model, source, out, "--id-column=id", "--summary-json", summary)

    result = pq.read_table(out)
    label, probabilities = expected(model, x)
    assert result.column_names == ["id", "label", "probabilities"]
    assert result.column("id").to_pylist() == table.column("id").to_pylist()
    assert np.array_equal(result.column("label").to_numpy(), label)
    assert np.allclose(np.stack(result.column("probabilities").to_numpy(zero_copy_only=False)), probabilities)
    stats = json.loads(summary.read_text())
    assert stats["rows"] == len(x)
    assert stats["rejected"] == 0
    assert stats["peak_memory_bytes"] > 0
    assert not (tmp_path / "out.parquet.partial").exists()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_each_output_format_holds_the_row_number_and_predictions(
    tmp_path: Path, model: Path, suffix: str
) -> None:
    x = digits()[0]
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / f"out{suffix}"
    batch(model, tmp_path / "x.npy", out, "--batch-size=100")

    result = read_output(out)
    label, probabilities = expected(model, x)
    assert result.column("row").to_pylist() == list(range(len(x)))
    assert np.array_equal(result.column("label").to_numpy(), label)
    if suffix == ".csv":  # one column per value
        got = np.stack([result.column(f"probabilities_{i}").to_numpy() for i in range(10)], axis=1)
    else:
        got = np.stack(result.column("probabilities").to_numpy(zero_copy_only=False))
    assert np.allclose(got, probabilities, atol=1e-6)


def test_npy_to_npy_and_folders_and_globs_of_files(tmp_path: Path, model: Path) -> None:
    x = digits()[0]
    folder = tmp_path / "parts"
    folder.mkdir()
    for i, start in enumerate(range(0, len(x), 600)):
        np.save(folder / f"part-{i}.npy", x[start : start + 600])
    label, probabilities = expected(model, x)

    done = batch(model, folder, tmp_path / "labels.npy", "--outputs=label", "--progress=bar")
    assert np.array_equal(np.load(tmp_path / "labels.npy"), label)
    assert f"{len(x)}/{len(x)}" in done.stderr  # the rich bar, finished

    batch(model, str(folder / "part-*.npy"), tmp_path / "p.npy", "--outputs=probabilities")
    assert np.allclose(np.load(tmp_path / "p.npy"), probabilities)


def test_keep_columns_and_model_given_as_version_folder_or_repository(tmp_path: Path, model: Path) -> None:
    x, table = features(50)
    write_input(table, tmp_path / "in.parquet")
    label, _ = expected(model, x)
    for where in ([model / "1"], [model.parent, "--model=digits"], [model, "--version=1"]):
        out = tmp_path / "out.parquet"
        batch(*where, tmp_path / "in.parquet", out, "--id-column=id", "--keep-columns=px1", "--outputs=label")
        result = pq.read_table(out)
        assert result.column_names == ["id", "px1", "label"]
        assert result.column("px1").to_pylist() == table.column("px1").to_pylist()
        assert np.array_equal(result.column("label").to_numpy(), label)


def test_a_kept_column_named_like_an_output_is_refused_not_overwritten(tmp_path: Path) -> None:
    # The output's column replaced the kept one silently: --keep-columns '*' on a file holding the
    # true "y" wrote the predictions where the user expected the truth, and no truth at all.
    base = refusing_model(tmp_path)
    (tmp_path / "in.csv").write_text("x_0,x_1,y\n1,2,truth\n3,4,truth\n")
    for out in (tmp_path / "out.parquet", tmp_path / "out.jsonl"):
        done = batch(base, tmp_path / "in.csv", out, "--keep-columns=*", check=2)
        assert "output column(s) ['y'] would replace the id or kept column(s) of that name" in done.stderr
        assert not out.exists()
    batch(base, tmp_path / "in.csv", tmp_path / "out.csv", "--keep-columns=*")  # outputs y_0, y_1
    result = pacsv.read_csv(tmp_path / "out.csv")
    assert result.column_names == ["row", "x_0", "x_1", "y", "y_0", "y_1"]
    assert result.column("y").to_pylist() == ["truth", "truth"]


def test_id_and_kept_columns_typed_apart_in_some_chunks_merge_into_one_parquet(tmp_path: Path) -> None:
    # Each part takes its id and kept columns' types from its own rows: a note that is null in a
    # whole chunk, or ids that are numbers in one file and text in another, made parts whose
    # schemas differ, and the merge failed after all the scoring, at every --resume too.
    base = refusing_model(tmp_path)
    (tmp_path / "in").mkdir()
    rows = [{"id": i, "x_0": i, "x_1": 1, "note": "late" if i == 40 else None} for i in range(48)]
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "in" / "b.jsonl").write_text('{"id": "k1", "x_0": 1, "x_1": 1, "note": null}\n')
    out = tmp_path / "out.parquet"
    args = ("--id-column=id", "--keep-columns=note", "--batch-size=16", "--memory-budget-mb=0.001")
    batch(base, tmp_path / "in", out, *args)
    result = pq.read_table(out)
    assert result.column("id").to_pylist() == [*map(str, range(48)), "k1"]
    assert result.column("note").to_pylist() == [None] * 40 + ["late"] + [None] * 8
    assert np.array_equal(np.array(result.column("y").to_pylist())[:48, 0], np.arange(48) * 2)


def test_integer_id_and_kept_columns_keep_their_nulls(tmp_path: Path) -> None:
    # They went through numpy as floats: ids 1.0, NaN, 3.0 and counts NaN, 5.0, 6.0 came out.
    base = refusing_model(tmp_path)
    table = pa.table(
        {
            "id": pa.array([1, None, 3]),
            "x_0": [1.0, 2.0, 3.0],
            "x_1": [1.0, 2.0, 3.0],
            "count": pa.array([None, 5, 6], pa.int32()),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    for out in (tmp_path / "out.parquet", tmp_path / "out.jsonl"):
        batch(base, tmp_path / "in.parquet", out, "--id-column=id", "--keep-columns=count")
        result = read_output(out)
        assert result.column("id").to_pylist() == [1, None, 3]
        assert result.column("count").to_pylist() == [None, 5, 6]


def test_csv_ids_and_codes_written_with_leading_zeros_keep_them(tmp_path: Path) -> None:
    # Typed as integers, order 007 came out as 7 and zip code 02134 as 2134.
    base = refusing_model(tmp_path)
    rows = [("007", "02134", 1), ("010", "10001", 2), ("3", "00501", 3)]
    lines = ["id,zip,count,x_0,x_1", *(f"{i},{z},{c},1,2" for i, z, c in rows)]
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    for out in (tmp_path / "out.parquet", tmp_path / "out.jsonl"):
        batch(base, tmp_path / "in.csv", out, "--id-column=id", "--keep-columns=zip,count")
        result = read_output(out)
        assert result.column("id").to_pylist() == ["007", "010", "3"]
        assert result.column("zip").to_pylist() == ["02134", "10001", "00501"]
        assert result.column("count").to_pylist() == [1, 2, 3]  # plain numbers are still numbers


def test_bad_rows_go_to_the_rejects_file_with_their_row_numbers(tmp_path: Path, model: Path) -> None:
    x, table = features(20)
    pacsv.write_csv(table, tmp_path / "clean.csv")
    cells = [line.split(",") for line in (tmp_path / "clean.csv").read_text().splitlines()]
    cells[3][5] = "abc"  # data row 2: a value that does not parse
    cells[5][9] = ""  # data row 4: a missing value
    cells[8] = cells[8][:-2]  # data row 7: two fields short
    (tmp_path / "in.csv").write_text("\n".join(",".join(c) for c in cells) + "\n")

    done = batch(
        model,
        tmp_path / "in.csv",
        tmp_path / "out.csv",
        "--id-column=id",
        "--rejects",
        tmp_path / "bad.jsonl",
        check=1,
    )
    assert "17 rows scored, 3 rejected" in done.stderr
    rejects = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [2, 4, 7]
    assert "'abc' is not a float32 value" in rejects[0]["error"]
    assert rejects[0]["record"]["px4"] == "abc"
    assert "column 'px8': missing value" in rejects[1]["error"]
    assert "expected 65 fields, got 63" in rejects[2]["error"]
    result = pacsv.read_csv(tmp_path / "out.csv")
    good = [i for i in range(20) if i not in (2, 4, 7)]
    assert result.column("id").to_pylist() == [10 * i for i in good]
    assert np.array_equal(result.column("label").to_numpy(), expected(model, x[good])[0])


def test_csv_rows_with_the_wrong_number_of_fields_in_later_blocks_are_rejected(tmp_path: Path) -> None:
    # The CSV reader reports a bad line while it parses the block after the one it hands over:
    # such a line used to be counted in the earlier block and ended the job ("cannot be read:
    # IndexError"), and the lines of a file whose every line was bad were dropped unreported.
    base = refusing_model(tmp_path)
    x = np.arange(40_000, dtype=np.float32).reshape(20_000, 2)
    short = [3, 9_000, 9_001, 15_000, 19_999]
    lines = ["x_0,x_1", *(f"{a:g}" if i in short else f"{a:g},{b:g}" for i, (a, b) in enumerate(x))]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "in" / "b.csv").write_text("x_0,x_1\n1\n2\n")

    out = tmp_path / "out.parquet"
    done = batch(base, tmp_path / "in", out, "--batch-size=64", "--memory-budget-mb=4", check=1)
    assert "19995 rows scored, 7 rejected" in done.stderr, done.stderr
    rejects = [json.loads(line) for line in (tmp_path / "out.parquet.rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [*short, 20_000, 20_001]
    assert {r["error"] for r in rejects} == {"expected 2 fields, got 1"}
    good = [i for i in range(20_000) if i not in short]
    result = pq.read_table(out)
    assert result.column("row").to_pylist() == good
    assert np.array_equal(np.array(result.column("y").to_pylist()), x[good] * 2)


def test_a_jsonl_line_that_is_not_json_is_rejected(tmp_path: Path, model: Path) -> None:
    _, table = features(4)
    lines = [json.dumps(row) for row in table.to_pylist()]
    lines.insert(1, '{"id": 5, "px0": ')
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    batch(model, tmp_path / "in.jsonl", tmp_path / "out.parquet", "--id-column=id", check=1)
    assert pq.read_table(tmp_path / "out.parquet").column("id").to_pylist() == [0, 10, 20, 30]
    (reject,) = [
        json.loads(line) for line in (tmp_path / "out.parquet.rejects.jsonl").read_text().splitlines()
    ]
    assert reject["row"] == 1
    assert reject["error"].startswith("not a JSON object")


def test_csv_id_and_kept_columns_whose_later_values_do_not_fit_the_first_block(tmp_path: Path) -> None:
    # Arrow's CSV reader typed the id and kept columns from the first block: an id that is not a
    # number further down, or a note empty until then, stopped the job there ("CSV conversion
    # error"), and again at every --resume: the file could not be scored at all.
    base = refusing_model(tmp_path)
    ids = [f"k{i}" if i == 18_000 else str(i) for i in range(20_000)]
    notes = ["late" if i == 19_000 else "" for i in range(20_000)]
    lines = ["id,x_0,x_1,note", *(f"{k},{i},1,{n}" for i, (k, n) in enumerate(zip(ids, notes, strict=True)))]
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.parquet"
    args = ("--id-column=id", "--keep-columns=note", "--batch-size=64", "--memory-budget-mb=4")
    batch(base, tmp_path / "in.csv", out, *args)
    result = pq.read_table(out)
    assert result.column("id").to_pylist() == ids
    assert result.column("note").to_pylist() == [n or None for n in notes]
    assert np.array_equal(np.array(result.column("y").to_pylist())[:, 0], np.arange(20_000) * 2)


def test_a_jsonl_file_whose_first_line_is_bad_or_that_is_empty_does_not_stop_the_job(tmp_path: Path) -> None:
    # The columns were read from each file's first line alone: a first line that was not JSON or
    # lacked a key, or an empty file (a shard of an export), stopped the whole job with exit 2.
    base = refusing_model(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(
        'garbage\n{"x_0": 1, "x_1": 2}\n{"x_0": 3}\n{"x_0": 5, "x_1": 6}\n'
    )
    (tmp_path / "in" / "b.jsonl").write_text("")
    (tmp_path / "in" / "c.jsonl").write_text('{"x_0": 7}\n{"x_0": 9, "x_1": 10}\n')

    done = batch(base, tmp_path / "in", tmp_path / "out.jsonl", check=1)
    assert "3 rows scored, 3 rejected" in done.stderr, done.stderr
    result = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert result == [{"row": 1, "y": [2, 4]}, {"row": 3, "y": [10, 12]}, {"row": 5, "y": [18, 20]}]
    rejects = [json.loads(line) for line in (tmp_path / "out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["file"][-7:]) for r in rejects] == [(0, "a.jsonl"), (2, "a.jsonl"), (4, "c.jsonl")]
    assert rejects[0]["error"].startswith("not a JSON object")
    assert [r["error"] for r in rejects[1:]] == ["column 'x_1': missing value"] * 2


def test_image_folders_are_scored_and_images_that_do_not_decode_rejected(tmp_path: Path) -> None:
    base = tmp_path / "sum"
    write_image_sum_model(base / "1")
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    images = (digits()[0][:5].reshape(5, 8, 8) * 15).astype(np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "9.png").write_bytes(b"not an image")

    batch(base, folder, tmp_path / "out.jsonl", check=1)
    result = read_output(tmp_path / "out.jsonl")
    assert result.column("file").to_pylist() == [f"{i}.png" for i in range(5)]
    assert np.allclose(
        result.column("total").to_numpy(), images.reshape(5, -1).sum(axis=1) / 255.0, rtol=1e-5
    )
    (reject,) = [json.loads(line) for line in (tmp_path / "out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert reject["row"] == 5
    assert reject["file"].endswith("9.png")
    assert "cannot decode image" in reject["error"]


def write_image_sum_model(version_dir: Path) -> None:
    """``total`` = the sum of an FP32 [-1, 8, 8] image."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 8, 8])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    node = helper.make_node("ReduceSum", ["image", "axes"], ["total"], keepdims=0)
    graph = helper.make_graph([node], "sum", [image], [total], [axes])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    version_dir.mkdir(parents=True)
    onnx.save(proto, version_dir / "model.onnx")


def test_a_missing_column_fails_fast_naming_it_before_any_output(tmp_path: Path) -> None:
    base = tmp_path / "two"
    write_onnx_two_inputs(base / "1")
    good = pa.table({"a": [[1.0, 2.0, 3.0]], "b": [4]})
    pq.write_table(good, tmp_path / "1.parquet")
    pq.write_table(good.drop(["b"]), tmp_path / "2.parquet")  # the second file lacks column b

    done = batch(base, tmp_path, tmp_path / "out.parquet", check=2)
    assert "2.parquet: missing column(s) ['b']" in done.stderr
    assert not (tmp_path / "out.parquet").exists()
    assert not (tmp_path / "out.parquet.partial").exists()

    pq.write_table(good, tmp_path / "2.parquet")
    batch(base, tmp_path, tmp_path / "out.parquet")
    result = pq.read_table(tmp_path / "out.parquet")
    assert result.column("sum").to_pylist() == [[5.0, 6.0, 7.0]] * 2
    assert result.column("count").to_pylist() == [3, 3]


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_an_input_larger_than_the_memory_budget_streams_in_bounded_memory(
    tmp_path: Path, model: Path, suffix: str
) -> None:
    small_x, small = features(2_000)
    big_x, big = features(200_000)  # 51 MiB of features, 6x the budget below
    for name, x, table in (("small", small_x, small), ("big", big_x, big)):
        if suffix == ".npy":
            np.save(tmp_path / f"{name}.npy", x.astype(np.float32))
        else:
            write_input(table, tmp_path / f"{name}.parquet")
    id_args = ["--id-column=id"] if suffix == ".parquet" else []
    peaks = []
    for name in ("small", "big"):
        summary = tmp_path / f"{name}.json"
        batch(
            model,
            tmp_path / f"{name}{suffix}",
            tmp_path / f"{name}-out.parquet",
            "--memory-budget-mb=8",
            *id_args,
            "--outputs=label",
            "--summary-json",
            summary,
        )
        stats = json.loads(summary.read_text())
        assert stats["chunk_rows"] < 2_000
        peaks.append(stats["peak_memory_bytes"])
    # Reading the big file whole (or keeping its mapped pages) would add 51 MiB.
    assert peaks[1] - peaks[0] < 25 * 2**20, peaks
    result = pq.read_table(tmp_path / "big-out.parquet")
    ids = big.column("id").to_pylist() if suffix == ".parquet" else list(range(len(big_x)))
    assert result.column("id" if suffix == ".parquet" else "row").to_pylist() == ids
    assert np.array_equal(result.column("label").to_numpy(), expected(model, big_x)[0])


def test_resume_after_a_kill_neither_redoes_nor_duplicates_chunks(tmp_path: Path, model: Path) -> None:
    x, table = features(100_000)
    write_input(table, tmp_path / "in.parquet")
    out, parts = tmp_path / "out.parquet", tmp_path / "out.parquet.partial"
    args = (model, tmp_path / "in.parquet", out, "--memory-budget-mb=2", "--batch-size=64", "--id-column=id")
    process = start_batch(*args)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.parquet"))) < 3 and process.poll() is None:
        assert time.monotonic() < deadline, "no chunk finished"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    finished = len(list(parts.glob("part-*.parquet")))

    refused = batch(*args, check=2)
    assert "pass --resume" in refused.stderr
    summary = tmp_path / "summary.json"
    batch(*args, "--resume", "--summary-json", summary)

    stats = json.loads(summary.read_text())
    assert stats["resumed_rows"] >= finished * stats["chunk_rows"]
    assert stats["rows"] + stats["resumed_rows"] == 100_000
    result = pq.read_table(out)
    assert result.column("id").to_pylist() == table.column("id").to_pylist()
    assert np.array_equal(result.column("label").to_numpy(), expected(model, x)[0])
    assert not parts.exists()


REFUSES_NEGATIVE = """
def load(self):
    pass

def predict(self, inputs):
    x = inputs["x"]
    if (x < 0).any():
        raise ValueError("negative values")
    return {"y": x * 2}
"""


def refusing_model(tmp_path: Path) -> Path:
    """A Python model that doubles its FP32 [-1, 2] input ``x`` and refuses a batch holding a
    negative value; its base folder."""
    base = tmp_path / "checked"
    write_python_model(base / "1", REFUSES_NEGATIVE)
    return base


def test_rows_the_model_refuses_are_rejected_and_the_rest_of_their_batch_scored(tmp_path: Path) -> None:
    base = refusing_model(tmp_path)
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    x[[3, 64, 97]] *= -1
    np.save(tmp_path / "in.npy", x)

    done = batch(base, tmp_path / "in.npy", tmp_path / "out.npy", "--batch-size=16", check=1)
    assert "97 rows scored, 3 rejected" in done.stderr
    good = [i for i in range(100) if i not in (3, 64, 97)]
    assert np.array_equal(np.load(tmp_path / "out.npy"), x[good] * 2)
    rejects = [json.loads(line) for line in (tmp_path / "out.npy.rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [3, 64, 97]
    assert "model.py rejected the input: ValueError: negative values" in rejects[0]["error"]


def test_a_clean_rerun_leaves_no_rejects_file_of_the_run_before(tmp_path: Path) -> None:
    # The rejects file was only written when there were rejects: one left by an earlier run stayed
    # beside the new output, naming as rejected a row that the output now holds.
    base = refusing_model(tmp_path)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    x[1] *= -1
    np.save(tmp_path / "in.npy", x)
    out, rejects = tmp_path / "out.parquet", tmp_path / "out.parquet.rejects.jsonl"
    batch(base, tmp_path / "in.npy", out, check=1)
    assert [json.loads(line)["row"] for line in rejects.read_text().splitlines()] == [1]

    np.save(tmp_path / "in.npy", np.abs(x))
    done = batch(base, tmp_path / "in.npy", out)
    assert "4 rows scored, 0 rejected" in done.stderr
    assert pq.read_table(out).column("row").to_pylist() == [0, 1, 2, 3]
    assert not rejects.exists()


def test_an_unknown_signature_or_output_fails_before_any_work(tmp_path: Path, model: Path) -> None:
    np.save(tmp_path / "in.npy", digits()[0][:4].astype(np.float32))
    done = batch(model, tmp_path / "in.npy", tmp_path / "out.parquet", "--signature=nope", check=2)
    assert "--signature: the model has no signature 'nope'; it has ['serving_default']" in done.stderr
    done = batch(model, tmp_path / "in.npy", tmp_path / "out.parquet", "--outputs=nope", check=2)
    assert "--outputs: signature 'serving_default' has no output(s) ['nope']" in done.stderr
    assert not (tmp_path / "out.parquet.partial").exists()


# --- failures end the job: a clear message, a non-zero exit, never a hang ------------------------
# Each run below has the subprocess timeout of ``batch`` (and this test's pytest timeout) as a
# bound: before these fixes, the wrong-shape and all-rows-refused runs waited forever.


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("shape", "got"), [((1797, 8, 8), "[1797, 8, 8]"), ((1797, 63), "[1797, 63]")])
def test_an_npy_of_the_wrong_shape_exits_2_at_once_naming_both_shapes(
    tmp_path: Path, model: Path, shape: tuple[int, ...], got: str
) -> None:
    x = digits()[0].astype(np.float32)
    np.save(tmp_path / "x.npy", x.reshape(shape) if len(shape) == 3 else x[:, :63])
    for out in (tmp_path / "out.npy", tmp_path / "out.parquet"):
        done = batch(model, tmp_path / "x.npy", out, "--outputs=label", check=2)
        assert f"x.npy: input 'X': expected FP32 [-1, 64], got FP32 {got}" in done.stderr
        assert "Traceback" not in done.stderr
        assert not out.exists()
        assert not out.with_name(out.name + ".partial").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", [".npy", ".parquet", ".csv", ".jsonl"])
def test_chunks_whose_every_row_is_refused_leave_the_others_scored(tmp_path: Path, suffix: str) -> None:
    base = refusing_model(tmp_path)
    x = np.arange(96, dtype=np.float32).reshape(48, 2)
    x[:16] *= -1  # the whole first chunk, and the last one
    x[40:] *= -1
    np.save(tmp_path / "in.npy", x)
    out = tmp_path / f"out{suffix}"
    # --memory-budget-mb this small makes chunks of one batch: 16 rows.
    done = batch(base, tmp_path / "in.npy", out, "--batch-size=16", "--memory-budget-mb=0.001", check=1)
    assert "24 rows scored, 24 rejected" in done.stderr
    good = list(range(16, 40))
    if suffix == ".npy":
        assert np.array_equal(np.load(out), x[good] * 2)
    else:
        result = read_output(out)
        assert result.column("row").to_pylist() == good
        y = (
            np.stack([result.column(f"y_{i}").to_numpy() for i in range(2)], axis=1)
            if suffix == ".csv"
            else np.array(result.column("y").to_pylist())
        )
        assert np.array_equal(y, x[good] * 2)


def test_a_chunk_of_only_refused_rows_gives_an_empty_output(tmp_path: Path) -> None:
    base = refusing_model(tmp_path)
    np.save(tmp_path / "in.npy", -np.ones((5, 2), dtype=np.float32))
    batch(base, tmp_path / "in.npy", tmp_path / "out.npy", check=1)
    assert np.load(tmp_path / "out.npy").shape == (0, 2)


FAILS_ON_13 = """
def load(self):
    pass

def predict(self, inputs):
    x = inputs["x"]
    if (x == 13).any():
        raise {error}
    return {{"y": x * 2}}
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("error", "said"),
    [
        ('RuntimeError("the model broke")', "RuntimeError: the model broke"),
        ("StopIteration", "StopIteration"),  # asyncio drops it: the job used to wait forever
    ],
)
def test_the_model_failing_mid_job_ends_it_with_exit_2(tmp_path: Path, error: str, said: str) -> None:
    base = tmp_path / "fails"
    write_python_model(base / "1", FAILS_ON_13.format(error=error))
    x = np.arange(200, dtype=np.float32).reshape(100, 2) + 20
    x[60, 1] = 13  # in the fourth chunk of 16 rows
    np.save(tmp_path / "in.npy", x)
    out = tmp_path / "out.parquet"
    args = (base, tmp_path / "in.npy", out, "--batch-size=16", "--memory-budget-mb=0.001", "--threads=1")
    done = batch(*args, check=2)
    assert "inferd batch: scoring chunk 3 (" in done.stderr, done.stderr
    assert said in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    # The chunks finished before the failure are kept; --resume finishes the job once the
    # cause is gone, and rescores only what was not done.
    assert "run again with --resume to continue" in done.stderr
    x[60, 1] = 14
    np.save(tmp_path / "in.npy", x)
    summary = tmp_path / "summary.json"
    batch(*args, "--resume", "--summary-json", summary)
    assert json.loads(summary.read_text())["resumed_rows"] > 0
    assert pq.read_table(out).column("row").to_pylist() == list(range(100))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_a_model_returning_fewer_rows_than_its_batch_ends_the_job(tmp_path: Path, suffix: str) -> None:
    # An .npy output took whatever rows came back: 7 rows for 10 inputs, exit 0, "10 rows scored".
    base = tmp_path / "short"
    write_python_model(
        base / "1",
        'def load(self):\n    pass\n\ndef predict(self, inputs):\n    return {"y": inputs["x"][1:]}',
    )
    np.save(tmp_path / "in.npy", np.arange(20, dtype=np.float32).reshape(10, 2))
    out = tmp_path / f"out{suffix}"
    done = batch(base, tmp_path / "in.npy", out, "--batch-size=4", check=2)
    assert "inferd batch: the model's output 'y' has (3,) rows for a batch of 4" in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.timeout(120)
def test_a_failure_before_any_chunk_is_done_never_blocks_the_next_run(tmp_path: Path) -> None:
    base = tmp_path / "fails"
    write_python_model(base / "1", FAILS_ON_13.format(error='RuntimeError("the model broke")'))
    x = np.arange(40, dtype=np.float32).reshape(20, 2)  # holds 13: the one chunk fails
    np.save(tmp_path / "in.npy", x)
    out = tmp_path / "out.jsonl"
    done = batch(base, tmp_path / "in.npy", out, check=2)
    assert "RuntimeError: the model broke; nothing was written" in done.stderr
    assert not out.with_name(out.name + ".partial").exists()
    np.save(tmp_path / "in.npy", x + 100)
    batch(base, tmp_path / "in.npy", out)  # no --resume needed, nothing refused
    assert len(read_output(out)) == 20
    # A parts folder left by a run killed before its first chunk holds no part: it is replaced.
    (out.with_name(out.name + ".partial")).mkdir()
    (out.with_name(out.name + ".partial") / "job.json").write_text("{}")
    batch(base, tmp_path / "in.npy", out)


UNWRITABLE = """
def load(self):
    pass

def predict(self, inputs):
    y = np.empty(len(inputs["x"]), dtype=object)
    y[:] = [object()] * len(y)  # no output format can hold a bare object
    return {"y": y}
"""


@pytest.mark.timeout(120)
def test_the_writer_failing_ends_the_job_with_exit_2(tmp_path: Path) -> None:
    base = tmp_path / "unwritable"
    signature = (
        '{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}], '
        '"outputs": [{"name": "y", "dtype": "string", "shape": [-1]}]}'
    )
    write_python_model(base / "1", UNWRITABLE, signature)
    np.save(tmp_path / "in.npy", np.ones((10, 2), dtype=np.float32))
    out = tmp_path / "out.parquet"
    done = batch(base, tmp_path / "in.npy", out, check=2)
    assert "inferd batch: writing chunk 0 (rows from 0) failed: Arrow" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()


@pytest.mark.timeout(120)
def test_the_reader_failing_mid_job_names_the_file_and_exits_2(tmp_path: Path, model: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _, table = features(300)
    pq.write_table(table, folder / "1.parquet")
    pq.write_table(table, folder / "2.parquet", compression="none")
    data = bytearray((folder / "2.parquet").read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4 : len(data) - footer] = b"\xff" * (len(data) - footer - 4)  # the pages, not the footer
    (folder / "2.parquet").write_bytes(bytes(data))
    out = tmp_path / "out.parquet"
    done = batch(model, folder, out, "--id-column=id", check=2)
    assert "2.parquet: cannot be read: " in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


# --- Parquet tensors: nested and fixed-size list columns ------------------------------------------


def write_image_total_model(version_dir: Path) -> None:
    """``total`` = the sum of an FP32 [-1, 8, 8, 1] image."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 8, 8, 1])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
    node = helper.make_node("ReduceSum", ["image", "axes"], ["total"], keepdims=0)
    graph = helper.make_graph([node], "total", [image], [total], [axes])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    version_dir.mkdir(parents=True)
    onnx.save(proto, version_dir / "model.onnx")


def image_columns(images: np.ndarray) -> dict[str, pa.Array]:
    """The same [-1, 8, 8, 1] images stored four ways."""
    flat = pa.array(images.reshape(-1))
    fixed = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, 1), 8), 8
    )
    return {
        "nested": pa.array(images.tolist()),  # list<list<list<float>>>
        "fixed": fixed,  # fixed_size_list<fixed_size_list<fixed_size_list<float, 1>, 8>, 8>
        "rows_of_64": pa.array(images.reshape(len(images), 64).tolist()),  # one flat list per row
        "rows_8x8": pa.array(images.reshape(len(images), 8, 8).tolist()),  # the last 1 left out
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("storage", ["nested", "fixed", "rows_of_64", "rows_8x8"])
def test_nested_and_fixed_size_list_columns_are_read_as_tensors(tmp_path: Path, storage: str) -> None:
    base = tmp_path / "total"
    write_image_total_model(base / "1")
    images = (digits()[0][:300].reshape(-1, 8, 8, 1) / 16).astype(np.float32)
    column = image_columns(images)[storage]
    pq.write_table(pa.table({"id": np.arange(300), "image": column}), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    batch(base, tmp_path / "in.parquet", out, "--id-column=id", "--memory-budget-mb=0.01", "--batch-size=32")
    result = pq.read_table(out)
    assert result.column("id").to_pylist() == list(range(300))
    assert np.allclose(result.column("total").to_numpy(), images.reshape(300, -1).sum(axis=1), rtol=1e-5)


@pytest.mark.timeout(120)
def test_nested_rows_of_the_wrong_size_are_rejected_and_the_others_scored(tmp_path: Path) -> None:
    base = tmp_path / "total"
    write_image_total_model(base / "1")
    images = np.ones((6, 8, 8, 1), dtype=np.float32).tolist()
    images[1] = images[1][:7]  # 7 rows of pixels
    images[3][2] = images[3][2][:5]  # a row of 5 pixels
    images[4][0][0] = [None]  # a missing pixel
    images[5] = None  # a missing image
    pq.write_table(pa.table({"image": images}), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    batch(base, tmp_path / "in.parquet", out, check=1)
    assert pq.read_table(out).column("row").to_pylist() == [0, 2]
    rejects = [json.loads(line) for line in (tmp_path / "out.parquet.rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [1, 3, 4, 5]
    assert all("column 'image'" in r["error"] for r in rejects), rejects


def test_no_price_no_cost_and_no_unloading_lines(tmp_path: Path, model: Path) -> None:
    np.save(tmp_path / "in.npy", digits()[0][:10].astype(np.float32))
    done = batch(model, tmp_path / "in.npy", tmp_path / "out.parquet")
    assert "cost" not in done.stderr
    assert "unloading" not in done.stderr
    assert "unloaded" not in done.stderr
    done = batch(model, tmp_path / "in.npy", tmp_path / "out2.parquet", "--price-per-hour=0.4")
    assert "at the given price per hour" in done.stderr


def test_a_missing_model_says_what_was_looked_for_and_what_is_there(tmp_path: Path, model: Path) -> None:
    np.save(tmp_path / "in.npy", digits()[0][:10].astype(np.float32))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "model.onnx").write_bytes((model / "1" / "model.onnx").read_bytes())
    done = batch(flat, tmp_path / "in.npy", tmp_path / "out.parquet", check=2)
    assert f"no model at {flat}: looked for a numbered version folder inside it" in done.stderr
    assert f"it holds model.onnx: put the model files in {flat}/1/" in done.stderr
    done = batch(model, tmp_path / "in.npy", tmp_path / "out.parquet", "--version=7", check=2)
    assert f"{model} has no version 7; its versions are [1]" in done.stderr
    done = batch(model.parent, tmp_path / "in.npy", tmp_path / "out.parquet", "--model=digit", check=2)
    assert "does not exist" in done.stderr
    assert "holds ['digits']" in done.stderr
