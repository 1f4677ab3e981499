"""A run in a "pod" reports progress, checkpoints and results to its job's status,
through the (emulated) Kubernetes API."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from finetune.api.status import FineTuneJobStatus
from tests.emulator import emulated_cluster
from tests.operator.conftest import Kube
from tests.trainer.jobs import finetune_run, job_file, prior_preservation_job, status_env

pytestmark = pytest.mark.slow

RESOURCE = "finetune.dev/v1alpha1/finetunejobs"


def test_a_run_reports_progress_checkpoints_and_artifacts(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": 4},
        checkpointing={"everyNSteps": 2},
        # Its denoising steps move lastHeartbeat (rank 0's reporter).
        validation={"prompts": ["a photo of sks disc"], "everyNSteps": 4, "inferenceSteps": 2},
    )
    with emulated_cluster() as cluster:
        Kube(cluster.url).create_job(yaml.safe_load(job.read_text()), "team-a")
        env = status_env(tmp_path, cluster.url, namespace="team-a", token="pod-token")
        finetune_run(job, nproc=1, env=env)
        versions = cluster.handler.objects[RESOURCE, "team-a", "tiny", :]

    statuses = [FineTuneJobStatus.model_validate(v.get("status", {})) for v in versions]
    steps = [s.progress.step for s in statuses if s.progress is not None]
    assert steps == sorted(steps)
    assert steps[-1] == 4
    checkpoints = [s.last_checkpoint for s in statuses if s.last_checkpoint is not None]
    assert checkpoints[-1].step == 4
    assert checkpoints[-1].uri.endswith("checkpoints/step-00000004")

    out = tmp_path / "out"
    (final,) = [s.artifacts for s in statuses if s.artifacts]
    weights = out / "pytorch_lora_weights.safetensors"
    assert [(a.uri, a.kind) for a in final if a.kind != "samples"] == [
        (str(weights), "lora"),
        (str(out / "README.md"), "modelCard"),
    ]
    assert str(out / "samples" / "step-00000004" / "grid.png") in [a.uri for a in final]
    assert final[0].sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_a_failing_worker_leaves_its_reason_as_termination_message(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    # Class images are checked where a worker reads them (rank 0 may have just made
    # them): a broken one is a failure inside a worker.
    classes = tmp_path / "classes"
    classes.mkdir()
    (classes / "a.png").write_bytes((next(disc_images.glob("*.png"))).read_bytes())
    (classes / "b.png").write_bytes(b"half a png")
    job = prior_preservation_job(tmp_path, tiny_model, disc_images, str(classes))
    log = tmp_path / "termination-log"
    finetune_run(job, nproc=2, env={"FINETUNE_TERMINATION_LOG": str(log)}, expect=2)
    assert log.read_text().startswith(
        f"spec.data.concepts[0].classImages.uri: {classes / 'b.png'}: not a readable image"
    )
