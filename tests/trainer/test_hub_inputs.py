"""hf:// base models through huggingface_hub, revision pinned. No hub is reachable here,
so the test lays the model into huggingface_hub's own cache layout and runs offline:
the real `snapshot_download` resolves the revision and hands over the snapshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.hub_server import StandInHub
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


def test_the_teacher_downloads_with_its_own_token(tmp_path: Path, tiny_model: Path) -> None:
    """A gated base model and a gated teacher, each readable with its own token: each
    download carries that model's token (HF_TOKEN for the base model, the operator's
    FINETUNE_TEACHER_HF_TOKEN for the teacher)."""

    def job(folder: Path) -> Path:
        folder.mkdir()
        (folder / "dataset").mkdir()
        return job_file(
            folder,
            tiny_model,
            Path("unused"),
            method="lcmLora",
            baseModel={"uri": "hf://acme/base"},
            data={"concepts": None, "dataset": {"uri": str(folder / "dataset")}},
            lcm={"teacherModel": {"uri": "hf://acme/teacher"}},
        )

    repos = {
        "acme/base": (tiny_model, "base-secret"),
        "acme/teacher": (tiny_model, "teacher-secret"),
    }
    with StandInHub(repos) as hub:
        env = {
            "HF_HUB_OFFLINE": "0",
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_TOKEN": "base-secret",
            "FINETUNE_TEACHER_HF_TOKEN": "teacher-secret",
        }
        # Both models come through; the run stops at the next input, an empty dataset.
        result = finetune_run(job(tmp_path / "own"), nproc=1, env=env, expect=2)
        assert "spec.data.dataset" in result.stderr
        assert hub.tokens == {"acme/base": {"base-secret"}, "acme/teacher": {"teacher-secret"}}
        assert "-secret" not in result.stdout + result.stderr

        # Without a token of its own the teacher is asked for with the base model's, which
        # the gated teacher refuses: the message names the field that sets the teacher's.
        env["FINETUNE_TEACHER_HF_TOKEN"] = ""
        refused = finetune_run(job(tmp_path / "shared"), nproc=1, env=env, expect=4)
        assert (
            "hf://acme/teacher: the repository is gated; set a token with access "
            "(spec.lcm.teacherModel.hubTokenSecretRef)"
        ) in refused.stderr
