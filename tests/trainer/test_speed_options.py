"""The speed options a job can turn on: a compiled, channels-last UNet trains to the
same kind of result, and the compiling step is reported apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.jobs import assert_every_adapter_loaded, finetune_run, job_file, train_log

pytestmark = pytest.mark.slow


def test_a_compiled_channels_last_unet_trains_and_reports_its_compile_step(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        training={"maxSteps": 2, "compile": True, "channelsLast": True},
        checkpointing={"everyNSteps": 2},
    )
    result = finetune_run(job, nproc=1)
    compiled = [line for line in result.stderr.splitlines() if "torch.compile" in line]
    assert len(compiled) == 1, "reported once"
    assert "step 1 took" in compiled[0]
    assert "compiling the UNet included" in compiled[0]
    # ZeRO-0 (a tiny model): the optimizer holds the trained weights as they are.
    assert "channels-last: 33 trained and frozen convolution weights of the UNet" in result.stderr

    # Compiled in place, the UNet's parameter names stay its own (no `_orig_mod.`): the
    # file loads into a plain pipeline, every adapter found.
    from diffusers import StableDiffusionPipeline

    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipeline.load_lora_weights(tmp_path / "out")
    assert_every_adapter_loaded(pipeline, weights)
    assert [entry["step"] for entry in train_log(tmp_path / "out")] == [1, 2]
