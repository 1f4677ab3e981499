"""How failures end: which exit code each cause gets (the operator classifies by it)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError, NoCredentialsError

from finetune.api import FineTuneJob
from finetune.api.pod import (
    EXIT_ACCESS_DENIED,
    EXIT_DISK_FULL,
    EXIT_FAILED,
    EXIT_INVALID_INPUT,
    EXIT_NON_FINITE_LOSS,
)
from finetune.trainer.engine.trainer import check_loss
from finetune.trainer.errors import (
    AccessDenied,
    DiskFull,
    JobInputError,
    NonFiniteLoss,
    exit_code_for,
)
from finetune.trainer.launcher import run
from finetune.trainer.models import sources
from finetune.trainer.storage.s3 import refusals_named
from tests.support import lora_job


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_loss_that_is_not_finite_stops_the_run(loss: float) -> None:
    with pytest.raises(NonFiniteLoss, match="step 7: the training loss is"):
        check_loss(loss, 7)


def test_a_finite_loss_passes() -> None:
    assert check_loss(0.25, 7) == 0.25


def test_exit_codes() -> None:
    assert exit_code_for(NonFiniteLoss("x")) == EXIT_NON_FINITE_LOSS == 3
    assert exit_code_for(AccessDenied("x")) == EXIT_ACCESS_DENIED == 4
    assert exit_code_for(DiskFull("x")) == EXIT_DISK_FULL == 5
    assert exit_code_for(JobInputError("x")) == EXIT_INVALID_INPUT == 2
    assert exit_code_for(RuntimeError("x")) == EXIT_FAILED == 1


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "no"}}, "GetObject")


@pytest.mark.parametrize(
    "code", ["403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"]
)
def test_s3_refusing_the_credentials_is_access_denied(code: str) -> None:
    message = f"s3://data/x: S3 refused the request \\({code}\\)"
    with pytest.raises(AccessDenied, match=message), refusals_named("s3://data/x"):
        raise client_error(code)


def test_no_s3_credentials_is_access_denied() -> None:
    with pytest.raises(AccessDenied, match="no S3 credentials"), refusals_named("s3://data/x"):
        raise NoCredentialsError()


def test_other_s3_refusals_stay_bad_input_and_server_errors_pass() -> None:
    with pytest.raises(JobInputError) as refused, refusals_named("s3://data/x"):
        raise client_error("NoSuchBucket")
    assert not isinstance(refused.value, AccessDenied)
    with pytest.raises(ClientError), refusals_named("s3://data/x"):
        raise client_error("SlowDown")


@pytest.mark.parametrize(("status", "denied"), [(401, True), (403, True), (404, False)])
def test_hub_refusals(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, status: int, denied: bool
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(*args: Any, **kwargs: Any) -> str:
        response = SimpleNamespace(status_code=status, headers={}, request=None)
        raise HfHubHTTPError(f"{status}", response=response)  # type: ignore[arg-type]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(JobInputError, match=f"the hub refused the download \\({status}\\)") as err:
        sources.resolve_model("hf://acme/private-sd", tmp_path, sources.S3Settings())
    assert isinstance(err.value, AccessDenied) is denied


@pytest.mark.parametrize(
    ("error", "code"),
    [(JobInputError("s3://m/x: no objects"), 2), (AccessDenied("s3://m/x: S3 refused (403)"), 4)],
)
def test_inputs_refused_in_a_pod_leave_the_reason_as_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: JobInputError, code: int
) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(log))
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))

    def refuse(*args: Any) -> Path:
        raise error

    monkeypatch.setattr(run, "resolve_model", refuse)
    job = FineTuneJob.model_validate(lora_job(output={"uri": str(tmp_path / "out")}))
    spec = job.spec.training_spec()
    assert run.run_local(spec, "dog-lora", 1, None) == code
    assert not log.exists()  # `finetune run` is not a pod
    assert run.run_in_pod(spec, "dog-lora") == code
    assert log.read_text() == str(error)
