"""Real servers on loopback for the remote-storage tests (issue 11), started by the tests.

- ``s3``: moto's S3-compatible server (``ThreadedMotoServer``) in this process, one per test
  session; each test gets its own fresh bucket (``s3_url``), so tests never see each other's
  objects. Credentials are fake and passed through the environment, as users pass real ones.

- ``http_server``: a static HTTP server over a fresh temp folder that honours ``Range``,
  ``If-Range``, ``If-Match``, with ETag / Last-Modified and nginx-style listings, plus knobs
  (ignore Range, HTML instead of bytes, a file changed or a response cut after N bytes).
- ``nginx_server``: nginx over a temp folder (autoindex, JSON listings); skips without nginx.
- ``fault_proxy``: a factory ``fault_proxy(upstream_url) -> FaultProxy`` (cut after N bytes,
  delay, canned 500/503, byte counters), stopped at the end of the test.

The classes and every knob are documented in ``tests/remote/servers.py``; import them in a test
module of this folder with ``from .servers import FaultProxy, HTTPFileServer``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from .servers import FaultProxy, HTTPFileServer, NginxServer

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")

pytestmark = pytest.mark.network

_bucket_ids = itertools.count()


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str = "testing-key"
    secret_key: str = "testing-secret"
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The environment a user sets for an S3-compatible endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        ).create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 credentials and endpoint in this process's environment (as a user sets them)."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture
def s3_url(s3_env: S3Server) -> str:
    """``s3://<fresh bucket>/runs/exp``: an empty run location in a new bucket."""
    bucket = f"sg-test-{os.getpid()}-{next(_bucket_ids)}"
    s3_env.make_bucket(bucket)
    return f"s3://{bucket}/runs/exp"


@pytest.fixture
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HTTPFileServer]:
    """A static HTTP server (werkzeug) over a fresh temp folder ``http_server.root``, at
    ``http_server.url``; knobs and records in :class:`tests.remote.servers.HTTPFileServer`."""
    server = HTTPFileServer(tmp_path_factory.mktemp("www"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    """nginx over a fresh temp folder ``nginx_server.root`` (autoindex on, JSON listings), at
    ``nginx_server.url``. Skips the test when nginx is not installed."""
    try:
        server = NginxServer(tmp_path_factory.mktemp("nginx-www"), tmp_path_factory.mktemp("nginx"))
    except FileNotFoundError:
        pytest.skip("nginx is not installed")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str], FaultProxy]]:
    """A factory: ``fault_proxy(upstream_url)`` starts a :class:`FaultProxy` in front of
    ``upstream_url`` (``http://127.0.0.1:PORT``) and returns it; all are stopped after the test."""
    proxies: list[FaultProxy] = []

    def start(upstream: str) -> FaultProxy:
        proxy = FaultProxy(upstream)
        proxies.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for p in proxies:
            p.close()
