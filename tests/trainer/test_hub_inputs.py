"""hf:// base models through huggingface_hub, revision pinned. No hub is reachable here,
so the test lays the model into huggingface_hub's own cache layout and runs offline:
the real `snapshot_download` resolves the revision and hands over the snapshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.trainer.jobs import finetune_run, job_file

pytestmark = pytest.mark.slow

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_base_model_from_the_hub_at_a_pinned_revision(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    repo = tmp_path / "cache" / "hub" / "models--acme--tiny-sd"
    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(COMMIT)

    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        baseModel={"uri": "hf://acme/tiny-sd@v1"},
        training={"maxSteps": 2},
        checkpointing={"everyNSteps": 2},
    )
    finetune_run(job, nproc=1, env={"HF_HUB_OFFLINE": "1"})
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()

    unknown = job_file(
        tmp_path, tiny_model, disc_images, name="other", baseModel={"uri": "hf://acme/tiny-sd@v2"}
    )
    refused = finetune_run(unknown, nproc=1, env={"HF_HUB_OFFLINE": "1"}, expect=2)
    assert "hf://acme/tiny-sd@v2" in refused.stderr
