"""The trainer's Prometheus metrics: what a pod serves on /metrics and what rank 0
pushes to a Pushgateway at the end."""

from __future__ import annotations

import logging

import pytest

from finetune.trainer.telemetry import prometheus
from finetune.trainer.telemetry.prometheus import Identity, TrainerMetrics


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
