"""The same command run again after a run finished (or stopped early): it resumes from the
last checkpoint, trains nothing, and leaves the results and the logs as the first run
left them (model card, weights, samples, train log, TensorBoard files); the job's status
shows the finished run's progress, loss and scores."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from finetune.trainer.engine.trainer import CRASH_AFTER_STEP_ENV
from tests.fake_status_api import FakeApi
from tests.trainer.jobs import PROMPT, finetune_run, job_file, status_env, train_log

pytestmark = pytest.mark.slow

FLAT = 1e-9  # the samples (and so every score) stay the same: a flat metric


def validation(evaluators: tuple[Path, Path], every: int, metrics: list[str]) -> dict[str, Any]:
    clip, dino = evaluators
    return {
        "prompts": [PROMPT],
        "everyNSteps": every,
        "imagesPerPrompt": 1,
        "inferenceSteps": 2,
        "metrics": metrics,
        "evaluator": {"clipModel": str(clip), "dinoModel": str(dino)},
    }


def files(out: Path) -> dict[str, str]:
    """Every file of the output (`.run`, the run's lease, aside) with its SHA-256."""
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).parts[0] != ".run"
    }


def events(out: Path) -> Counter[tuple[str, int]]:
    """The train log's lines by (what they record, step)."""
    kinds = ("loss", "validation", "earlyStopped")
    return Counter(
        (next(k for k in kinds if k in entry), entry["step"]) for entry in train_log(out)
    )


def final_loss(out: Path) -> str:
    """The model card's "(final loss X)"; the test fails without one."""
    found = re.search(r"\(final loss ([0-9.]+)\)", (out / "README.md").read_text())
    assert found, "the model card lost the final loss"
    return found.group(1)


def test_a_finished_run_run_again_leaves_its_results_and_logs_as_they_were(
    tmp_path: Path,
    tiny_model: Path,
    disc_images: Path,
    tiny_evaluators: tuple[Path, Path],
    api: FakeApi,
) -> None:
    # The last step, 5, is no multiple of the interval: it is checkpointed as the last.
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": 5},
        validation=validation(tiny_evaluators, 2, ["clipText", "dino"]),
        checkpointing={"everyNSteps": 2},
    )
    out = tmp_path / "out"
    finetune_run(job)
    first, card, log = files(out), (out / "README.md").read_text(), train_log(out)
    assert final_loss(out) == f"{log[-2]['loss']:.4f}"  # step 5's, before its validation
    assert max(events(out).values()) == 1

    # Run again, as in a pod of a job created anew (its status empty).
    again = finetune_run(job, env=status_env(tmp_path, api.url))
    assert "step-00000005 (step 5)" in again.stderr
    assert f"Done: 5 steps; results in {out}" in again.stdout
    assert (out / "README.md").read_text() == card
    assert train_log(out) == log, "the train log is the first run's, no line added"
    assert files(out) == first, "weights, samples, card and TensorBoard files as they were"

    progress = [s["progress"] for s in api.statuses() if s.get("progress")]
    assert progress, "the run reported no progress"
    last = progress[-1]
    assert (last["step"], last["totalSteps"], last["percent"]) == (5, 5, 100)
    assert last["loss"] == pytest.approx(log[-2]["loss"])
    assert last["metrics"]["clipText"] == pytest.approx(log[-1]["validation"]["clipText"])


def test_a_run_that_stopped_early_run_again_stops_once(
    tmp_path: Path,
    tiny_model: Path,
    disc_images: Path,
    tiny_evaluators: tuple[Path, Path],
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={
            "maxSteps": 20,
            "learningRate": FLAT,
            "earlyStopping": {"metric": "clipText", "patience": 2},
        },
        validation=validation(tiny_evaluators, 1, ["clipText"]),
        # Step 3, where the run stops, is no multiple of the interval: its checkpoint,
        # saved as the run's last, is the one run again resumes.
        checkpointing={"everyNSteps": 4},
    )
    out = tmp_path / "out"
    finetune_run(job)
    first, card = files(out), (out / "README.md").read_text()
    assert events(out)[("earlyStopped", 3)] == 1
    final_loss(out)

    again = finetune_run(job)
    assert "step-00000003 (step 3)" in again.stderr
    assert "Stopped early after step 3: clipText has not improved" in again.stdout
    assert f"Done: 3 steps; results in {out}" in again.stdout
    assert (out / "README.md").read_text() == card
    counted = events(out)
    assert counted[("earlyStopped", 3)] == 1, "one earlyStopped line"
    assert max(counted.values()) == 1, f"lines logged twice: {counted}"
    assert files(out) == first


def test_a_run_that_died_after_its_last_checkpoint_validates_once_when_run_again(
    tmp_path: Path,
    tiny_model: Path,
    disc_images: Path,
    tiny_evaluators: tuple[Path, Path],
) -> None:
    """The last validation comes after the last checkpoint: a run that died in between
    has not made it, so the run again makes and logs it, once."""
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": 4},
        validation=validation(tiny_evaluators, 2, ["clipText"]),
        checkpointing={"everyNSteps": 2},
    )
    out = tmp_path / "out"
    assert finetune_run(job, env={CRASH_AFTER_STEP_ENV: "4"}, expect=None).returncode != 0
    assert [e["step"] for e in train_log(out) if "validation" in e] == [2]

    finetune_run(job)
    assert [e["step"] for e in train_log(out) if "validation" in e] == [2, 4]
    assert (out / "samples" / "step-00000004" / "grid.png").is_file()
    assert final_loss(out) == f"{train_log(out)[-2]['loss']:.4f}"


def test_a_finished_run_run_again_with_other_prompts_makes_its_samples_again(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    """Without `validation.metrics` no score tells the validations apart: the grid itself
    names the settings it was made with. Other prompts make the last step's samples
    again, none of the earlier ones left beside them; the same prompts reuse them."""

    def job(prompts: list[str]) -> Path:
        return job_file(
            tmp_path,
            tiny_model,
            disc_images,
            training={"maxSteps": 2},
            validation={"prompts": prompts, "imagesPerPrompt": 1, "inferenceSteps": 2},
            checkpointing={"everyNSteps": 2},
        )

    def rows(grid: Path) -> int:
        from PIL import Image

        with Image.open(grid) as image:
            return image.height // 64  # one row of 64 px images per prompt

    out = tmp_path / "out"
    samples = out / "samples" / "step-00000002"
    finetune_run(job([PROMPT, "a photo of a disc on a table"]))
    assert rows(samples / "grid.png") == 2

    again = finetune_run(job([PROMPT]))
    assert "resumed from" in again.stderr
    assert rows(samples / "grid.png") == 1, "the grid of the earlier prompts was reused"
    assert sorted(p.name for p in samples.iterdir()) == ["grid.png", "prompt-00-00.png"]
    made = (samples / "grid.png").stat().st_mtime_ns

    finetune_run(job([PROMPT]))
    assert (samples / "grid.png").stat().st_mtime_ns == made, "the same prompts' grid is reused"


def test_a_run_continued_without_an_output_format_drops_the_earlier_file(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    """maxSteps raised and the kohya format dropped: the step-2 kohya file is not left
    beside the step-4 LoRA, listed and uploaded as if this run had made it."""

    def job(steps: int, formats: list[str]) -> Path:
        return job_file(
            tmp_path,
            tiny_model,
            disc_images,
            training={"maxSteps": steps},
            checkpointing={"everyNSteps": 2},
            output={"formats": formats},
        )

    out = tmp_path / "out"
    finetune_run(job(2, ["diffusers", "kohya"]))
    assert (out / "pytorch_lora_weights_kohya.safetensors").is_file()
    again = finetune_run(job(4, ["diffusers"]))
    assert f"Done: 4 steps; results in {out}" in again.stdout
    assert not (out / "pytorch_lora_weights_kohya.safetensors").exists()
    assert "pytorch_lora_weights_kohya" not in (out / "README.md").read_text()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
