"""The trainer's status reports, against a tiny HTTP server standing in for the API
server, and the termination message a failed pod leaves."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from finetune.api.status import Artifact, CheckpointRef, Progress
from finetune.trainer.telemetry import status as status_report
from finetune.trainer.telemetry.status import StatusReporter, write_termination_message
from tests.fake_status_api import FakeApi

STATUS_PATH = "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs/disc-lora/status"
TOKEN = "sa-token-0123456789"


@pytest.fixture
def api() -> Iterator[FakeApi]:
    server = FakeApi()
    yield server
    server.close()


@pytest.fixture
def account(tmp_path: Path) -> Path:
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "token").write_text(TOKEN + "\n")
    return folder


def reporter(api: FakeApi, account: Path, interval: float = 60.0, **options: Any) -> StatusReporter:
    return StatusReporter(
        api.url + STATUS_PATH, service_account_dir=account, interval=interval, **options
    )


def job_env(api_url: str, **more: str) -> dict[str, str]:
    return {
        "FINETUNE_JOB_NAME": "disc-lora",
        "FINETUNE_NAMESPACE": "team-a",
        "FINETUNE_STATUS_API": api_url,
        **more,
    }


def test_no_reporter_outside_a_pod() -> None:
    assert StatusReporter.from_env({}) is None
    # A job named but no API server known (no FINETUNE_STATUS_API, not in a cluster).
    assert StatusReporter.from_env({"FINETUNE_JOB_NAME": "a", "FINETUNE_NAMESPACE": "b"}) is None
    assert StatusReporter.from_env({"FINETUNE_STATUS_API": "http://127.0.0.1:1"}) is None


def test_in_cluster_api_from_the_service_environment(tmp_path: Path) -> None:
    env = {
        "FINETUNE_JOB_NAME": "disc-lora",
        "FINETUNE_NAMESPACE": "team-a",
        "KUBERNETES_SERVICE_HOST": "fd00::1",
        "KUBERNETES_SERVICE_PORT": "443",
        "FINETUNE_SERVICE_ACCOUNT_DIR": str(tmp_path),
        "FINETUNE_STATUS_INTERVAL": "2.5",
    }
    found = StatusReporter.from_env(env)
    assert found is not None
    try:
        assert found.url == "https://[fd00::1]:443" + STATUS_PATH
        assert found.interval == 2.5
    finally:
        found.close(timeout=1)


def test_progress_within_the_interval_coalesces(api: FakeApi, account: Path) -> None:
    found = StatusReporter.from_env(
        job_env(
            api.url + "/",
            FINETUNE_SERVICE_ACCOUNT_DIR=str(account),
            FINETUNE_STATUS_INTERVAL="60",
        )
    )
    assert found is not None
    found.progress(1, 10, 0.5, 8.0)
    api.wait_for(1)
    for step in range(2, 6):
        found.progress(step, 10, 0.5, 8.0)
    found.close()
    requests = api.wait_for(2)
    # The first goes out at once; the rest wait for the interval (or close) and
    # only the newest is sent.
    assert [r["body"]["status"]["progress"]["step"] for r in requests] == [1, 5]
    request = requests[-1]
    assert request["path"] == STATUS_PATH
    assert request["headers"]["Content-Type"] == "application/merge-patch+json"
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    progress = Progress.model_validate(request["body"]["status"]["progress"])
    assert (progress.step, progress.total_steps, progress.percent) == (5, 10, 50)


def test_progress_is_sent_again_after_the_interval(api: FakeApi, account: Path) -> None:
    sender = reporter(api, account, interval=0.2)
    try:
        sender.progress(1, 4, 0.5, 1.0)
        api.wait_for(1)
        sender.progress(2, 4, 0.5, 1.0)
        requests = api.wait_for(2)  # without close: the thread sends it
        assert requests[-1]["body"]["status"]["progress"]["step"] == 2
    finally:
        sender.close()


def test_checkpoints_and_artifacts_are_sent_at_once_and_never_lost(
    api: FakeApi, account: Path
) -> None:
    sender = reporter(api, account)
    artifact = {"uri": "s3://b/out/README.md", "sha256": "0" * 64, "bytes": 3, "kind": "modelCard"}
    try:
        sender.progress(1, 10, 0.5, 1.0)
        api.wait_for(1)
        sender.checkpoint("/work/checkpoints/step-00000003", 3)
        sender.progress(3, 10, 0.5, 1.0)  # throttled, but must not hold back the checkpoint
        requests = api.wait_for(2)
        assert requests[1]["body"]["status"] == {
            "lastCheckpoint": {"uri": "/work/checkpoints/step-00000003", "step": 3}
        }
        sender.artifacts([artifact])
        sender.progress(4, 10, 0.5, 1.0)
        requests = api.wait_for(3)
        assert requests[2]["body"]["status"] == {"artifacts": [artifact]}
    finally:
        sender.close()
    last = api.wait_for(4)[-1]["body"]["status"]
    assert last["progress"]["step"] == 4
    CheckpointRef.model_validate(requests[1]["body"]["status"]["lastCheckpoint"])
    Artifact.model_validate(requests[2]["body"]["status"]["artifacts"][0])


def test_close_flushes_what_is_pending(api: FakeApi, account: Path) -> None:
    sender = reporter(api, account)
    sender.progress(1, 2, 0.5, 1.0)
    sender.progress(2, 2, 0.4, 1.0)
    sender.checkpoint("/work/checkpoints/step-00000002", 2)
    sender.artifacts([])
    sender.close()
    # Everything is at the server when close() returns.
    merged: dict[str, Any] = {}
    for status in api.statuses():
        merged.update(status)
    assert merged["progress"]["step"] == 2
    assert merged["progress"]["percent"] == 100
    assert merged["lastCheckpoint"]["step"] == 2
    assert merged["artifacts"] == []
    sender.close()  # a second close does nothing


def test_the_token_is_read_anew_for_every_request(api: FakeApi, account: Path) -> None:
    sender = reporter(api, account, interval=0)
    try:
        sender.progress(1, 2, 0.5, 1.0)
        api.wait_for(1)
        (account / "token").write_text("rotated-token-42")
        sender.progress(2, 2, 0.5, 1.0)
        requests = api.wait_for(2)
    finally:
        sender.close()
    assert requests[0]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert requests[1]["headers"]["Authorization"] == "Bearer rotated-token-42"


def test_no_token_file_sends_no_authorization(api: FakeApi, tmp_path: Path) -> None:
    sender = reporter(api, tmp_path / "nothing-here")
    sender.progress(1, 2, 0.5, 1.0)
    sender.close()
    assert "Authorization" not in api.wait_for(1)[0]["headers"]


@pytest.mark.parametrize("code", [500, 403])
def test_a_failing_api_server_is_logged_once_and_never_raises(
    api: FakeApi, account: Path, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    api.code = code
    sender = reporter(api, account, interval=0)
    with caplog.at_level(logging.WARNING, logger=status_report.__name__):
        for step in range(1, 4):
            sender.progress(step, 10, 0.5, 1.0)
            api.wait_for(step)
        sender.checkpoint("/work/checkpoints/step-00000003", 3)
        sender.close()
    assert len(api.requests) >= 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert f"HTTP {code}" in caplog.text
    assert TOKEN not in caplog.text  # the server echoed it; the log must not


def test_an_unreachable_api_server_is_logged_once(
    account: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = StatusReporter(
        f"http://127.0.0.1:{port}{STATUS_PATH}", service_account_dir=account, interval=0
    )
    with caplog.at_level(logging.WARNING, logger=status_report.__name__):
        for step in range(1, 4):
            sender.progress(step, 10, 0.5, 1.0)
        sender.checkpoint("/work/checkpoints/step-00000003", 3)
        sender.close(timeout=5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "ConnectionRefusedError" in caplog.text or "refused" in caplog.text
    assert TOKEN not in caplog.text


def test_loss_is_smoothed_and_eta_follows_the_step_time(api: FakeApi, account: Path) -> None:
    now = [100.0]
    sender = reporter(
        api,
        account,
        clock=lambda: now[0],
        wall_clock=lambda: datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC),
    )
    sender.progress(1, 10, 1.0, 4.0)
    api.wait_for(1)
    for step, loss in ((2, 0.0), (3, 0.0)):
        now[0] += 2.0  # two seconds a step
        sender.progress(step, 10, loss, 4.0)
    sender.close()
    first, last = (s["progress"] for s in api.statuses())
    assert first["loss"] == 1.0
    assert first["etaSeconds"] is None  # no step time yet
    # Bias-corrected moving average with decay 0.9 of 1, 0, 0.
    assert last["loss"] == pytest.approx(0.081 / 0.271)
    assert (last["etaSeconds"], last["eta"]) == (14, "14s")
    assert last["percent"] == 30
    assert last["imagesPerSecond"] == 4.0
    assert last["lastHeartbeat"] == "2026-11-26T10:00:00Z"


def test_percent_is_floored_and_unknowns_are_null(api: FakeApi, account: Path) -> None:
    sender = reporter(api, account)
    sender.progress(1, 3, float("nan"), None)
    sender.close()
    (status,) = api.statuses()
    assert status["progress"]["percent"] == 33
    assert status["progress"]["loss"] is None
    assert status["progress"]["imagesPerSecond"] is None


# --- the termination message ----------------------------------------------------------


def test_termination_message_is_one_paragraph_without_secrets(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    env = {"FINETUNE_TERMINATION_LOG": str(log), "HF_TOKEN": "hf_secretvalue123"}
    message = "download failed\n  with hf_secretvalue123\n\tin the URL"
    assert write_termination_message(message, env)
    assert log.read_text() == "download failed with *** in the URL"
    # The first failure names the cause; later ones do not replace it.
    assert not write_termination_message("rank 1 failed: connection reset", env)
    assert log.read_text() == "download failed with *** in the URL"


def test_termination_message_is_cut_at_4096_bytes(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    assert write_termination_message("é" * 5000, {"FINETUNE_TERMINATION_LOG": str(log)})
    written = log.read_bytes()
    assert len(written) <= 4096
    assert written.decode() == "é" * 2048


def test_termination_message_only_where_it_may_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-such-folder" / "termination-log"
    assert not write_termination_message("x", {"FINETUNE_TERMINATION_LOG": str(missing)})
    assert not missing.parent.exists()
    # The default file is used only when Kubernetes made it: a workstation run,
    # even as root, must not create it.
    default = tmp_path / "termination-log"
    monkeypatch.setattr(status_report, "DEFAULT_TERMINATION_LOG", str(default))
    assert not write_termination_message("x", {})
    assert not default.exists()
    default.touch()
    assert write_termination_message("it failed", {})
    assert default.read_text() == "it failed"
