"""S3 faults for tests, made honestly: moto's S3 server stopped and started again on
the same port (its state lives in this process, so objects survive), and a TCP proxy
that slows what clients send, so an upload is observable while it is in flight."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest
from moto.server import ThreadedMotoServer

from finetune.trainer.storage.s3 import S3Settings, S3Store

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Moto:
    """moto's S3 server on loopback, which a test may stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def store(self, bucket: str = "runs", prefix: str = "job") -> S3Store:
        """A store on `s3://bucket/prefix`, the bucket created."""
        import boto3

        boto3.client("s3", endpoint_url=self.url).create_bucket(Bucket=bucket)
        return S3Store(f"s3://{bucket}/{prefix}", S3Settings(self.url))


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[Moto]:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    server = Moto()
    server.start()
    # moto keeps its objects in this process: every test starts from an empty store.
    urllib.request.urlopen(urllib.request.Request(f"{server.url}/moto-api/reset", method="POST"))
    try:
        yield server
    finally:
        server.stop()


class ThrottledProxy:
    """Forwards loopback TCP connections to `port`, client-to-server bytes at most
    `rate` bytes per second (per connection); answers come back at full speed."""

    def __init__(self, port: int, rate: float) -> None:
        self.target = port
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while chunk := source.recv(4096 if slow else 65536):
                sink.sendall(chunk)
                if slow:
                    time.sleep(len(chunk) / self.rate)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)


@contextmanager
def throttled(port: int, rate: float) -> Iterator[ThrottledProxy]:
    proxy = ThrottledProxy(port, rate)
    try:
        yield proxy
    finally:
        proxy.close()
