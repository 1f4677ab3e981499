"""The precision plan: which weights are stored in which dtype, for every method, and
what DeepSpeed is told."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.api import FineTuneJob
from finetune.trainer.engine.deepspeed_setup import deepspeed_config
from finetune.trainer.engine.precision import PLAN_VERSION, PrecisionPlan
from finetune.trainer.methods import method_for
from finetune.trainer.models.components import load_components
from tests.support import lcm_job, lora_job

CUSTOM = {"modifierTokens": ["<new1>"], "initializerTokens": ["a"]}
JOBS: dict[str, Any] = {
    "lora": lambda: lora_job(),
    "dreambooth": lambda: lora_job(method="dreambooth", training={"trainTextEncoder": True}),
    "customDiffusion": lambda: lora_job(
        method="customDiffusion",
        data={"concepts": [{"instanceImages": "./a", "instancePrompt": "a photo of <new1> dog"}]},
        customDiffusion=CUSTOM,
    ),
    "lcm": lambda: lcm_job(method="lcm"),
    "lcmLora": lambda: lcm_job(),
}


def spec_of(method: str, precision: str) -> Any:
    job = JOBS[method]()
    job["spec"].setdefault("training", {})["mixedPrecision"] = precision
    return FineTuneJob.model_validate(job).spec.training_spec()


@pytest.mark.parametrize("method", list(JOBS))
def test_bf16_keeps_trained_weights_fp32_and_stores_frozen_ones_in_bf16(
    method: str, tiny_model: Path
) -> None:
    spec = spec_of(method, "bf16")
    plan = PrecisionPlan.of(spec)
    trainer_method = method_for(spec, load_components(tiny_model), tiny_model)
    module = trainer_method.build()
    plan.store_models(trainer_method.frozen_models(), torch.device("cpu"))
    plan.store_frozen(module)

    trained = [p.dtype for p in module.parameters() if p.requires_grad]
    frozen = [p.dtype for p in module.parameters() if not p.requires_grad]
    assert trained, "something trains"
    assert set(trained) == {torch.float32}, "trained weights are fp32 masters"
    assert set(frozen) <= {torch.bfloat16}, "frozen weights beside them are stored in bf16"
    if method in ("lora", "lcmLora", "customDiffusion"):
        assert frozen, "the base weights under adapters are frozen"
    line = plan.describe(module, trainer_method.frozen_models())
    assert line.startswith("precision plan (bf16, forward under autocast): trained: ")
    if method in ("lcm", "lcmLora"):  # the teacher only runs
        assert "teacher: 208 bfloat16" in line


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_without_bf16_nothing_is_recast(precision: str, tiny_model: Path) -> None:
    spec = spec_of("lora", precision)
    module = method_for(spec, load_components(tiny_model)).build()
    PrecisionPlan.of(spec).store_frozen(module)
    # fp16: DeepSpeed's own fp16 mode casts the module when it starts the engine.
    assert {p.dtype for p in module.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("precision", "autocast", "fp16"),
    [("bf16", True, False), ("fp16", False, True), ("no", False, False)],
)
def test_deepspeed_is_told_the_plan(precision: str, autocast: bool, fp16: bool) -> None:
    config = deepspeed_config(spec_of("lora", precision), 2, 0, torch.device("cpu"))
    # Never DeepSpeed's bf16 mode: its per-parameter fp32 copies are the GPU cost.
    assert config["bf16"] == {"enabled": False}
    assert config["fp16"]["enabled"] is fp16
    assert config["torch_autocast"] == {"enabled": autocast, "dtype": "bfloat16"}


def test_a_bf16_checkpoint_records_the_plan() -> None:
    assert PrecisionPlan.of(spec_of("lora", "bf16")).layout() == {"precisionPlan": PLAN_VERSION}
    assert PrecisionPlan.of(spec_of("lora", "no")).layout() == {}
