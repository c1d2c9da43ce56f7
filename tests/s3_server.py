"""A real S3-compatible server (moto's server mode) on a free port, which tests can stop and
start again, and whose request log tells which objects were downloaded.

moto keeps its buckets in memory: a restarted server is empty, so ``start`` after ``stop``
gives a store that the test fills again (as a store restored from its backup would be).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from tests.conftest import free_port


class S3Server:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "moto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """TF Serving's S3 variables naming this server, and test credentials."""
        return {
            "S3_ENDPOINT": f"127.0.0.1:{self.port}",
            "S3_USE_HTTPS": "0",
            "S3_VERIFY_SSL": "0",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }

    def start(self) -> None:
        """Start (or restart, empty) the server and wait until it answers."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"moto server exited:\n{self.log()}")
            try:
                requests.get(f"{self.endpoint}/moto-api/", timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        pytest.fail(f"moto server did not start:\n{self.log()}")

    def stop(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

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


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A started moto S3 server; its variables are set in this process's environment, so the
    servers and commands the test starts read this store."""
    folder = tmp_path / "s3"
    folder.mkdir()
    server = S3Server(folder)
    server.start()
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop()
