"""Checkpoints and resume: a crashed or interrupted job continues where it stopped
and ends exactly where an uninterrupted one would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune.assets import build_model
from finetune.trainer.engine.trainer import CRASH_AFTER_STEP_ENV
from finetune.trainer.engine.zero import device_memory
from tests.trainer.jobs import FINETUNE, finetune_run, job_file, refused, train_log

pytestmark = pytest.mark.slow


def lora_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "pytorch_lora_weights.safetensors")


def test_crash_after_checkpoint_then_resume_matches_uninterrupted_run(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    spec = {
        "training": {"maxSteps": 6, "lrScheduler": "cosine", "lrWarmupSteps": 2},
        "data": {"randomFlip": True},
    }
    (tmp_path / "straight").mkdir()
    straight = job_file(tmp_path / "straight", tiny_model, disc_images, **spec)
    finetune_run(straight)

    crashed_dir = tmp_path / "crashed"
    crashed_dir.mkdir()
    crashed = job_file(crashed_dir, tiny_model, disc_images, **spec)
    first = finetune_run(crashed, env={CRASH_AFTER_STEP_ENV: "4"}, expect=None)
    assert first.returncode != 0
    out = crashed_dir / "out"
    assert not (out / "pytorch_lora_weights.safetensors").exists(), (
        "a crashed run left final weights"
    )
    checkpoint = out / "checkpoints" / "step-00000003"
    assert (checkpoint / "manifest.json").exists()
    rng = [
        torch.load(checkpoint / f"rng-rank000{r}.pt", weights_only=False)["torch"] for r in (0, 1)
    ]
    assert not torch.equal(rng[0], rng[1]), "each rank keeps its own RNG state"

    second = finetune_run(crashed)
    assert "resumed from" in second.stderr
    assert "step-00000003" in second.stderr
    assert [e["step"] for e in train_log(out)] == [1, 2, 3, 4, 5, 6]

    expected, actual = lora_weights(tmp_path / "straight" / "out"), lora_weights(out)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": 4},
        checkpointing={"everyNSteps": 2},
    )
    assert finetune_run(job, env={CRASH_AFTER_STEP_ENV: "4"}, expect=None).returncode != 0
    newest = tmp_path / "out" / "checkpoints" / "step-00000004"
    manifest = json.loads((newest / "manifest.json").read_text())
    victim = newest / manifest["files"][0]["path"]
    victim.write_bytes(victim.read_bytes()[:-10] + b"corrupted!")

    result = finetune_run(job)
    assert "does not match its manifest" in result.stderr
    assert "resumed from" in result.stderr
    assert "step-00000002" in result.stderr


def test_resume_refuses_what_it_cannot_continue_and_logs_each_step_once(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    def job(max_steps: int, every: int) -> Path:
        return job_file(
            tmp_path,
            tiny_model,
            disc_images,
            training={"maxSteps": max_steps},
            checkpointing={"everyNSteps": every, "keepLast": 3},
        )

    out, root = tmp_path / "out", tmp_path / "out" / "checkpoints"
    finetune_run(job(6, 2), nproc=1)
    assert checkpoint_steps(root) == [2, 4, 6]

    refused(
        job(3, 2),
        "spec.training.maxSteps: 3 is below step 6 of the newest checkpoint",
        "raise it to at least 6, or remove the checkpoints",
        nproc=1,
    )

    truncate(root / "step-00000006" / "mp_rank_00_model_states.pt")
    resumed = finetune_run(job(8, 5), nproc=1)
    assert "step-00000004 (step 4)" in resumed.stderr
    assert [e["step"] for e in train_log(out)] == list(range(1, 9)), "each step once"
    # Kept: the newest three that verify (8, the last step's, then 5 and 4); 6 is not
    # one of them.
    assert checkpoint_steps(root) == [4, 5, 6, 8]

    weights = lora_weights(out)
    truncate(root / "step-00000004" / "manifest.json", 20)
    (root / "step-00000005" / "rng-rank0000.pt").unlink()
    truncate(root / "step-00000008" / "mp_rank_00_model_states.pt")
    message = refused(
        job(10, 5),
        f"{root}: none of the run's checkpoints can be resumed from (step-00000004: "
        "manifest.json is not a readable manifest; step-00000005: rng-rank0000.pt is "
        "missing; step-00000006: mp_rank_00_model_states.pt does not match its manifest "
        "(size or SHA-256); step-00000008: mp_rank_00_model_states.pt does not match its "
        f"manifest (size or SHA-256)); restore them, or remove {root} to start the run over "
        "from step 0",
        nproc=1,
    )
    assert message.startswith("error: ")
    assert [e["step"] for e in train_log(out)] == list(range(1, 9)), "nothing trained"
    for key, value in lora_weights(out).items():
        assert torch.equal(value, weights[key]), "the results are the resumed run's"


def checkpoint_steps(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in root.iterdir())


def truncate(path: Path, size: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:size])


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(
    tmp_path: Path, tiny_model: Path, disc_images: Path, processes: list[subprocess.Popen[str]]
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": 400},
        checkpointing={"everyNSteps": 400},
    )
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [str(FINETUNE), "run", str(job), "--nproc", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    processes.append(process)
    log = tmp_path / "out" / "train_log.jsonl"
    deadline = time.monotonic() + 600  # the first start may build DeepSpeed's comm op
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    stopped_at = train_log(tmp_path / "out")[-1]["step"]
    assert f"Stopped at step {stopped_at}; checkpoint saved" in stdout
    checkpoint = tmp_path / "out" / "checkpoints" / f"step-{stopped_at:08d}"
    assert (checkpoint / "manifest.json").exists()
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()

    short = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": stopped_at + 2},
        checkpointing={"everyNSteps": 1},
    )
    resumed = finetune_run(short)
    assert f"step-{stopped_at:08d}" in resumed.stderr
    assert train_log(tmp_path / "out")[-1]["step"] == stopped_at + 2


def test_prior_preservation_generates_class_images_once(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        method="dreambooth",
        training={"priorPreservation": True, "maxSteps": 2},
        checkpointing={"everyNSteps": 2},
        data={
            "concepts": [
                {
                    "instanceImages": str(disc_images),
                    "instancePrompt": "a photo of sks disc",
                    "classPrompt": "a photo of a disc",
                    "classImages": {"count": 3},
                }
            ]
        },
    )
    finetune_run(job, nproc=1)
    generated = sorted((tmp_path / "out" / "class_images" / "concept-0").glob("*.png"))
    assert len(generated) == 3
    stamps = [p.stat().st_mtime_ns for p in generated]

    finetune_run(job, nproc=1)  # a finished job run again: nothing is regenerated
    assert [p.stat().st_mtime_ns for p in generated] == stamps


def test_a_checkpoint_from_a_different_layout_is_refused_clearly(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": 2},
        checkpointing={"everyNSteps": 2},
    )
    finetune_run(job, nproc=2)
    bigger = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": 4},
        checkpointing={"everyNSteps": 2},
    )
    result = finetune_run(bigger, nproc=1, expect=2)
    assert (
        "step-00000002: this checkpoint was written by a run laid out differently (ranks 2 -> 1)"
        in result.stderr
    )


def test_a_bf16_run_trains_fp32_masters_and_resumes(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    """bf16 under the precision plan: adapters train in fp32 with the frozen base in
    bf16, the log says so, and a checkpoint of that plan resumes."""
    spec = {
        "training": {"mixedPrecision": "bf16", "maxSteps": 2},
        "checkpointing": {"everyNSteps": 2},
    }
    first = finetune_run(job_file(tmp_path, tiny_model, disc_images, **spec))
    plan = next(line for line in first.stderr.splitlines() if "precision plan" in line)
    assert "precision plan (bf16, forward under autocast): trained: 64 float32; " in plan
    assert "frozen in the trained modules: 208 bfloat16; vae: 124 bfloat16" in plan
    # A tiny model's training state fits anywhere: the optimizer steps it directly.
    zero = next(line for line in first.stderr.splitlines() if "ZeRO stage" in line)
    assert zero.endswith(
        "fit in half of this rank's share of host memory's "
        f"{device_memory(torch.device('cpu'), ranks_on_node=2) / 2**30:.1f} GiB; the optimizer steps the weights directly"
    )
    assert "ZeRO stage 0: trained weights with their gradients and Adam state 0.00 GiB" in zero

    spec["training"]["maxSteps"] = 4
    resumed = finetune_run(job_file(tmp_path, tiny_model, disc_images, **spec))
    assert "resumed from" in resumed.stderr
    assert "step-00000002" in resumed.stderr
    weights = lora_weights(tmp_path / "out")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_run_left_to_choose_its_zero_stage_resumes_under_its_checkpoints_stage(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    """A checkpoint's optimizer state is laid out for its ZeRO stage: a run that leaves
    the stage to the trainer goes on under the checkpoint's, and says why."""
    spec: dict[str, Any] = {
        "training": {"maxSteps": 2},
        "checkpointing": {"everyNSteps": 2},
        "deepspeed": {"zeroStage": 2},
    }
    first = finetune_run(job_file(tmp_path, tiny_model, disc_images, **spec))
    assert "ZeRO stage 2: set by spec.deepspeed.zeroStage" in first.stderr

    spec["training"]["maxSteps"] = 4
    del spec["deepspeed"]
    resumed = finetune_run(job_file(tmp_path, tiny_model, disc_images, **spec))
    assert "ZeRO stage 2: the checkpoint being resumed was written under ZeRO-2" in resumed.stderr
    assert "step-00000002 (step 2)" in resumed.stderr
    assert lora_weights(tmp_path / "out"), "the run finished with its weights"


UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def two_step_job(folder: Path, model: Path, images: Path, **training: Any) -> Path:
    """A job checkpointing at step 2: trains to 2 steps, or resumes from that checkpoint."""
    return job_file(
        folder,
        model,
        images,
        training={"maxSteps": 2, **training},
        checkpointing={"everyNSteps": 2},
    )


def test_a_model_replaced_at_the_same_uri_is_refused_until_it_is_restored(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    model = shutil.copytree(tiny_model, tmp_path / "model")
    finetune_run(two_step_job(tmp_path, model, disc_images))
    # Another model of the same architecture: the same files, sizes and config.
    other = build_model(tmp_path / "other", seed=1)
    assert (other / UNET_WEIGHTS).stat().st_size == (model / UNET_WEIGHTS).stat().st_size
    shutil.copyfile(other / UNET_WEIGHTS, model / UNET_WEIGHTS)

    longer = two_step_job(tmp_path, model, disc_images, maxSteps=4)
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000002"
    message = refused(
        longer,
        f"spec.baseModel.uri ({model}): the files there are not those of the model "
        f"checkpoint {checkpoint} was trained on",
        "restore that model, or remove the checkpoints to start over",
    )
    assert "another version of the trainer" not in message

    shutil.copyfile(tiny_model / UNET_WEIGHTS, model / UNET_WEIGHTS)
    resumed = finetune_run(longer)
    assert "step-00000002 (step 2)" in resumed.stderr


def test_a_changed_spec_is_refused_before_the_model_loads(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    model = shutil.copytree(tiny_model, tmp_path / "model")
    finetune_run(two_step_job(tmp_path, model, disc_images))
    # Loading the model would fail now: the refusal comes before it is tried.
    (model / UNET_WEIGHTS).unlink()
    refused(
        two_step_job(tmp_path, model, disc_images, maxSteps=4, learningRate=2e-3),
        "step-00000002: this checkpoint was written by a run laid out differently "
        "(spec.training.learningRate 0.001 -> 0.002); run with the same settings",
    )


def test_a_checkpoint_that_records_no_model_fingerprint_resumes(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    finetune_run(two_step_job(tmp_path, tiny_model, disc_images), nproc=1)
    root = tmp_path / "out" / "checkpoints"
    # As a trainer before the fingerprints wrote it.
    path = root / "step-00000002" / "manifest.json"
    document = json.loads(path.read_text())
    assert list(document["layout"].pop("models")) == ["spec.baseModel.uri"]
    path.write_text(json.dumps(document))

    resumed = finetune_run(two_step_job(tmp_path, tiny_model, disc_images, maxSteps=4), nproc=1)
    assert (
        f"{root / 'step-00000002'} records no fingerprint of the models it was trained on "
        "(an earlier trainer wrote it): the model could not be checked against it"
    ) in resumed.stderr
    assert "step-00000002 (step 2)" in resumed.stderr
    newer = json.loads((root / "step-00000004" / "manifest.json").read_text())
    assert list(newer["layout"]["models"]) == ["spec.baseModel.uri"], "recorded from now on"
