"""The trainer's Prometheus metrics: what a pod serves on /metrics and what rank 0
pushes to a Pushgateway at the end."""

from __future__ import annotations

import errno
import logging
import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest

from finetune.trainer.telemetry import prometheus
from finetune.trainer.telemetry.pace import Pace
from finetune.trainer.telemetry.prometheus import Identity, TrainerMetrics
from finetune.trainer.telemetry.steps import StepRecord, StepTelemetry
from tests.fake_pushgateway import FakePushgateway


def metrics() -> TrainerMetrics:
    return TrainerMetrics(Identity("disc-lora", "team-a", "lora", 0))


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("http://pushgw:notaport", "http://pushgw:notaport"),  # http.client.InvalidURL
        ("http://[bad", "http://[bad"),  # ValueError
        ("pushgw.monitoring:9091/ ", "pushgw.monitoring:9091/ "),  # a stray space: InvalidURL
        ("http://user:hunter2@pushgw:notaport", "http://pushgw:notaport"),
    ],
)
def test_a_malformed_pushgateway_url_is_a_warning_not_a_failure(
    url: str, named: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=prometheus.__name__):
        assert metrics().push({"FINETUNE_PUSHGATEWAY_URL": url}) is False
    (warning,) = caplog.records
    assert "cannot push the final values to the Pushgateway at " in warning.getMessage()
    assert f"Pushgateway at {named!r} (" in warning.getMessage()  # quoted: spaces show
    assert "hunter2" not in caplog.text
    assert "user:" not in caplog.text


@pytest.fixture
def gateway() -> Iterator[FakePushgateway]:
    server = FakePushgateway()
    yield server
    server.close()


def sample(text: str, name: str) -> float:
    """The value of `name` for rank 0 of disc-lora in an exposition text."""
    found = re.search(rf'^{name}{{[^}}]*job="disc-lora"[^}}]*}} (\S+)$', text, re.MULTILINE)
    assert found is not None, f"no {name} in:\n{text}"
    return float(found.group(1))


def test_a_finished_run_pushes_and_serves_no_eta_and_no_speed(
    tmp_path: Path, gateway: FakePushgateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An early stop at step 5 of 10: the last step's ETA and images per second would
    stay on the dashboard for good (the Pushgateway keeps the final push)."""
    monkeypatch.setenv("FINETUNE_PUSHGATEWAY_URL", gateway.url)
    served = metrics()
    telemetry = StepTelemetry(
        served, None, tmp_path / "train_log.jsonl", torch.device("cpu"), True, 10, 0
    )
    now = [0.0]
    telemetry.pace = Pace(clock=lambda: now[0])
    for step in range(1, 6):
        now[0] += 1.0
        telemetry.step(StepRecord(step, 10, 0.5, 1e-4, seconds=0.5, images=4))
    running = generate_latest(served.registry).decode()
    assert (
        sample(running, "finetune_eta_seconds"),
        sample(running, "finetune_images_per_second"),
    ) == (5, 8)
    telemetry.close_progress()
    telemetry.finished()
    telemetry.results([])
    (pushed,) = gateway.pushes
    for text in (pushed, generate_latest(served.registry).decode()):
        assert sample(text, "finetune_eta_seconds") == 0
        assert sample(text, "finetune_images_per_second") == 0
        assert sample(text, "finetune_step") == 5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def served(port: int) -> TrainerMetrics:
    found = metrics()
    found.record_position(3, 10, 0.5)
    assert found.serve({"FINETUNE_TRAINER_METRICS_PORT": str(port)}) == port
    return found


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
def test_metrics_are_served_on_ipv6_and_ipv4() -> None:
    """An IPv6-only cluster scrapes the pod at its IPv6 address."""
    port = free_port()
    served(port)
    for host in ("[::1]", "127.0.0.1"):
        assert sample(scrape(host, port), "finetune_step") == 3


def test_metrics_are_served_on_ipv4_where_the_kernel_has_no_ipv6(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NoIPv6:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(prometheus, "_DualStackServer", NoIPv6)
    port = free_port()
    served(port)
    assert sample(scrape("127.0.0.1", port), "finetune_step") == 3


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
def test_a_taken_port_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger=prometheus.__name__):
            assert metrics().serve({"FINETUNE_TRAINER_METRICS_PORT": str(port)}) is None
    assert f"port {port} unavailable" in caplog.text
