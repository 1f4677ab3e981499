"""Checkpoints in S3 that survive faults, against moto's S3 server over HTTP on loopback:
a kill in the middle of an upload, an outage, a refusal, a corrupted object, a full disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from safetensors.torch import load_file

from finetune.trainer.checkpoints import manifest
from finetune.trainer.storage.files import cache_key
from tests.trainer.jobs import FINETUNE, finetune_run, job_file, train_log
from tests.trainer.processes import kill_tree
from tests.trainer.s3faults import CREDENTIALS, Moto, moto, throttled  # noqa: F401

pytestmark = pytest.mark.slow

OUTPUT = "s3://runs/job"
WEIGHTS = "pytorch_lora_weights.safetensors"


def s3_job(folder: Path, model: Path, images: Path, endpoint: str, **spec: Any) -> Path:
    folder.mkdir(exist_ok=True)
    return job_file(
        folder, model, images, output={"uri": OUTPUT, "s3EndpointUrl": endpoint}, **spec
    )


def work_dir(job: Path) -> Path:
    """Where an s3:// output's run keeps its local files (`finetune_run`'s cache)."""
    return job.parent / "cache" / "runs" / cache_key(OUTPUT)


def keys(client: Any, prefix: str = "job/") -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def manifests(client: Any) -> list[str]:
    return sorted(
        k.split("/")[2] for k in keys(client, "job/checkpoints/") if k.endswith("/manifest.json")
    )


def start(job: Path, nproc: int, processes: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """`finetune run` in the background, ended at teardown by `processes`."""
    env = {**os.environ, **CREDENTIALS, "FINETUNE_CACHE_DIR": str(job.parent / "cache")}
    process = subprocess.Popen(
        [str(FINETUNE), "run", str(job), "--nproc", str(nproc)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    processes.append(process)
    return process


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended early: {process.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def kill_everything(process: subprocess.Popen[str]) -> str:
    """SIGKILL the launcher and every worker at once, as when the node dies."""
    kill_tree(process)
    return process.communicate()[1]


def s3_weights(client: Any, folder: Path) -> dict[str, torch.Tensor]:
    client.download_file("runs", f"job/{WEIGHTS}", str(folder / WEIGHTS))
    weights: dict[str, torch.Tensor] = load_file(folder / WEIGHTS)
    return weights


def test_killed_mid_upload_resumes_from_the_previous_durable_checkpoint(
    tmp_path: Path,
    moto: Moto,  # noqa: F811
    tiny_model: Path,
    disc_images: Path,
    processes: list[subprocess.Popen[str]],
) -> None:
    spec: dict[str, Any] = {"training": {"maxSteps": 6}, "checkpointing": {"everyNSteps": 3}}
    (tmp_path / "straight").mkdir()
    straight = job_file(tmp_path / "straight", tiny_model, disc_images, **spec)
    finetune_run(straight)

    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="runs")
    # The trainer speaks to S3 through a proxy that sends 60 kB/s: a checkpoint (~350 kB)
    # takes seconds to go up, and the kill lands while step 6's files are half there.
    with throttled(moto.port, 60_000) as proxy:
        job = s3_job(tmp_path / "run", tiny_model, disc_images, proxy.url, **spec)
        process = start(job, nproc=2, processes=processes)

        def mid_upload() -> bool:
            found = keys(client)
            return "job/checkpoints/step-00000003/manifest.json" in found and any(
                k.startswith("job/checkpoints/step-00000006/") for k in found
            )

        wait_for(mid_upload, process, 240)
        killed = kill_everything(process)
    found = keys(client)
    assert "job/checkpoints/step-00000006/manifest.json" not in found, killed[-3000:]
    assert f"job/{WEIGHTS}" not in found

    job = s3_job(tmp_path / "run", tiny_model, disc_images, moto.url, **spec)
    second = finetune_run(job, env=CREDENTIALS)
    assert "resumed from" in second.stderr
    assert "step-00000003" in second.stderr
    assert [e["step"] for e in train_log(work_dir(job))] == [1, 2, 3, 4, 5, 6]
    assert manifests(client) == ["step-00000003", "step-00000006"]

    expected, actual = (
        load_file(tmp_path / "straight" / "out" / WEIGHTS),
        s3_weights(client, tmp_path),
    )
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    card = client.get_object(Bucket="runs", Key="job/README.md")["Body"].read().decode()
    digest = hashlib.sha256((tmp_path / WEIGHTS).read_bytes()).hexdigest()
    assert f"| `{WEIGHTS}` | {(tmp_path / WEIGHTS).stat().st_size} | `{digest}` |" in card
    assert "for 6 steps" in card


def stored_keys() -> set[str]:
    """What moto holds, read in this process (its state lives here): works while the
    server is stopped."""
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return set(s3_backends[DEFAULT_ACCOUNT_ID]["global"].get_bucket("runs").keys.keys())


def test_an_s3_outage_delays_uploads_but_not_training(
    tmp_path: Path,
    moto: Moto,  # noqa: F811
    tiny_model: Path,
    disc_images: Path,
    processes: list[subprocess.Popen[str]],
) -> None:
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="runs")
    job = s3_job(
        tmp_path,
        tiny_model,
        disc_images,
        moto.url,
        training={"maxSteps": 8},
        checkpointing={"everyNSteps": 2, "keepLast": 3},
    )
    process = start(job, nproc=1, processes=processes)
    log = work_dir(job) / "train_log.jsonl"
    wait_for(lambda: log.exists() and log.read_text().strip() != "", process, 240)
    moto.stop()  # S3 goes away after the first step
    # Training goes on to its last step while S3 does not answer...
    wait_for(lambda: '"step": 8' in log.read_text(), process, 120)
    time.sleep(2)
    assert process.poll() is None, "the run ended while checkpoints were not uploaded"
    # ... and the checkpoints it saved meanwhile are not durable yet.
    assert "job/checkpoints/step-00000008/manifest.json" not in stored_keys()
    moto.start()
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr[-3000:]
    assert "trying again" in stderr
    assert [e["step"] for e in train_log(work_dir(job))] == list(range(1, 9))
    # Nothing was lost: every checkpoint went up, and keep-last-3 applied.
    assert manifests(client) == ["step-00000004", "step-00000006", "step-00000008"]
    assert f"job/{WEIGHTS}" in keys(client)


def test_s3_refusing_the_credentials_fails_at_once(
    tmp_path: Path,
    moto: Moto,  # noqa: F811
    tiny_model: Path,
    disc_images: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moto import settings

    boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket="runs")
    # moto now checks every request's key against its IAM users: ours is unknown (403).
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    job = s3_job(
        tmp_path,
        tiny_model,
        disc_images,
        moto.url,
        training={"maxSteps": 8},
        checkpointing={"everyNSteps": 2},
    )
    result = finetune_run(job, nproc=1, env=CREDENTIALS, expect=4)
    # Refused on the first request, the launcher's test write into the output: before
    # any worker starts.
    assert result.stderr.strip().splitlines()[-1] == (
        "error: spec.output.uri: s3://runs/job: S3 refused the request (InvalidAccessKeyId)"
    )
    assert "trying again" not in result.stderr


def test_s3_refusing_an_upload_midway_fails_at_once(
    tmp_path: Path,
    moto: Moto,  # noqa: F811
    tiny_model: Path,
    disc_images: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket="runs")
    # Five more requests go unchecked (the launcher's test write and delete, its look at
    # what the output holds, its lease, then the look for a checkpoint to resume from);
    # from the first upload on, moto checks the key against its IAM users: unknown (403).
    monkeypatch.setattr(
        settings, "INITIAL_NO_AUTH_ACTION_COUNT", ActionAuthenticatorMixin.request_count + 5
    )
    job = s3_job(
        tmp_path,
        tiny_model,
        disc_images,
        moto.url,
        training={"maxSteps": 8},
        checkpointing={"everyNSteps": 2},
    )
    result = finetune_run(job, nproc=1, env=CREDENTIALS, expect=4)
    assert "error: s3://runs/job/checkpoints/step-00000002/" in result.stderr
    assert "S3 refused the request (InvalidAccessKeyId)" in result.stderr
    assert "trying again" not in result.stderr
    assert max(e["step"] for e in train_log(work_dir(job))) < 8, "failed at once, not at the end"


def test_a_corrupted_object_is_skipped_for_the_previous_checkpoint(
    tmp_path: Path,
    moto: Moto,  # noqa: F811
    tiny_model: Path,
    disc_images: Path,
) -> None:
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="runs")
    spec: dict[str, Any] = {"checkpointing": {"everyNSteps": 2}}
    job = s3_job(tmp_path, tiny_model, disc_images, moto.url, training={"maxSteps": 4}, **spec)
    finetune_run(job, nproc=1, env=CREDENTIALS)
    assert manifests(client) == ["step-00000002", "step-00000004"]
    victim = "job/checkpoints/step-00000004/mp_rank_00_model_states.pt"
    body = client.get_object(Bucket="runs", Key=victim)["Body"].read()
    client.put_object(Bucket="runs", Key=victim, Body=body[:-10] + b"corrupted!")

    shutil.rmtree(work_dir(job))  # a new pod: nothing local, all comes from S3
    job = s3_job(tmp_path, tiny_model, disc_images, moto.url, training={"maxSteps": 6}, **spec)
    result = finetune_run(job, nproc=1, env=CREDENTIALS)
    assert f"s3://runs/{victim} does not match its manifest" in result.stderr
    assert "resumed from" in result.stderr
    assert "step-00000002 (step 2)" in result.stderr
    # The train log of steps 1-2 came back from S3 with the checkpoint; 3-4 were trained again.
    assert [e["step"] for e in train_log(work_dir(job))] == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_while_saving_is_a_clear_error_and_keeps_the_last_checkpoint(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    spec: dict[str, Any] = {"checkpointing": {"everyNSteps": 2}}
    job = job_file(tmp_path, tiny_model, disc_images, training={"maxSteps": 2}, **spec)
    finetune_run(job, nproc=1)
    job = job_file(tmp_path, tiny_model, disc_images, training={"maxSteps": 4}, **spec)
    # No file may grow past 64 KiB (RLIMIT_FSIZE): a write beyond fails with EFBIG, as
    # on a full disk (Python ignores SIGXFSZ). The model states are ~130 kB.
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        ["bash", "-c", f'ulimit -f 64 && exec "{FINETUNE}" run "{job}" --nproc 1'],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 5, result.stderr[-3000:]  # EXIT_DISK_FULL
    root = tmp_path / "out" / "checkpoints"
    assert f"{root / 'step-00000004'}: no space left to save the checkpoint of step 4" in (
        result.stderr
    )
    assert "The previous checkpoint is intact" in result.stderr
    assert not (root / "step-00000004" / "manifest.json").exists()
    assert manifest.verify(root / "step-00000002") == 2
    assert manifest.latest(root) == manifest.Checkpoint(root / "step-00000002", 2)
