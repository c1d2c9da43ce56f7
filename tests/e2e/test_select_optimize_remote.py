"""``inferd select`` and ``inferd optimize`` naming models, data and outputs in a real
S3-compatible server (moto), with TF Serving's S3 variables in the environment."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_optimize import optimize
from tests.e2e.test_select import _select, _validation_csv
from tests.models import write_onnx_digits
from tests.s3_server import S3Server, s3_server

__all__ = ["s3_server"]


def test_select_measures_candidates_and_data_in_s3(s3_server: S3Server, tmp_path: Path) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="bucket")
    write_onnx_digits(tmp_path / "models" / "logreg" / "1")
    s3_server.upload_folder(tmp_path / "models", "bucket", "models")
    client.upload_file(str(_validation_csv(tmp_path / "validation.csv")), "bucket", "data/validation.csv")
    report = tmp_path / "report.json"

    done = _select(
        "s3://bucket/models/logreg",
        "--data",
        "s3://bucket/data/validation.csv",
        "--label",
        "digit",
        "--optimize",
        "accuracy",
        "--json",
        report,
    )

    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_bytes())
    assert result["winner"] == "logreg"
    assert result["candidates"][0]["metrics"]["accuracy"] > 0.5


def test_optimize_reads_the_model_from_s3_and_writes_the_variants_there(
    s3_server: S3Server, tmp_path: Path
) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="bucket")
    write_onnx_digits(tmp_path / "digits" / "1")
    s3_server.upload_folder(tmp_path / "digits", "bucket", "models/digits")

    done = optimize(
        "s3://bucket/models/digits", "--out", "s3://bucket/variants/digits", "--only", "onnx-optimized"
    )

    assert done.returncode == 0, done.stderr
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="bucket", Prefix="variants/")["Contents"]}
    assert {"variants/digits/variants.json", "variants/digits/onnx-optimized/model.onnx"} <= keys
    listed = json.loads(
        client.get_object(Bucket="bucket", Key="variants/digits/variants.json")["Body"].read()
    )
    assert [v["name"] for v in listed if v["ok"]] == ["onnx-optimized"]


def test_a_bad_uri_scheme_is_refused_naming_the_argument(tmp_path: Path) -> None:
    done = optimize("ftp://host/models/digits", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "expected a folder or a URI of scheme file" in done.stderr
