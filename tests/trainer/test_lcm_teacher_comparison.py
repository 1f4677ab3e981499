"""What LCM distillation bought, measured at every validation: an `lcmLora` run (one
process, the tiny model as base and teacher, a tiny random CLIP) scores the student's
samples at 1, 2 and 4 steps against the teacher's many-step images of the same prompts
and seeds. The figures agree with a direct computation on the saved images and reach the
train log, TensorBoard, the Prometheus gauges, the job's status and the model card; the
teacher's images are made once and reused after a resume."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from finetune.assets import write_captioned_images
from finetune.trainer.engine.trainer import CRASH_AFTER_STEP_ENV
from tests.fake_status_api import FakeApi
from tests.fidelity import direct_clip_scores
from tests.trainer.jobs import (
    finetune_run,
    job_file,
    status_env,
    tensorboard_images,
    tensorboard_scalars,
    train_log,
)
from tests.trainer.test_validation_metrics import FakePushgateway, gateway

pytestmark = pytest.mark.slow
__all__ = ["gateway"]  # the fixture, used by name

PROMPTS = ["a red disc", "a blue disc"]
STEPS = [1, 2, 4]  # the validation's own samples are those at 2 (`inferenceSteps`)
METRICS = ["clipText", "clipImage"]


def lcm_lora_job(tmp_path: Path, model: Path, clip: Path) -> Path:
    data = write_captioned_images(tmp_path / "discs", ("red", "blue"), 2)
    return job_file(
        tmp_path,
        model,
        data,
        method="lcmLora",
        data={"concepts": None, "dataset": {"uri": str(data)}},
        lcm={"teacherModel": {"uri": str(model)}, "numDdimTimesteps": 10},
        lora={"rank": 4},
        training={"maxSteps": 4, "learningRate": 1e-3, "batchSize": 2},
        checkpointing={"everyNSteps": 2},
        validation={
            "prompts": PROMPTS,
            "everyNSteps": 2,
            "imagesPerPrompt": 1,
            "inferenceSteps": 2,
            "metrics": METRICS,
            "distillation": {"steps": STEPS, "teacherInferenceSteps": 3},
            "evaluator": {"clipModel": str(clip)},
        },
    )


def images(folder: Path, prefix: str) -> list[list[Image.Image]]:
    return [[Image.open(folder / f"{prefix}-{p:02d}-00.png").convert("RGB")] for p in (0, 1)]


def test_the_student_is_scored_against_its_teacher_at_each_step_count(
    tmp_path: Path,
    tiny_model: Path,
    tiny_evaluators: tuple[Path, Path],
    api: FakeApi,
    gateway: FakePushgateway,
) -> None:
    clip, _ = tiny_evaluators
    job = lcm_lora_job(tmp_path, tiny_model, clip)
    out = tmp_path / "out"
    teacher = out / "samples" / "teacher"

    # Interrupted after step 3: the validation of step 2 made the teacher's images.
    crashed = finetune_run(job, nproc=1, env={CRASH_AFTER_STEP_ENV: "3"}, expect=None)
    assert crashed.returncode != 0
    assert "the teacher's images: made in" in crashed.stderr
    made = {p.name: p.stat().st_mtime_ns for p in teacher.iterdir()}
    assert {"grid.png", "teacher.json", "prompt-00-00.png", "prompt-01-00.png"} <= set(made)

    env = {**status_env(tmp_path, api.url), "FINETUNE_PUSHGATEWAY_URL": gateway.url}
    resumed = finetune_run(job, nproc=1, env=env)
    assert "resumed from" in resumed.stderr
    # Read back, not made again: the same files, untouched.
    assert "the teacher's images: reused from" in resumed.stderr
    assert "the teacher's images: made in" not in resumed.stderr
    assert {p.name: p.stat().st_mtime_ns for p in teacher.iterdir()} == made

    # The train log: each validation's scores at every step count.
    scored = {e["step"]: e for e in train_log(out) if "validation" in e}
    assert sorted(scored) == [2, 4]
    final = scored[4]
    assert set(final["distillation"]) == {"1", "2", "4"}
    # The validation's own samples are the student's at `inferenceSteps`.
    assert final["distillation"]["2"] == final["validation"]

    # The numbers, from the saved images with transformers' own calls.
    folder = out / "samples" / "step-00000004"
    reference = images(teacher, "prompt")
    for steps in STEPS:
        student = images(folder, "prompt" if steps == 2 else f"steps-{steps:02d}")
        expected = direct_clip_scores(clip, PROMPTS, student, reference)
        assert final["distillation"][str(steps)] == pytest.approx(expected, abs=1e-4), steps
    assert (folder / "steps-01-grid.png").is_file()
    with Image.open(folder / "distillation-grid.png") as comparison:
        assert comparison.size == (4 * 64, 2 * 64)  # teacher, 1, 2, 4 steps; a row per sample

    # TensorBoard: `validation/<metric>@<n>steps`, and the grid beside the teacher's.
    assert tensorboard_images(out / "logs", "validation/distillation") == [2, 4]
    scalars = tensorboard_scalars(out / "logs")
    for steps in STEPS:
        for metric in METRICS:
            tag = f"validation/{metric}@{steps}steps"
            assert dict(scalars[tag])[4] == pytest.approx(final["distillation"][str(steps)][metric])

    # Prometheus: one series per metric and step count.
    text = gateway.pushes[-1]
    for steps in STEPS:
        for metric in METRICS:
            found = re.search(
                rf'finetune_distillation_score{{[^}}]*metric="{metric}"[^}}]*steps="{steps}"'
                r"[^}]*} (\S+)",
                text,
            )
            assert found is not None, f"no {metric}@{steps} in:\n{text}"
            assert float(found.group(1)) == pytest.approx(final["distillation"][str(steps)][metric])

    # The job's status: the latest scores per step count; the summary stays one number.
    statuses = api.statuses()
    latest = [s["progress"]["metrics"] for s in statuses if s.get("progress", {}).get("metrics")]
    metrics = latest[-1]
    assert metrics["summary"] == f"clipText {final['validation']['clipText']:.4f}"
    assert [d["steps"] for d in metrics["distillation"]] == STEPS
    for entry in metrics["distillation"]:
        values = final["distillation"][str(entry["steps"])]
        assert (entry["clipText"], entry["clipImage"]) == pytest.approx(
            (values["clipText"], values["clipImage"])
        )

    # The model card: a row per validation and step count.
    card = (out / "README.md").read_text()
    assert "## Student and teacher" in card
    assert "| step | student steps | clipText | clipImage |" in card
    for step, entry in scored.items():
        for steps in STEPS:
            values = entry["distillation"][str(steps)]
            cells = " | ".join(f"{values[m]:.4f}" for m in METRICS)
            assert f"| {step} | {steps} | {cells} |" in card
