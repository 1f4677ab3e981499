"""A Stable Diffusion 2.x-style model (it predicts v) trains end to end: the run says
which target its loss uses, and its samples come from a scheduler that reads v."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finetune.assets import build_model
from tests.trainer.jobs import PROMPT, finetune_run, job_file, render

pytestmark = pytest.mark.slow


def test_a_v_prediction_lora_trains_against_v_and_loads(tmp_path: Path, disc_images: Path) -> None:
    from diffusers import StableDiffusionPipeline

    model = build_model(tmp_path / "tiny-v", prediction_type="v_prediction")
    job = job_file(
        tmp_path,
        model,
        disc_images,
        training={"maxSteps": 2, "snrGamma": 5.0},
        checkpointing={"everyNSteps": 2},
        validation={"prompts": [PROMPT], "everyNSteps": 2, "inferenceSteps": 2},
    )
    run = finetune_run(job, nproc=1)
    assert "the UNet predicts v_prediction (its scheduler's config)" in run.stderr
    assert (tmp_path / "out" / "samples" / "step-00000002" / "grid.png").is_file()

    pipeline = StableDiffusionPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    before = render(pipeline, steps=2)
    pipeline.load_lora_weights(tmp_path / "out")
    assert np.abs(render(pipeline, steps=2) - before).mean() > 1e-4
