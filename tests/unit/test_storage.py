"""Models in an object store, planned by ``Repository`` against a real S3-compatible server
(moto): the stability rule (two polls agree before a version is downloaded), the check that a
version did not change while it was downloaded, a download that cannot be had leaving the
policy to choose among the rest, and how locations are named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from inferd.config import ServerConfig, model_location
from inferd.errors import ConfigError
from inferd.repository import Repository
from inferd.storage import StorageError, s3_options
from tests.models import write_onnx_affine
from tests.s3_server import S3Server, s3_server

__all__ = ["s3_server"]


def repository(tmp_path: Path, cache_bytes: int = 0) -> Repository:
    return Repository(
        ServerConfig(
            model_name="m",
            model_base_path="s3://bucket/models/m",
            file_system_poll_wait_seconds=1.0,
            model_cache_dir=str(tmp_path / "cache"),
            model_cache_bytes=cache_bytes,
        )
    )


@pytest.fixture
def store(s3_server: S3Server, tmp_path: Path) -> S3Server:
    s3_server.client().create_bucket(Bucket="bucket")
    write_onnx_affine(tmp_path / "m" / "1", scale=2.0)
    s3_server.upload_folder(tmp_path / "m", "bucket", "models/m")
    return s3_server


def test_a_version_is_downloaded_only_once_two_listings_agree(store: S3Server, tmp_path: Path) -> None:
    repo = repository(tmp_path)
    [plan] = repo.scan()
    assert plan.aspired == {}
    assert store.gets("/models/m/1/model.onnx") == 0  # listed, not downloaded
    store.client().put_object(Bucket="bucket", Key="models/m/2/model.onnx", Body=b"partial")
    [plan] = repo.scan()
    assert list(plan.aspired) == [1]  # 2 is new: not stable yet, so latest-1 picks 1
    local = plan.aspired[1].path
    assert (local / "model.onnx").read_bytes() == (tmp_path / "m" / "1" / "model.onnx").read_bytes()
    store.client().put_object(Bucket="bucket", Key="models/m/2/more.bin", Body=b"more")
    [plan] = repo.scan()
    assert list(plan.aspired) == [1]  # 2 changed again
    [plan] = repo.scan()
    assert list(plan.aspired) == [2]
    assert sorted(p.name for p in plan.aspired[2].path.iterdir()) == ["model.onnx", "more.bin"]


def test_a_version_that_changes_while_it_is_downloaded_is_not_cached(store: S3Server, tmp_path: Path) -> None:
    repo = repository(tmp_path)
    repo.scan()
    storage = repo._storage(repo.model_configs()[0])
    listed = storage.versions()[1]
    store.client().put_object(Bucket="bucket", Key="models/m/1/extra.bin", Body=b"late")
    with pytest.raises(StorageError, match="changed while it was downloaded"):
        storage.fetch(listed)
    assert not storage.verified(listed)
    [plan] = repo.scan()
    assert plan.aspired == {}  # the new listing must be stable first
    [plan] = repo.scan()
    assert sorted(p.name for p in plan.aspired[1].path.iterdir()) == ["extra.bin", "model.onnx"]


def test_a_version_that_cannot_be_fetched_leaves_the_policy_to_the_rest(
    store: S3Server, tmp_path: Path
) -> None:
    size = (tmp_path / "m" / "1" / "model.onnx").stat().st_size
    repo = repository(tmp_path, cache_bytes=size + 10)
    repo.scan()
    [plan] = repo.scan()
    assert list(plan.aspired) == [1]
    store.client().put_object(Bucket="bucket", Key="models/m/2/model.onnx", Body=b"x" * (size + 100))
    repo.scan()
    [plan] = repo.scan()  # 2 is stable but does not fit beside 1, which serves
    assert list(plan.aspired) == [1]


def test_a_restarted_repository_takes_verified_versions_from_the_cache_at_once(
    store: S3Server, tmp_path: Path
) -> None:
    repo = repository(tmp_path)
    repo.scan()
    repo.scan()
    [plan] = repository(tmp_path).scan()  # a new process: its first scan
    assert list(plan.aspired) == [1]
    assert store.gets("/models/m/1/model.onnx") == 1


def test_locations() -> None:
    assert model_location("/srv/models/m") == Path("/srv/models/m")
    assert model_location("file:///srv/models/m") == Path("/srv/models/m")
    assert model_location("s3://bucket/models/m/") == "s3://bucket/models/m"
    assert model_location("gs://bucket/m") == "gs://bucket/m"
    with pytest.raises(ConfigError, match="expected a folder or a URI of scheme file, abfs"):
        model_location("ftp://host/m")


def test_tf_servings_s3_variables_configure_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_ENDPOINT", "minio.local:9000")
    monkeypatch.setenv("S3_USE_HTTPS", "0")
    monkeypatch.setenv("S3_VERIFY_SSL", "0")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    client = s3_options()["client_kwargs"]
    assert client == {"endpoint_url": "http://minio.local:9000", "region_name": "eu-west-1", "verify": False}
    monkeypatch.setenv("S3_USE_HTTPS", "1")
    monkeypatch.delenv("S3_VERIFY_SSL")
    assert s3_options()["client_kwargs"]["endpoint_url"] == "https://minio.local:9000"
    assert "verify" not in s3_options()["client_kwargs"]
    monkeypatch.setenv("S3_ENDPOINT", "https://s3.example.com")
    assert s3_options()["client_kwargs"]["endpoint_url"] == "https://s3.example.com"
    for name in ("S3_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert s3_options()["client_kwargs"] == {}  # botocore reads AWS_ENDPOINT_URL and the rest itself


def test_inferd_toml_beside_the_versions_is_read_and_followed_when_it_changes(
    store: S3Server, tmp_path: Path
) -> None:
    client = store.client()
    client.put_object(Bucket="bucket", Key="models/m/2/model.onnx", Body=b"two")
    client.put_object(Bucket="bucket", Key="models/m/inferd.toml", Body=b"version_policy = { all = true }\n")
    repo = repository(tmp_path)
    repo.scan()
    [plan] = repo.scan()
    assert sorted(plan.aspired) == [1, 2]
    client.put_object(
        Bucket="bucket", Key="models/m/inferd.toml", Body=b"version_policy = { specific = [1] }\n"
    )
    [plan] = repo.scan()
    assert sorted(plan.aspired) == [1]
    client.delete_object(Bucket="bucket", Key="models/m/inferd.toml")
    [plan] = repo.scan()
    assert sorted(plan.aspired) == [2]  # the default: latest 1


def test_a_store_whose_filesystem_is_not_installed_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # importing it fails, as where it is not installed
    repo = Repository(
        ServerConfig(model_name="m", model_base_path="gs://bucket/m", model_cache_dir=str(tmp_path))
    )
    with pytest.raises(ConfigError, match=r"pip install 'inferd\[gcs\]'"):
        repo.scan()


def test_a_remote_version_name_past_int64_is_ignored(store: S3Server, tmp_path: Path) -> None:
    store.client().put_object(Bucket="bucket", Key=f"models/m/{2**63}/model.onnx", Body=b"x")
    repo = repository(tmp_path)
    repo.scan()
    [plan] = repo.scan()
    assert list(plan.aspired) == [1]


def test_folder_markers_made_by_consoles_are_not_files_of_the_version(
    store: S3Server, tmp_path: Path
) -> None:
    for key in ("models/m/", "models/m/1/", "models/m/1/sub/"):
        store.client().put_object(Bucket="bucket", Key=key, Body=b"")
    store.client().put_object(Bucket="bucket", Key="models/m/1/sub/x.bin", Body=b"x")
    repo = repository(tmp_path)
    repo.scan()
    [plan] = repo.scan()
    assert (plan.aspired[1].path / "sub" / "x.bin").read_bytes() == b"x"
    assert (plan.aspired[1].path / "model.onnx").is_file()


@pytest.mark.parametrize("rest", ["../../../../../../escaped", "/escaped"])
def test_an_object_key_that_leaves_the_version_folder_is_refused_and_nothing_is_written(
    store: S3Server, tmp_path: Path, rest: str
) -> None:
    inside = tmp_path / "cache" / "a" / "b" / "c"
    if rest == "/escaped":
        rest = f"/{tmp_path}/escaped"  # an absolute path once joined
    store.client().put_object(Bucket="bucket", Key="models/m/2/model.onnx", Body=b"x")
    store.client().put_object(Bucket="bucket", Key=f"models/m/2/{rest}", Body=b"evil")
    repo = Repository(
        ServerConfig(
            model_name="m",
            model_base_path="s3://bucket/models/m",
            file_system_poll_wait_seconds=1.0,
            model_cache_dir=str(inside),
        )
    )
    repo.scan()
    [plan] = repo.scan()
    assert list(plan.aspired) == [1]  # 2 cannot be copied whole: 1 serves
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"evil"]
    assert written == []
    assert store.gets("/models/m/2/") == 0
