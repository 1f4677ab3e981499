"""A run's record (train log, validation samples, TensorBoard files) in S3 that outlives
the machine, as its checkpoints do: a run stopped (as a pod is on preemption) and resumed
on a fresh node, against moto's S3 server over HTTP, ends with one record of the whole run,
and a finished run run again on a fresh node leaves its output as it was."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.trainer.jobs import finetune_run, tensorboard_images, tensorboard_scalars, train_log
from tests.trainer.s3faults import CREDENTIALS, Moto, moto  # noqa: F401
from tests.trainer.test_durable_checkpoints import keys, s3_job, start, wait_for
from tests.trainer.test_durable_checkpoints import work_dir as run_folder
from tests.trainer.test_rerun import validation

pytestmark = pytest.mark.slow


def outputs(client: Any, into: Path) -> dict[str, str]:
    """Every object of the output but its checkpoints and lease, downloaded into `into`,
    with its SHA-256."""
    found = {}
    for key in sorted(keys(client)):
        relative = key.removeprefix("job/")
        if relative.split("/")[0] in ("checkpoints", ".run"):
            continue
        path = into / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file("runs", key, str(path))
        found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def card_samples(card: str) -> dict[str, str]:
    """The sample files the model card lists, with their SHA-256."""
    rows = re.findall(r"^\| `(samples/[^`]+)` \| \d+ \| `([0-9a-f]{64})` \|$", card, re.M)
    return dict(rows)


def fresh_node(job: Path) -> None:
    """The pod starts again elsewhere: nothing of the cache (`FINETUNE_CACHE_DIR`) is there."""
    shutil.rmtree(job.parent / "cache")


def test_a_run_resumed_on_a_fresh_node_uploads_the_record_of_every_step(
    tmp_path: Path,
    moto: Moto,  # noqa: F811
    tiny_model: Path,
    disc_images: Path,
    tiny_evaluators: tuple[Path, Path],
    processes: list[subprocess.Popen[str]],
) -> None:
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="runs")
    spec: dict[str, Any] = {
        "training": {"maxSteps": 8},
        "checkpointing": {"everyNSteps": 2},
        "validation": validation(tiny_evaluators, 2, ["clipText"]),
    }
    job = s3_job(tmp_path, tiny_model, disc_images, moto.url, **spec)
    run = start(job, nproc=2, processes=processes)
    log = run_folder(job) / "train_log.jsonl"
    # Stopped (SIGTERM, as a pod is on preemption) once step 2's validation is logged.
    wait_for(lambda: log.exists() and '"validation"' in log.read_text(), run, 600)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 130, stderr[-3000:]
    stopped = re.search(r"Stopped at step (\d+); checkpoint saved", stdout)
    assert stopped is not None, stdout[-3000:]
    step = int(stopped.group(1))
    assert 2 < step < 8

    fresh_node(job)
    second = finetune_run(job, env=CREDENTIALS)
    assert f"step-{step:08d} (step {step})" in second.stderr

    out = tmp_path / "s3"
    outputs(client, out)
    entries = train_log(out)
    assert [e["step"] for e in entries if "loss" in e] == list(range(1, 9)), "each step once"
    # A stop at a validation step leaves that validation out (the run stopped first).
    validated = [s for s in (2, 4, 6, 8) if s != step]
    assert [e["step"] for e in entries if "validation" in e] == validated
    card = (out / "README.md").read_text()
    for s in validated:
        assert re.search(rf"^\| {s} \| all \| [0-9.]+ \|$", card, re.M), f"no scores of step {s}"
    listed = card_samples(card)
    assert {path.split("/")[1] for path in listed} == {f"step-{s:08d}" for s in validated}
    for path, digest in listed.items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digest, path
    # TensorBoard shows every step once, across both machines' event files.
    shown = tensorboard_scalars(out / "logs")
    assert [s for s, _ in shown["train/loss"]] == list(range(1, 9))
    assert [s for s, _ in shown["validation/clipText"]] == validated
    assert tensorboard_images(out / "logs", "validation/samples") == validated


def test_a_finished_run_run_again_on_a_fresh_node_leaves_its_output_as_it_was(
    tmp_path: Path,
    moto: Moto,  # noqa: F811
    tiny_model: Path,
    disc_images: Path,
    tiny_evaluators: tuple[Path, Path],
) -> None:
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="runs")
    spec: dict[str, Any] = {
        "training": {"maxSteps": 4},
        "checkpointing": {"everyNSteps": 2},
        "validation": validation(tiny_evaluators, 2, ["clipText"]),
    }
    job = s3_job(tmp_path, tiny_model, disc_images, moto.url, **spec)
    finetune_run(job, nproc=1, env=CREDENTIALS)
    first = outputs(client, tmp_path / "first")

    fresh_node(job)
    again = finetune_run(job, nproc=1, env=CREDENTIALS)
    assert "step-00000004 (step 4)" in again.stderr
    second = outputs(client, tmp_path / "second")
    assert second == first, "card, weights, samples, train log and TensorBoard files as they were"
    counted = Counter(
        ("validation" if "validation" in e else "step", e["step"])
        for e in train_log(tmp_path / "second")
    )
    assert max(counted.values()) == 1, f"lines logged twice: {counted}"
    listed = card_samples((tmp_path / "second" / "README.md").read_text())
    assert {path.split("/")[1] for path in listed} == {"step-00000002", "step-00000004"}


def test_samples_made_again_with_other_prompts_leave_none_of_the_earlier_in_s3(
    tmp_path: Path,
    moto: Moto,  # noqa: F811
    tiny_model: Path,
    disc_images: Path,
) -> None:
    """A finished run run again (on a fresh node) with one prompt fewer makes the last
    validation again: the output holds its images only, not the removed prompt's (which
    a later resume would fetch back, and the card would list)."""
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="runs")

    def job(prompts: list[str]) -> Path:
        return s3_job(
            tmp_path,
            tiny_model,
            disc_images,
            moto.url,
            training={"maxSteps": 2},
            checkpointing={"everyNSteps": 2},
            validation={"prompts": prompts, "imagesPerPrompt": 1, "inferenceSteps": 2},
        )

    def samples() -> list[str]:
        found = keys(client, "job/samples/step-00000002/")
        return sorted(k.rsplit("/", 1)[1] for k in found)

    finetune_run(job(["a photo of sks disc", "a disc on a table"]), nproc=1, env=CREDENTIALS)
    assert samples() == ["grid.png", "prompt-00-00.png", "prompt-01-00.png"]

    fresh_node(tmp_path / "tiny.yaml")
    finetune_run(job(["a photo of sks disc"]), nproc=1, env=CREDENTIALS)
    assert samples() == ["grid.png", "prompt-00-00.png"]
    card = tmp_path / "card.md"
    client.download_file("runs", "job/README.md", str(card))
    assert "prompt-01-00.png" not in card.read_text()
