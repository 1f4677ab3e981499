"""`finetune-operator` with no cluster to talk to: one line naming the configuration
it tried, exit 1, within seconds (not kopf's traceback and a retry every minute)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

OPERATOR = Path(sys.executable).parent / "finetune-operator"


def start_operator(kubeconfig: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env["KUBECONFIG"] = str(kubeconfig)
    started = time.monotonic()
    result = subprocess.run(
        [str(OPERATOR)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    return result, time.monotonic() - started


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"


class Refusing(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def refusing_server() -> Iterator[str]:
    """An API server that refuses every token."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_missing_kubeconfig(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kubeconfig"
    result, seconds = start_operator(missing)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"finetune-operator: no Kubernetes cluster: kubeconfig {missing} (from $KUBECONFIG): "
        "Invalid kube-config file. No configuration found."
    ]
    assert seconds < 20


def test_a_server_that_refuses(tmp_path: Path) -> None:
    server = f"https://127.0.0.1:{closed_port()}"
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server)
    result, seconds = start_operator(kubeconfig)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"finetune-operator: no Kubernetes cluster: kubeconfig {kubeconfig} ")
    assert f"{server} cannot be reached (" in line
    assert "Connection refused" in line
    assert seconds < 20


def test_a_server_that_never_answers(tmp_path: Path, silent_server: str) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", silent_server)
    result, seconds = start_operator(kubeconfig)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert f"kubeconfig {kubeconfig} (from $KUBECONFIG): {silent_server} cannot be" in line
    assert "timed out" in line
    assert seconds < 30  # the probe waits 5 s, without retries


def test_a_server_that_refuses_the_credentials(tmp_path: Path, refusing_server: str) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", refusing_server)
    result, _ = start_operator(kubeconfig)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"finetune-operator: no Kubernetes cluster: kubeconfig {kubeconfig} (from $KUBECONFIG): "
        f"the API server {refusing_server} refused the credentials (401)"
    ]
