"""``inferd batch`` reading its model and a Parquet input from a real S3-compatible server (moto)
and writing its output there, with TF Serving's S3 variables in the environment."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tests.e2e.test_batch import batch, expected, features
from tests.models import write_onnx_affine, write_onnx_digits
from tests.s3_server import S3Server, s3_server

__all__ = ["s3_server"]


def test_batch_reads_the_model_and_a_parquet_input_from_s3_and_writes_the_output_there(
    s3_server: S3Server, tmp_path: Path
) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="bucket")
    write_onnx_affine(tmp_path / "digits" / "1", scale=2.0)  # an older version, never fetched
    write_onnx_digits(tmp_path / "digits" / "2")
    s3_server.upload_folder(tmp_path / "digits", "bucket", "models/digits")
    x, table = features()
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=500)
    client.upload_file(str(tmp_path / "in.parquet"), "bucket", "inputs/in.parquet")

    batch(
        "s3://bucket/models/digits",
        "s3://bucket/inputs/in.parquet",
        "s3://bucket/out/scores.parquet",
        "--id-column=id",
    )

    body = client.get_object(Bucket="bucket", Key="out/scores.parquet")["Body"].read()
    result = pq.read_table(io.BytesIO(body))
    label, _ = _expected(tmp_path, x)
    assert result.column("id").to_pylist() == table.column("id").to_pylist()
    assert np.array_equal(result.column("label").to_numpy(), label)
    assert s3_server.gets("/models/digits/1/") == 0
    assert s3_server.gets("/models/digits/2/model.onnx") == 1


def _expected(tmp_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's answer for version 2, which ``expected`` reads as ``<base>/1/model.onnx``."""
    write_onnx_digits(tmp_path / "reference" / "1")
    return expected(tmp_path / "reference", x)


def test_batch_names_the_argument_whose_store_cannot_be_read(s3_server: S3Server, tmp_path: Path) -> None:
    s3_server.client().create_bucket(Bucket="bucket")
    done = batch("s3://bucket/models/none", tmp_path / "in.parquet", tmp_path / "out.parquet", check=2)
    assert "MODEL: nothing found under s3://bucket/models/none" in done.stderr
    assert not (tmp_path / "out.parquet").exists()
