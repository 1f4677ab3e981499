"""The trainer's status reports, against a tiny HTTP server standing in for the API
server, and the one ETA they carry."""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from finetune.api.status import Artifact, CheckpointRef, Progress, ValidationMetrics
from finetune.trainer.telemetry import status as status_report
from finetune.trainer.telemetry.pace import Pace
from finetune.trainer.telemetry.status import StatusReporter
from tests.fake_status_api import FakeApi

STATUS_PATH = "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs/disc-lora/status"
TOKEN = "sa-token-0123456789"


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
    found.progress(1, 10, 0.5, 8.0, None)
    api.wait_for(1)
    for step in range(2, 6):
        found.progress(step, 10, 0.5, 8.0, None)
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
        sender.progress(1, 4, 0.5, 1.0, None)
        api.wait_for(1)
        sender.progress(2, 4, 0.5, 1.0, None)
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
        sender.progress(1, 10, 0.5, 1.0, None)
        api.wait_for(1)
        sender.checkpoint("/work/checkpoints/step-00000003", 3)
        sender.progress(3, 10, 0.5, 1.0, None)  # throttled, but must not hold back the checkpoint
        requests = api.wait_for(2)
        assert requests[1]["body"]["status"] == {
            "lastCheckpoint": {"uri": "/work/checkpoints/step-00000003", "step": 3}
        }
        sender.artifacts([artifact])
        sender.progress(4, 10, 0.5, 1.0, None)
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
    sender.progress(1, 2, 0.5, 1.0, None)
    sender.progress(2, 2, 0.4, 1.0, None)
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


ARTIFACT = {"uri": "s3://b/out/lora.safetensors", "sha256": "0" * 64, "bytes": 3, "kind": "lora"}


def test_the_final_flush_outlasts_an_api_server_restarting(api: FakeApi, account: Path) -> None:
    """A control-plane upgrade as the run ends: 503s, more than the thread and one last
    try at close use up; the artifacts and the last progress still arrive."""
    api.codes = [503, 503, 503]
    sender = reporter(api, account)
    sender.progress(10, 10, 0.1, 1.0, 0)
    sender.artifacts([ARTIFACT])
    sender.close()
    status = api.accepted()
    assert status["artifacts"] == [ARTIFACT]
    assert status["progress"]["step"] == 10


def test_the_final_flush_gives_up_at_its_deadline_and_says_so(
    api: FakeApi, account: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api.code = 503
    sender = reporter(api, account)
    with caplog.at_level(logging.WARNING, logger=status_report.__name__):
        sender.progress(10, 10, 0.1, 1.0, 0)
        sender.artifacts([ARTIFACT])
        sender.close(timeout=2)
    assert len(api.requests) >= 2
    assert "gave up sending the job's final status (artifacts, progress)" in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("code", [403, 404, 422])
def test_the_final_flush_does_not_retry_a_refusal(
    api: FakeApi, account: Path, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    api.code = code
    sender = reporter(api, account)
    sender.artifacts([ARTIFACT])
    sender.close()
    assert len(api.requests) == 1  # the same patch would be refused again
    assert "gave up" not in caplog.text


def test_the_token_is_read_anew_for_every_request(api: FakeApi, account: Path) -> None:
    sender = reporter(api, account, interval=0)
    try:
        sender.progress(1, 2, 0.5, 1.0, None)
        api.wait_for(1)
        (account / "token").write_text("rotated-token-42")
        sender.progress(2, 2, 0.5, 1.0, None)
        requests = api.wait_for(2)
    finally:
        sender.close()
    assert requests[0]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert requests[1]["headers"]["Authorization"] == "Bearer rotated-token-42"


def test_no_token_file_sends_no_authorization(api: FakeApi, tmp_path: Path) -> None:
    sender = reporter(api, tmp_path / "nothing-here")
    sender.progress(1, 2, 0.5, 1.0, None)
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
            sender.progress(step, 10, 0.5, 1.0, None)
            api.wait_for(step)
        sender.checkpoint("/work/checkpoints/step-00000003", 3)
        sender.close(timeout=1)
    assert len(api.requests) >= 4
    warnings = [r for r in caplog.records if "cannot update the job's status" in r.getMessage()]
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
            sender.progress(step, 10, 0.5, 1.0, None)
        sender.checkpoint("/work/checkpoints/step-00000003", 3)
        sender.close(timeout=1)
    warnings = [r for r in caplog.records if "cannot update the job's status" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "ConnectionRefusedError" in caplog.text or "refused" in caplog.text
    assert TOKEN not in caplog.text


def test_loss_is_smoothed_and_progress_is_the_api_model(api: FakeApi, account: Path) -> None:
    sender = reporter(
        api,
        account,
        wall_clock=lambda: datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC),
    )
    sender.progress(1, 10, 1.0, 4.0, None)
    api.wait_for(1)
    for step, loss in ((2, 0.0), (3, 0.0)):
        sender.progress(step, 10, loss, 4.0, 14)
    sender.close()
    first, last = (s["progress"] for s in api.statuses())
    assert first["loss"] == 1.0
    assert first["etaSeconds"] is None  # sent as null: it clears an earlier attempt's
    # Bias-corrected moving average with decay 0.9 of 1, 0, 0.
    assert last["loss"] == pytest.approx(0.081 / 0.271)
    assert (last["etaSeconds"], last["eta"]) == (14, "14s")
    assert last["percent"] == 30
    assert last["imagesPerSecond"] == 4.0
    assert last["lastHeartbeat"] == "2026-11-26T10:00:00Z"
    assert Progress.model_validate(last).model_dump(by_alias=True, mode="json") == last


def test_the_eta_is_the_mean_wall_time_per_step_since_the_first() -> None:
    now = [100.0]
    pace = Pace(clock=lambda: now[0])
    now[0] += 600.0  # the first step: warm-up and compilation, left out
    assert pace.step_done(1, 10) is None  # no step time yet
    now[0] += 2.0
    assert pace.step_done(2, 10) == 16
    now[0] += 10.0  # a checkpoint save between steps counts too, spread over the steps
    assert pace.step_done(3, 10) == 7 * (2 + 10) / 2
    assert pace.step_done(3, 10) == 42  # no new step: no new time
    now[0] += 1.0
    assert pace.step_done(10, 10) == 0


def test_the_eta_spreads_checkpoint_and_validation_pauses_over_the_steps() -> None:
    """1 s steps and 60 s of checkpoint and validation after every 100th: around a
    pause the ETA stays near the truth instead of jumping (a moving average of the step
    time said 900 s at step 100 and 6293 s at step 101)."""
    now = [0.0]
    pace = Pace(clock=lambda: now[0])
    total, pause, every = 1000, 60.0, 100
    etas = {}
    for step in range(1, total + 1):
        now[0] += 1.0
        if step % every == 1 and step > 1:
            now[0] += pause  # the pause after step - 1 holds back this one
        etas[step] = pace.step_done(step, total)
    for step in range(395, 511):
        pauses_left = len([s for s in range(step + 1, total + 1) if s % every == 1])
        truth = (total - step) * 1.0 + pauses_left * pause
        eta = etas[step]
        assert eta is not None
        assert abs(eta - truth) <= 0.1 * truth, (step, eta, truth)


def test_percent_is_floored_and_unknowns_are_null(api: FakeApi, account: Path) -> None:
    sender = reporter(api, account)
    sender.progress(1, 3, float("nan"), None, None)
    sender.close()
    (status,) = api.statuses()
    assert status["progress"]["percent"] == 33
    assert status["progress"]["loss"] is None
    assert status["progress"]["imagesPerSecond"] is None


def test_validation_metrics_ride_on_every_later_progress(api: FakeApi, account: Path) -> None:
    """`progress` goes out as one merge patch: without the metrics in each, the next
    step's update would clear them."""
    sender = reporter(api, account, interval=0)
    try:
        sender.progress(2, 4, 0.5, 1.0, None)
        api.wait_for(1)
        sender.metrics(ValidationMetrics(step=2, clip_text=0.25, dino=0.5))
        first = api.wait_for(2)[-1]["body"]["status"]["progress"]
        assert (first["step"], first["metrics"]["step"], first["metrics"]["dino"]) == (2, 2, 0.5)
        assert (
            first["lastHeartbeat"] == api.requests[0]["body"]["status"]["progress"]["lastHeartbeat"]
        ), "scores are no heartbeat"
        sender.progress(3, 4, 0.5, 1.0, None)
        later = api.wait_for(3)[-1]["body"]["status"]["progress"]
        assert (later["step"], later["metrics"]["clipText"]) == (3, 0.25)
    finally:
        sender.close()
