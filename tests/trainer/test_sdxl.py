"""Stable Diffusion XL (the tiny random model of `finetune.assets`), trained with 2
processes under DeepSpeed on CPU; its results load through diffusers' public SDXL API."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.trainer.engine.trainer import CRASH_AFTER_STEP_ENV
from tests.trainer.jobs import (
    PROMPT,
    assert_every_adapter_loaded,
    finetune_run,
    job_file,
    refused,
    render,
    train_log,
)

pytestmark = pytest.mark.slow


def sdxl_pipeline(model: Path) -> object:
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_sdxl_lora_with_both_text_encoders_loads_and_changes_images(
    tmp_path: Path, tiny_sdxl_model: Path, disc_images: Path
) -> None:
    job = job_file(
        tmp_path,
        tiny_sdxl_model,
        disc_images,
        training={"trainTextEncoder": True, "maxSteps": 4, "mixedPrecision": "bf16"},
        checkpointing={"everyNSteps": 4},
        validation={
            "prompts": [PROMPT],
            "everyNSteps": 2,
            "imagesPerPrompt": 2,
            "inferenceSteps": 2,
        },
        output={"formats": ["diffusers", "kohya"]},
    )
    run = finetune_run(job)
    out = tmp_path / "out"

    # The family is read from model_index.json; SDXL's VAE stays float32 under bf16.
    plan = next(line for line in run.stderr.splitlines() if "precision plan" in line)
    assert re.search(r"; vae: \d+ float32(;|$)", plan), plan
    assert re.search(r"frozen in the trained modules: \d+ bfloat16;", plan), plan

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(part) for k in weights), part
    assert not any("base_model.model" in k for k in weights)
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) for k in kohya), prefix

    pipeline = sdxl_pipeline(tiny_sdxl_model)
    before = render(pipeline, steps=2)
    pipeline.load_lora_weights(out)  # type: ignore[attr-defined]
    assert_every_adapter_loaded(pipeline, weights)
    after = render(pipeline, steps=2)
    assert np.abs(after - before).mean() > 1e-3

    # Samples came from the SDXL pipeline during training and at the end.
    assert [e["step"] for e in train_log(out) if "loss" in e] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000002", "step-00000004"]
    assert (out / "samples" / "step-00000004" / "grid.png").exists()
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained(" in card
    assert "stable-diffusion-xl" in card


def test_sdxl_dreambooth_with_both_text_encoders_and_prior_preservation(
    tmp_path: Path, tiny_sdxl_model: Path, disc_images: Path
) -> None:
    """The whole UNet and both text encoders train; class images come from the SDXL
    pipeline; the result is a folder StableDiffusionXLPipeline.from_pretrained loads."""
    from diffusers import StableDiffusionXLPipeline

    classes = tmp_path / "classes"
    job = job_file(
        tmp_path,
        tiny_sdxl_model,
        disc_images,
        method="dreambooth",
        data={
            "concepts": [
                {
                    "instanceImages": str(disc_images),
                    "instancePrompt": PROMPT,
                    "classPrompt": "a photo of a disc",
                    "classImages": {"uri": str(classes), "count": 2},
                }
            ]
        },
        training={
            "trainTextEncoder": True,
            "priorPreservation": True,
            "maxSteps": 4,
            "learningRate": 5e-4,
            "batchSize": 1,
        },
        checkpointing={"everyNSteps": 4},
    )
    finetune_run(job)
    out = tmp_path / "out"
    assert len(list(classes.glob("*.png"))) == 2

    trained = StableDiffusionXLPipeline.from_pretrained(out)
    base = sdxl_pipeline(tiny_sdxl_model)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        new = dict(getattr(trained, part).named_parameters())
        old = dict(getattr(base, part).named_parameters())  # type: ignore[attr-defined]
        assert new.keys() == old.keys()
        assert any(not torch.equal(new[name], old[name]) for name in new), f"{part} did not train"
    trained.set_progress_bar_config(disable=True)
    assert np.abs(render(trained, steps=2) - render(base, steps=2)).mean() > 1e-3
    assert "StableDiffusionXLPipeline.from_pretrained(" in (out / "README.md").read_text()


def test_sdxl_lora_resumed_after_a_crash_ends_as_an_uninterrupted_run(
    tmp_path: Path, tiny_sdxl_model: Path, disc_images: Path
) -> None:
    """Flipped crops (time ids that change with the position) and both text encoders:
    a run crashed after step 4 resumes from step 3's checkpoint to the same weights."""
    spec = {
        "training": {"maxSteps": 6, "trainTextEncoder": True},
        "data": {"randomFlip": True},
    }
    results = []
    for name, env in (("straight", {}), ("crashed", {CRASH_AFTER_STEP_ENV: "4"})):
        (tmp_path / name).mkdir()
        job = job_file(tmp_path / name, tiny_sdxl_model, disc_images, **spec)
        if env:
            assert finetune_run(job, env=env, expect=None).returncode != 0
            assert "step-00000003" in finetune_run(job).stderr
        else:
            finetune_run(job)
        results.append(load_file(tmp_path / name / "out" / "pytorch_lora_weights.safetensors"))
    expected, actual = results
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_sdxl_refuses_a_method_it_cannot_train_yet(
    tmp_path: Path, tiny_sdxl_model: Path, disc_images: Path
) -> None:
    job = job_file(
        tmp_path,
        tiny_sdxl_model,
        disc_images,
        method="customDiffusion",
        data={
            "concepts": [{"instanceImages": str(disc_images), "instancePrompt": "a <new1> disc"}]
        },
        customDiffusion={"modifierTokens": ["<new1>"], "initializerTokens": ["d"]},
    )
    refused(
        job, "spec.baseModel.family", "sdxl", "customDiffusion", "dreambooth, lcm, lcmLora, lora"
    )
    assert not (tmp_path / "out" / "README.md").exists()


def test_a_family_that_does_not_match_the_folder_is_refused(
    tmp_path: Path, tiny_sdxl_model: Path, tiny_model: Path, disc_images: Path
) -> None:
    job = job_file(tmp_path, tiny_sdxl_model, disc_images, baseModel={"family": "sd"})
    refused(job, "spec.baseModel.family", "StableDiffusionXLPipeline (sdxl)")
    job = job_file(tmp_path, tiny_model, disc_images, baseModel={"family": "sdxl"})
    refused(job, "spec.baseModel.family", "StableDiffusionPipeline (sd)")


def test_auto_refuses_a_pipeline_class_it_cannot_train(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    import shutil

    model = tmp_path / "flux"
    shutil.copytree(tiny_model, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    job = job_file(tmp_path, model, disc_images)
    refused(job, "spec.baseModel.family", "auto", "FluxPipeline", "StableDiffusionXLPipeline")
