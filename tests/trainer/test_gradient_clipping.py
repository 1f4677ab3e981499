"""`training.maxGradNorm` bounds every update, whoever clips (the trainer under ZeRO-0,
DeepSpeed otherwise): clipped to almost nothing, AdamW barely moves a LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.trainer.jobs import finetune_run, job_file

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_tiny_max_grad_norm_holds_the_lora_still(
    tmp_path: Path, tiny_model: Path, disc_images: Path, zero_stage: int
) -> None:
    job = job_file(
        tmp_path,
        tiny_model,
        disc_images,
        # With gradients clipped to a norm of 1e-12, AdamW's eps (1e-8) dwarfs them: its
        # steps shrink by about 1e-4, where unclipped ones move each weight by ~lr.
        training={"maxSteps": 2, "learningRate": 1e-2, "maxGradNorm": 1e-12},
        deepspeed={"zeroStage": zero_stage},
        checkpointing={"everyNSteps": 2},
    )
    finetune_run(job, nproc=1 if zero_stage == 0 else 2)
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    # The B matrices start at zero: what they hold now is what the two steps moved them.
    moved = max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k)
    assert 0 < moved < 1e-4, moved
