"""Each method trains with 2 processes under DeepSpeed on CPU (at the ZeRO stage the
trainer picks: 0 for a tiny model), and its output loads through the public diffusers
API and changes the images the pipeline makes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.jobs import (
    PROMPT,
    assert_every_adapter_loaded,
    finetune_run,
    job_file,
    render,
    train_log,
)

pytestmark = pytest.mark.slow


def base_pipeline(model: Path) -> object:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None)


def test_lora_with_text_encoder_loads_and_changes_images(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"trainTextEncoder": True, "maxSteps": 8},
        checkpointing={"everyNSteps": 4},
        validation={
            "prompts": [PROMPT],
            "everyNSteps": 4,
            "imagesPerPrompt": 2,
            "inferenceSteps": 3,
        },
        output={"formats": ["diffusers", "kohya"]},
    )
    finetune_run(job)
    out = tmp_path / "out"

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in weights)
    assert any(k.startswith("text_encoder.") for k in weights)
    assert not any("base_model.model" in k for k in weights), (
        "PEFT's raw keys instead of diffusers keys"
    )
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    assert any(k.startswith("lora_unet_") for k in kohya)
    assert any(k.startswith("lora_te1_") for k in kohya)

    pipeline = base_pipeline(tiny_model)
    before = render(pipeline)
    pipeline.load_lora_weights(out)  # type: ignore[attr-defined]
    assert_every_adapter_loaded(pipeline, weights)
    after = render(pipeline)
    assert np.abs(after - before).mean() > 1e-3

    # Only rank 0 writes outputs: one log line per step, one set of samples per interval.
    assert [entry["step"] for entry in train_log(out)] == list(range(1, 9))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000004", "step-00000008"]
    assert (out / "samples" / "step-00000008" / "grid.png").exists()
    card = (out / "README.md").read_text()
    assert str(tiny_model) in card
    assert "**lora**" in card
    assert "samples/step-00000008/grid.png" in card
    assert not (out / ".staging").exists()


def test_dreambooth_with_text_encoder_learns_and_saves_a_pipeline(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        method="dreambooth",
        training={
            "trainTextEncoder": True,
            "maxSteps": 30,
            "learningRate": 5e-4,
            "textEncoderLearningRate": 1e-4,
        },
        checkpointing={"everyNSteps": 30},
    )
    finetune_run(job)
    out = tmp_path / "out"

    # It learns: on this tiny fixed dataset the loss falls over the run.
    losses = [entry["loss"] for entry in train_log(out)]
    assert len(losses) == 30
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses

    trained = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    base = base_pipeline(tiny_model)
    for part in ("unet", "text_encoder"):
        new = dict(getattr(trained, part).named_parameters())
        old = dict(getattr(base, part).named_parameters())  # type: ignore[attr-defined]
        assert new.keys() == old.keys()
        assert any(not torch.equal(new[name], old[name]) for name in new), f"{part} did not train"
    assert np.abs(render(trained) - render(base)).mean() > 1e-3
