"""A real S3-compatible server (moto's server mode) on a free port, which tests can stop and
start again, and whose request log tells which objects were downloaded.

moto keeps its buckets in memory: a restarted server is empty, so ``start`` after ``stop``
gives a store that the test fills again (as a store restored from its backup would be).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import requests

from tests.conftest import free_port

UNKNOWN_KEY = ("AKIAIOSFODNN7EXAMPLE", "testing")  # what moto admits before it checks keys
_SETUP_ACTIONS = 40  # unauthenticated requests moto allows when started with auth
_ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


class S3Server:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "moto.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.key = UNKNOWN_KEY
        self._admin_key = UNKNOWN_KEY

    def env(self) -> dict[str, str]:
        """TF Serving's S3 variables naming this server, and test credentials."""
        return {
            "S3_ENDPOINT": f"127.0.0.1:{self.port}",
            "S3_USE_HTTPS": "0",
            "S3_VERIFY_SSL": "0",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": self.key[0],
            "AWS_SECRET_ACCESS_KEY": self.key[1],
        }

    def start(self, auth: bool = False) -> None:
        """Start (or restart, empty) the server and wait until it answers. With ``auth`` it checks
        credentials and permissions: ``key`` is then an access key of user ``u``, whose policy
        ``all`` allows everything."""
        log = self.log_path.open("ab")
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS)} if auth else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=log,
            env=env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"moto server exited:\n{self.log()}")
            try:
                requests.get(f"{self.endpoint}/moto-api/", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            pytest.fail(f"moto server did not start:\n{self.log()}")
        if auth:
            self._make_user()

    def _make_user(self) -> None:
        """Make users ``u`` (whose key the tests use) and ``admin`` (who changes ``u``'s
        permissions) while moto still admits anyone, then use up the rest of its
        unauthenticated actions, so that from here on every request is checked."""
        iam = boto3.client("iam", **self._client_args(UNKNOWN_KEY))
        keys = {}
        for user in ("u", "admin"):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(_ALLOW_ALL))
            created = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (created["AccessKeyId"], created["SecretAccessKey"])
        self.key, self._admin_key = keys["u"], keys["admin"]
        s3 = boto3.client("s3", **self._client_args(UNKNOWN_KEY))
        for _ in range(_SETUP_ACTIONS):
            try:
                s3.list_buckets()
            except botocore.exceptions.ClientError:
                return
        pytest.fail("moto did not start checking credentials")

    def allow_all(self) -> None:
        """Give user ``u`` every permission again."""
        boto3.client("iam", **self._client_args(self._admin_key)).put_user_policy(
            UserName="u", PolicyName="all", PolicyDocument=json.dumps(_ALLOW_ALL)
        )

    def deny_all(self) -> None:
        """Take every permission from user ``u``."""
        boto3.client("iam", **self._client_args(self._admin_key)).delete_user_policy(
            UserName="u", PolicyName="all"
        )

    def _client_args(self, key: tuple[str, str]) -> dict[str, str]:
        return {
            "endpoint_url": self.endpoint,
            "region_name": "us-east-1",
            "aws_access_key_id": key[0],
            "aws_secret_access_key": key[1],
        }

    def stop(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> Any:
        return boto3.client("s3", **self._client_args(self.key))

    def gets(self, key_part: str) -> int:
        """How many GET requests named an object whose path contains ``key_part``."""
        return sum(1 for line in self.log().splitlines() if '"GET /' in line and key_part in line)

    def lists(self) -> int:
        """How many listing requests the server answered."""
        return sum(1 for line in self.log().splitlines() if '"GET /' in line and "list-type=2" in line)

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        """Upload every file under ``folder`` to ``bucket`` under ``prefix``."""
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def _started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auth: bool) -> S3Server:
    folder = tmp_path / "s3"
    folder.mkdir()
    server = S3Server(folder)
    server.start(auth=auth)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return server


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A started moto S3 server that admits any key; its variables are set in this process's
    environment, so the servers and commands the test starts read this store."""
    server = _started(tmp_path, monkeypatch, auth=False)
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop()


@pytest.fixture
def s3_server_with_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """As ``s3_server``, but checking keys and permissions (see ``S3Server.start``)."""
    server = _started(tmp_path, monkeypatch, auth=True)
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop()
