"""An S3 (and STS) server for the integration tier: moto's server mode over real
HTTP on loopback, one process per session, a fresh bucket per test.

Everything here talks to 127.0.0.1 only, with explicit test credentials and
``AWS_EC2_METADATA_DISABLED=true``, so the AWS default chain never looks for an
instance profile.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config

ACCESS_KEY_ID = "AKIATESTARCHIVER"
SECRET_ACCESS_KEY = "test-archive-secret-0123456789"  # noqa: S105 (a test value)
REGION = "us-east-1"
START_TIMEOUT_S = 30.0

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1; in-memory, gone when stopped."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited ({self._process.returncode})")
            try:
                url = f"{self.url}/moto-api/"  # loopback http only
                with urllib.request.urlopen(url, timeout=1):  # noqa: S310
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.url}")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
        self._process = None


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the test server, path-style, test credentials."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        config=Config(s3={"addressing_style": "path"}),
    )


def create_bucket(endpoint: str) -> str:
    name = f"rejects-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def read_archive(endpoint: str, bucket: str) -> dict[str, list[dict[str, Any]]]:
    """Every object of the bucket, gunzipped and parsed: key -> lines."""
    client = s3_client(endpoint)
    objects: dict[str, list[dict[str, Any]]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            lines = gzip.decompress(body).decode().splitlines()
            objects[item["Key"]] = [json.loads(line) for line in lines]
    return objects


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto server running for the whole session."""
    server = MotoServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the session's server."""
    return create_bucket(s3_endpoint)


@pytest.fixture
def archive_env(
    worker_env: dict[str, str],
    s3_endpoint: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """worker_env plus an archive in this test's bucket on the moto server."""
    env = {
        **worker_env,
        "CIO_ARCHIVE__BUCKET": s3_bucket,
        "CIO_ARCHIVE__PREFIX": "rejects",
        "CIO_ARCHIVE__ENDPOINT_URL": s3_endpoint,
        "CIO_ARCHIVE__REGION": REGION,
        "CIO_ARCHIVE__ACCESS_KEY_ID": ACCESS_KEY_ID,
        "CIO_ARCHIVE__SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
