"""Models in an object store, against a real S3-compatible server (moto's server mode) named as
TensorFlow Serving names it: ``--model_base_path=s3://bucket/models/digits`` with ``S3_ENDPOINT``,
``S3_USE_HTTPS`` and the ``AWS_*`` variables in the environment.

A new version is uploaded object by object, with polls in between, and is never served
half-written; deleting it rolls back; a stopped store is logged once while what is loaded keeps
serving, and the server recovers when the store is back; a restarted server takes its versions
from the model cache instead of downloading them again. Also: a vanished bucket, a repository
URI, and refused credentials fixed while the server runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess
from tests.e2e.test_metrics import samples
from tests.models import write_onnx_affine, write_onnx_affine_external
from tests.s3_server import S3Server, s3_server, s3_server_with_auth

__all__ = ["s3_server", "s3_server_with_auth"]

BASE = "s3://bucket/models/digits"


def answer(server: ServerProcess, version: int | None = None) -> float:
    """The first output for an input of ones: the serving version's scale."""
    path = "digits" if version is None else f"digits/versions/{version}"
    response = requests.post(
        f"{server.url}/v1/models/{path}:predict", json={"instances": [[1, 1, 1, 1]]}, timeout=10
    )
    assert response.status_code == 200, response.text
    return float(response.json()["predictions"][0][0])


def wait_for_listings(s3: S3Server, server: ServerProcess, count: int) -> None:
    """Wait until the server has listed the store ``count`` more times."""
    start = s3.lists()
    server.wait_for(lambda: s3.lists() >= start + count, f"{count} more listings of the store")


def serve_digits(
    s3: S3Server, tmp_path: Path, start_server: Callable[..., ServerProcess], cache: Path
) -> ServerProcess:
    """Version 1 of ``digits`` (scale 2) uploaded to a new bucket at ``BASE``, and a server started
    on it with its model cache in ``cache``, answering with version 1."""
    s3.client().create_bucket(Bucket="bucket")
    write_onnx_affine(tmp_path / "digits" / "1", scale=2.0)
    s3.upload_folder(tmp_path / "digits", "bucket", "models/digits")
    server = start_server(*digits_args(cache))
    assert answer(server) == 2.0
    return server


def digits_args(cache: Path) -> tuple[str, ...]:
    return ("--model_name=digits", f"--model_base_path={BASE}", f"--model_cache_dir={cache}")


@pytest.mark.timeout(300)
def test_serve_from_s3_add_a_version_slowly_roll_back_survive_the_store_stopping_and_restart_from_cache(
    s3_server: S3Server, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    s3 = s3_server
    client = s3.client()
    cache = tmp_path / "cache"
    server = serve_digits(s3, tmp_path, start_server, cache)
    assert s3.gets("/models/digits/1/model.onnx") == 1

    # Version 2, two objects uploaded one at a time, the server polling in between: the first
    # object alone, even once its listing is stable, is never served.
    write_onnx_affine_external(tmp_path / "digits" / "2", scale=3.0)
    client.upload_file(str(tmp_path / "digits" / "2" / "model.onnx"), "bucket", "models/digits/2/model.onnx")
    wait_for_listings(s3, server, 4)
    assert answer(server) == 2.0
    assert server.status("digits").get("2") != "AVAILABLE"
    client.upload_file(
        str(tmp_path / "digits" / "2" / "weights.bin"), "bucket", "models/digits/2/weights.bin"
    )
    server.wait_for(lambda: answer(server) == 3.0, "version 2 once complete")
    assert server.status("digits") == {"2": "AVAILABLE", "1": "END"}

    # Roll back by deleting version 2: version 1 comes back from the cache, not the store.
    client.delete_objects(
        Bucket="bucket",
        Delete={"Objects": [{"Key": "models/digits/2/model.onnx"}, {"Key": "models/digits/2/weights.bin"}]},
    )
    server.wait_for(lambda: server.status("digits") == {"1": "AVAILABLE", "2": "END"}, "the roll back")
    assert answer(server) == 2.0
    assert s3.gets("/models/digits/1/model.onnx") == 1

    # The store stops: logged once, version 1 keeps serving; back, with its content, the
    # server recovers by itself and picks up a new version.
    s3.stop()
    server.wait_for(
        lambda: "model digits: cannot list s3://bucket/models/digits" in server.log(), "the fault"
    )
    for _ in range(20):
        assert answer(server) == 2.0
    s3.start()
    client = s3.client()
    client.create_bucket(Bucket="bucket")
    s3.upload_folder(tmp_path / "digits", "bucket", "models/digits")  # versions 1 and 2
    server.wait_for(lambda: "model digits: its folder can be read again" in server.log(), "recovery")
    server.wait_for(lambda: answer(server) == 3.0, "version 2 after the store came back")
    assert server.log().count("Could not connect to the endpoint URL") == 1  # logged once

    # A restarted server finds version 2 in its cache (verified against the listing by the
    # manifest) and downloads nothing.
    downloads = s3.gets("/models/digits/2/")
    assert downloads > 0
    server.stop()
    restarted = start_server(*digits_args(cache))
    assert answer(restarted) == 3.0
    assert s3.gets("/models/digits/2/") == downloads
    assert "downloaded" not in restarted.log()


def test_a_bucket_that_vanishes_keeps_serving_and_recovers(
    s3_server: S3Server, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    s3 = s3_server
    client = s3.client()
    server = serve_digits(s3, tmp_path, start_server, tmp_path / "c")
    client.delete_object(Bucket="bucket", Key="models/digits/1/model.onnx")
    client.delete_bucket(Bucket="bucket")
    server.wait_for(lambda: "The specified bucket does not exist" in server.log(), "the fault")
    assert answer(server) == 2.0
    client.create_bucket(Bucket="bucket")
    write_onnx_affine(tmp_path / "digits" / "2", scale=5.0)
    s3.upload_folder(tmp_path / "digits" / "2", "bucket", "models/digits/2")
    # Version 1 is gone from the store, so it is unloaded; version 2 is loaded.
    server.wait_for(
        lambda: server.status("digits").get("2") == "AVAILABLE", "version 2 once the bucket is back"
    )
    assert answer(server) == 5.0


def test_a_repository_in_s3_serves_every_model_under_it_and_picks_up_new_ones(
    s3_server: S3Server, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="bucket")
    write_onnx_affine(tmp_path / "models" / "digits" / "1", scale=2.0)
    s3_server.upload_folder(tmp_path / "models", "bucket", "models")
    server = start_server("s3://bucket/models", f"--model_cache_dir={tmp_path / 'c'}")
    assert answer(server) == 2.0
    write_onnx_affine(tmp_path / "more" / "churn" / "1", scale=7.0)
    s3_server.upload_folder(tmp_path / "more", "bucket", "models")
    server.wait_for(lambda: server.status("churn").get("1") == "AVAILABLE", "the new model")


def test_refused_credentials_keep_serving_and_a_fixed_credentials_file_recovers_without_restart(
    s3_server_with_auth: S3Server,
    tmp_path: Path,
    start_server: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3 = s3_server_with_auth
    credentials = tmp_path / "credentials"

    def write_credentials(key_id: str, secret: str) -> None:
        credentials.write_text(f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")

    write_credentials(*s3.key)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    server = serve_digits(s3, tmp_path, start_server, tmp_path / "c")

    # The key loses its permissions, and the credentials file is overwritten with a key the
    # store does not know: both are logged, version 1 keeps serving.
    write_credentials("AKIAWRONGWRONGWRONG1", "wrong")
    s3.deny_all()
    server.wait_for(lambda: "AccessDenied" in server.log() or "Access Denied" in server.log(), "the refusal")
    server.wait_for(lambda: "does not exist in our records" in server.log(), "the unknown key")
    assert answer(server) == 2.0

    # The right key back in the file, and its permissions: the server recovers by itself.
    write_credentials(*s3.key)
    s3.allow_all()
    server.wait_for(lambda: "model digits: its folder can be read again" in server.log(), "recovery")
    write_onnx_affine(tmp_path / "digits" / "2", scale=3.0)
    s3.upload_folder(tmp_path / "digits" / "2", "bucket", "models/digits/2")
    server.wait_for(lambda: answer(server) == 3.0, "a new version after the credentials were fixed")
    assert server.log().count("does not exist in our records") == 1  # each fault logged once


@pytest.mark.timeout(300)
def test_workers_sharing_the_model_cache_download_a_version_once(
    s3_server: S3Server, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Each ``--workers`` process downloaded every version into the shared cache folder, the later
    one deleting the folder the earlier one had just put in place (and might be loading from)."""
    s3 = s3_server
    s3.client().create_bucket(Bucket="bucket")
    write_onnx_affine(tmp_path / "digits" / "1", scale=2.0)
    (tmp_path / "digits" / "1" / "extra.bin").write_bytes(bytes(60_000_000))  # a download that takes a while
    s3.upload_folder(tmp_path / "digits", "bucket", "models/digits")
    server = start_server(*digits_args(tmp_path / "cache"), "--workers=2")
    server.wait_for(lambda: samples(server)[("inferd_workers_scraped", frozenset())] == 2, "both workers")
    assert {answer(server) for _ in range(20)} == {2.0}
    assert s3.gets("/models/digits/1/extra.bin") == 1
    assert server.log().count("downloaded s3://bucket/models/digits/1") == 1
