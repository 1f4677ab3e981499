"""The ZeRO stage a run trains under when the job leaves it to the trainer, the reason
the log gives, the engine config of each stage, and checkpoints across the choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.api import FineTuneJob
from finetune.api.training import TrainingSpec
from finetune.trainer.checkpoints import manifest
from finetune.trainer.checkpoints.layout import layout_for, zero_stage_of
from finetune.trainer.engine.deepspeed_setup import deepspeed_config
from finetune.trainer.engine.zero import GIB, ZeroChoice, choose_stage, weight_bytes
from finetune.trainer.errors import JobInputError
from tests.support import lora_job
from tests.unit.test_checkpoints import start_run


def choose(**overrides: object) -> ZeroChoice:
    settings: dict[str, object] = {
        "requested": None,
        "resumed": None,
        "offload_optimizer": False,
        "state_bytes": 16 * GIB,
        "frozen_bytes": 2 * GIB,
        "memory": 80 * GIB,
        "world": 8,
        "where": "the GPU",
    }
    return choose_stage(**{**settings, **overrides})  # type: ignore[arg-type]


def test_zero_0_when_weights_and_optimizer_state_fit_in_half_the_gpu() -> None:
    choice = choose()
    assert choice.stage == 0
    assert choice.describe() == (
        "ZeRO stage 0: trained weights with their gradients and Adam state 16.00 GiB "
        "+ frozen weights 2.00 GiB fit in half of the GPU's 80.0 GiB; "
        "the optimizer steps the weights directly"
    )


def test_zero_2_when_they_do_not_and_there_are_ranks_to_share_them() -> None:
    choice = choose(state_bytes=60 * GIB)
    assert choice.stage == 2
    assert choice.reason.endswith(
        "exceed half of the GPU's 80.0 GiB; gradients and optimizer state are split over 8 ranks"
    )
    alone = choose(state_bytes=60 * GIB, world=1)
    assert alone.stage == 0, "one rank has nothing to partition"
    assert "set spec.deepspeed.offloadOptimizer or train LoRA" in alone.reason


def test_what_the_job_or_its_checkpoint_says_comes_first() -> None:
    assert choose(requested=2) == ZeroChoice(2, "set by spec.deepspeed.zeroStage")
    assert choose(requested=1, resumed=2).stage == 1, "a set stage is checked at resume"
    assert choose(resumed=2) == ZeroChoice(
        2, "the checkpoint being resumed was written under ZeRO-2"
    )
    assert choose(offload_optimizer=True).stage == 2


def test_the_estimate_counts_fp32_training_state_and_frozen_weights_as_stored() -> None:
    trained = torch.nn.Linear(10, 10)  # 110 trained parameters
    frozen_part = torch.nn.Linear(4, 5).to(torch.bfloat16).requires_grad_(False)  # 25
    module = torch.nn.ModuleDict({"trained": trained, "frozen": frozen_part})
    vae = torch.nn.Linear(2, 3)  # 9 fp32 parameters
    assert weight_bytes(module, [vae]) == (110 * 16, 25 * 2 + 9 * 4)


def spec_with(**deepspeed: object) -> TrainingSpec:
    return FineTuneJob.model_validate(lora_job(deepspeed=deepspeed)).spec.training_spec()


def test_zero_2_is_tuned_for_the_device_and_zero_0_carries_no_zero_settings() -> None:
    spec = spec_with()
    gpu = deepspeed_config(spec, 8, 2, torch.device("cuda", 0))["zero_optimization"]
    assert gpu == {
        "stage": 2,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "overlap_comm": True,
    }
    cpu = deepspeed_config(spec, 2, 2, torch.device("cpu"))["zero_optimization"]
    assert cpu["overlap_comm"] is False, "gloo has no streams to overlap the backward with"
    assert deepspeed_config(spec, 2, 0, torch.device("cpu"))["zero_optimization"] == {"stage": 0}


def test_the_layout_records_the_stage_trained_under_whoever_chose_it() -> None:
    chosen = layout_for(spec_with(), world=2, zero_stage=0, models={})
    assert chosen["zeroStage"] == 0
    assert "spec.deepspeed.zeroStage" not in chosen
    assert layout_for(spec_with(zeroStage=0), world=2, zero_stage=0, models={}) == chosen


def test_a_checkpoint_written_before_the_choice_resumes_under_its_stage(tmp_path: Path) -> None:
    # Layouts of that time recorded the stage among the spec's fields (2 by default).
    before = {"ranks": 1, "spec.method": "lora", "spec.deepspeed.zeroStage": 2}
    checkpoints, _, _ = start_run(tmp_path, layout=before)
    checkpoints.save(2)
    found = manifest.latest(tmp_path)
    assert found is not None
    assert zero_stage_of(found) == 2

    _, engine, step = start_run(
        tmp_path, layout={"ranks": 1, "spec.method": "lora", "zeroStage": 2}
    )
    assert (step, engine.loaded) == (2, "step-00000002")
    with pytest.raises(JobInputError, match=r"laid out differently \(zeroStage 2 -> 0\); run with"):
        start_run(tmp_path, layout={"ranks": 1, "spec.method": "lora", "zeroStage": 0})
