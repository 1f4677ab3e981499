"""The operator's deletions on the Pushgateway: a gateway that is down or refuses is
a warning in the log, never an error (the create and delete handlers go on)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finetune_operator.pushgateway import delete_groups


class Failing(BaseHTTPRequestHandler):
    def do_DELETE(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def failing_gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> str:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{unused.getsockname()[1]}"


@pytest.mark.parametrize("gateway", ["closed_port", "failing_gateway"])
def test_a_gateway_that_fails_is_a_warning(
    gateway: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    url = request.getfixturevalue(gateway)
    with caplog.at_level(logging.WARNING):
        assert delete_groups(url, "ml", "dog") == [0]
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert "FineTuneJob ml/dog" in record.getMessage()
    assert f"{url}/metrics/job/dog/namespace/ml/rank/0" in record.getMessage()


def test_nothing_is_deleted_without_a_gateway(caplog: pytest.LogCaptureFixture) -> None:
    assert delete_groups("", "ml", "dog") == []
    assert caplog.records == []
