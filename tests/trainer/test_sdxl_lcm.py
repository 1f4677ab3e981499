"""SDXL latent consistency distillation (`lcm`, `lcmLora`): a tiny SDXL student and a
differently seeded tiny SDXL teacher, 2 processes under DeepSpeed on CPU; the results
load through diffusers' public SDXL API with LCMScheduler and change its images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from finetune.assets import build_sdxl_model
from tests.trainer.jobs import assert_every_adapter_loaded, finetune_run, refused, render
from tests.trainer.test_lcm import captioned, lcm_job

pytestmark = pytest.mark.slow
__all__ = ["captioned"]  # the fixture, used by name

PROMPT = "a red disc"
SEED = 7


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sdxl_model(tmp_path_factory.mktemp("teacher") / "tiny-sdxl-teacher", seed=1)


def sdxl_job(
    folder: Path, model: Path, teacher: Path, data: Path, method: str, **spec: object
) -> Path:
    return lcm_job(
        folder,
        model,
        str(data),
        method=method,
        lcm={"teacherModel": {"uri": str(teacher)}},
        training={"maxSteps": 4, "seed": SEED},
        checkpointing={"everyNSteps": 4},
        **spec,
    )


def test_sdxl_lcm_saves_an_sdxl_pipeline_that_samples_in_four_steps(
    tmp_path: Path, tiny_sdxl_model: Path, sdxl_teacher: Path, captioned: Path
) -> None:
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    validation = {"prompts": [PROMPT], "everyNSteps": 4, "imagesPerPrompt": 1}
    validation |= {"inferenceSteps": 4, "guidanceScale": 3.0}
    job = sdxl_job(tmp_path, tiny_sdxl_model, sdxl_teacher, captioned, "lcm", validation=validation)
    finetune_run(job)
    out = tmp_path / "out"

    pipeline = StableDiffusionXLPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    assert isinstance(pipeline.scheduler, LCMScheduler)
    assert pipeline.scheduler.config.original_inference_steps == 10
    assert pipeline.unet.config.time_cond_proj_dim == 256
    images = render(pipeline, PROMPT, steps=4, seed=3, guidance_scale=3.0)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    # The guidance scale reaches the student through its embedding, which started at
    # zero and has trained.
    assert pipeline.unet.time_embedding.cond_proj.weight.abs().max() > 0
    assert not np.array_equal(render(pipeline, PROMPT, steps=4, seed=3, guidance_scale=1.5), images)

    # The base model, sampled the same way, makes other images.
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    base.set_progress_bar_config(disable=True)
    base.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    before = render(base, PROMPT, steps=4, seed=3, guidance_scale=1.0)
    after = render(pipeline, PROMPT, steps=4, seed=3, guidance_scale=1.0)
    assert np.abs(after - before).mean() > 1e-4

    # The last validation sample came from the SDXL pipeline with the LCM scheduler: the
    # saved pipeline makes it again from the same seed, steps and guidance.
    sample = np.asarray(Image.open(out / "samples" / "step-00000004" / "prompt-00-00.png"))
    again = render(pipeline, PROMPT, steps=4, seed=SEED, guidance_scale=3.0)[0]
    assert np.abs(sample.astype(float) - np.round(again * 255)).mean() < 1.0

    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained(" in card
    assert "num_inference_steps=4" in card


def test_sdxl_lcm_lora_loads_on_the_base_pipeline_with_lcm_scheduler(
    tmp_path: Path, tiny_sdxl_model: Path, sdxl_teacher: Path, captioned: Path
) -> None:
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    job = sdxl_job(tmp_path, tiny_sdxl_model, sdxl_teacher, captioned, "lcmLora", lora={"rank": 4})
    finetune_run(job)
    out = tmp_path / "out"

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights
    assert all(k.startswith("unet.") for k in weights)
    assert not any("base_model.model" in k for k in weights), "PEFT's raw keys"

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    before = render(pipeline, PROMPT, steps=4, seed=3, guidance_scale=1.0)
    pipeline.load_lora_weights(out)
    assert_every_adapter_loaded(pipeline, weights)
    after = render(pipeline, PROMPT, steps=4, seed=3, guidance_scale=1.0)
    assert np.abs(after - before).mean() > 1e-4

    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained(" in card
    assert "LCMScheduler.from_config(" in card


def test_sdxl_lcm_refuses_a_teacher_of_another_family(
    tmp_path: Path, tiny_sdxl_model: Path, tiny_model: Path, captioned: Path
) -> None:
    job = sdxl_job(tmp_path, tiny_sdxl_model, tiny_model, captioned, "lcmLora")
    refused(job, "spec.lcm.teacherModel.uri", "StableDiffusionPipeline (sd)", "(sdxl)")
    assert not (tmp_path / "out" / "README.md").exists()
