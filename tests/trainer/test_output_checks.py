"""What `finetune run` checks before any worker starts, as a user meets it: `--nproc`,
an output that cannot be written, a class-images folder that is a file, S3 without
credentials or out of reach, an output another run holds, and Ctrl-C while S3 is being
retried. None of these trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import boto3
import pytest

from tests.trainer.jobs import FINETUNE, finetune_run, job_file, prior_preservation_job
from tests.trainer.s3faults import CREDENTIALS, Moto, free_port, moto  # noqa: F401

NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip().splitlines()[-1]


def no_worker_started(output: Path) -> bool:
    return not list(output.glob(".run/plan-*.json")) and not (output / "train_log.jsonl").exists()


def s3_job(folder: Path, images: Path, endpoint: str) -> Path:
    """A job writing to `s3://runs/job` at `endpoint`; the model is never reached."""
    return job_file(
        folder, folder, images, output={"uri": "s3://runs/job", "s3EndpointUrl": endpoint}
    )


def test_unreachable_hub_exits_1_after_retries(tmp_path: Path, disc_images: Path) -> None:
    job = job_file(tmp_path, tmp_path, disc_images, baseModel={"uri": "hf://acme/tiny-sd"})
    env = {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_HOME": str(tmp_path / "hf"),
        "FINETUNE_S3_RETRY_SECONDS": "2",
    }
    result = finetune_run(job, nproc=1, env=env, expect=1)
    assert "hf://acme/tiny-sd: the hub cannot be reached (retried for 2 s" in last_line(result)
    assert no_worker_started(tmp_path / "out")


@pytest.mark.parametrize("nproc", [0, -1, (os.cpu_count() or 1) + 1])
def test_nproc_out_of_range(tmp_path: Path, nproc: int) -> None:
    job = job_file(tmp_path, tmp_path / "model", tmp_path / "images")
    result = finetune_run(job, nproc=nproc, expect=2)
    assert f"--nproc {nproc}: must be between 1 and" in last_line(result)


def test_output_is_a_file(tmp_path: Path, tiny_model: Path, disc_images: Path) -> None:
    output = tmp_path / "out"
    output.write_text("not a folder")
    job = job_file(tmp_path, tiny_model, disc_images)
    result = finetune_run(job, nproc=1, expect=2)
    assert last_line(result) == f"error: spec.output.uri: {output} is a file, not a folder"


def test_class_images_folder_is_a_file(tmp_path: Path, tiny_model: Path, disc_images: Path) -> None:
    """Missing class images are generated into `classImages.uri`: a file there is refused
    before the model loads, not when rank 0 first writes."""
    taken = tmp_path / "classes.png"
    taken.write_bytes(b"not a folder")
    job = prior_preservation_job(tmp_path, tiny_model, disc_images, str(taken))
    result = finetune_run(job, nproc=1, expect=2)
    field = "spec.data.concepts[0].classImages.uri"
    assert last_line(result) == f"error: {field}: {taken} is a file, not a folder"
    assert no_worker_started(tmp_path / "out")


def test_output_holding_files_of_the_users_own(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    """A run would replace the user's README.md and weights and mix its log with theirs."""
    output = tmp_path / "out"
    output.mkdir()
    mine = {"README.md": "my notes", "pytorch_lora_weights.safetensors": "mine", "a.txt": ""}
    for name, text in mine.items():
        (output / name).write_text(text)
    (output / ".DS_Store").write_text("")  # hidden files alone would not count
    job = job_file(tmp_path, tiny_model, disc_images)
    result = finetune_run(job, nproc=1, expect=2)
    assert last_line(result) == (
        f"error: spec.output.uri: {output} holds files no finetune run wrote "
        "(README.md, a.txt, pytorch_lora_weights.safetensors); choose a new or empty folder"
    )
    assert {p.name: p.read_text() for p in output.iterdir() if p.name in mine} == mine
    assert no_worker_started(output)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_read_only_folder(tmp_path: Path, tiny_model: Path, disc_images: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    output.chmod(0o555)
    job = job_file(tmp_path, tiny_model, disc_images)
    result = finetune_run(job, nproc=1, expect=2)
    assert f"spec.output.uri: {output} cannot be written" in last_line(result)
    assert no_worker_started(output)


def test_output_where_nothing_may_be_written(tmp_path: Path, disc_images: Path) -> None:
    """Even root cannot make a folder in sysfs: the same refusal, for any user."""
    output = Path("/sys/finetune-test-output")
    job = job_file(tmp_path, tmp_path, disc_images, output={"uri": str(output)})
    result = finetune_run(job, nproc=1, expect=2)
    assert f"spec.output.uri: {output} cannot be written" in last_line(result)


def test_s3_output_without_credentials(tmp_path: Path, disc_images: Path) -> None:
    job = s3_job(tmp_path, disc_images, f"http://127.0.0.1:{free_port()}")
    result = finetune_run(job, nproc=1, env={**NO_CREDENTIALS, "HOME": str(tmp_path)}, expect=4)
    message = last_line(result)
    assert "spec.output.uri" in message
    assert "no S3 credentials" in message
    assert "AWS_ACCESS_KEY_ID" in message
    assert "credentialsSecretRef" not in message


@pytest.mark.parametrize(
    ("credentials", "problem"),
    [
        ({"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}, "missing: AWS_SECRET_ACCESS_KEY"),
        ({"AWS_PROFILE": "no-such-profile"}, "The config profile (no-such-profile) could not"),
    ],
    ids=["key-without-secret", "unknown-profile"],
)
def test_s3_credentials_that_cannot_be_complete(
    tmp_path: Path, disc_images: Path, credentials: dict[str, str], problem: str
) -> None:
    """Refused like missing ones (exit 4, what to set), not with botocore's traceback."""
    job = s3_job(tmp_path, disc_images, f"http://127.0.0.1:{free_port()}")
    env = {**NO_CREDENTIALS, "HOME": str(tmp_path), **credentials}
    message = last_line(finetune_run(job, nproc=1, env=env, expect=4))
    assert "spec.output.uri" in message
    assert problem in message
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message


def test_unreachable_s3_exits_1_after_retries(tmp_path: Path, disc_images: Path) -> None:
    job = s3_job(tmp_path, disc_images, f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = finetune_run(
        job, nproc=1, env={**CREDENTIALS, "FINETUNE_S3_RETRY_SECONDS": "2"}, expect=1
    )
    assert "S3 cannot be reached after retrying for 2 s" in last_line(result)
    assert "trying again" in result.stderr
    assert time.monotonic() - started < 120


def test_ctrl_c_during_s3_retries(
    tmp_path: Path, disc_images: Path, processes: list[subprocess.Popen[str]]
) -> None:
    job = s3_job(tmp_path, disc_images, f"http://127.0.0.1:{free_port()}")
    env = {
        **os.environ,
        **CREDENTIALS,
        "FINETUNE_CACHE_DIR": str(tmp_path / "cache"),
        "FINETUNE_S3_RETRY_SECONDS": "3600",
    }
    process = subprocess.Popen(
        [str(FINETUNE), "run", str(job), "--nproc", "1"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    processes.append(process)
    assert process.stderr is not None
    for line in process.stderr:  # the retries have begun: an observable event
        if "trying again" in line:
            break
    else:
        pytest.fail(f"exited {process.wait()} before retrying")
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = process.wait(timeout=60)
    assert time.monotonic() - sent < 5
    assert code == 130
    assert "Stopped before training began" in process.stderr.read()


def test_s3_output_held_by_another_run(
    tmp_path: Path,
    disc_images: Path,
    moto: Moto,  # noqa: F811
) -> None:
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="runs")
    holder = {"host": "gpu-box-7", "pid": 4242, "since": "2026-12-01T12:00:00+00:00"}
    client.put_object(Bucket="runs", Key="job/.run/lease.json", Body=json.dumps(holder).encode())
    job = s3_job(tmp_path, disc_images, moto.url)
    result = finetune_run(job, nproc=1, env=CREDENTIALS, expect=2)
    message = last_line(result)
    assert "spec.output.uri: s3://runs/job is in use by another run" in message
    assert "host gpu-box-7, pid 4242, since 2026-12-01T12:00:00+00:00" in message
    # The lease and the output are as they were: nothing was written.
    assert json.loads(client.get_object(Bucket="runs", Key="job/.run/lease.json")["Body"].read())
    listed = client.list_objects_v2(Bucket="runs", Prefix="job/").get("Contents", [])
    assert [item["Key"] for item in listed] == ["job/.run/lease.json"]


def test_s3_output_holding_objects_of_the_users_own(
    tmp_path: Path,
    disc_images: Path,
    moto: Moto,  # noqa: F811
) -> None:
    """As a folder is: a run would write over the README.md and weights kept there. A
    prefix a run wrote (a finished run's train log, a killed run's class images) is a
    run's to continue."""
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="runs")
    mine = ["job/README.md", "job/unet/config.json", "job/class_images/concept-0/a.png"]
    for key in mine:
        client.put_object(Bucket="runs", Key=key, Body=b"mine")
    job = s3_job(tmp_path, disc_images, moto.url)
    result = finetune_run(job, nproc=1, env=CREDENTIALS, expect=2)
    assert last_line(result) == (
        "error: spec.output.uri: s3://runs/job holds objects no finetune run wrote "
        "(README.md, unet); choose a new or empty prefix"
    )
    listed = client.list_objects_v2(Bucket="runs", Prefix="job/").get("Contents", [])
    assert sorted(item["Key"] for item in listed) == sorted(mine), "nothing written or deleted"

    # The same names beside a train log are a run's results: past this check, the run
    # goes on to the model, which this job does not have.
    client.put_object(Bucket="runs", Key="job/train_log.jsonl", Body=b"")
    result = finetune_run(job, nproc=1, env=CREDENTIALS, expect=2)
    assert "holds objects no finetune run wrote" not in result.stderr
    assert "not a diffusers Stable Diffusion folder" in last_line(result)
