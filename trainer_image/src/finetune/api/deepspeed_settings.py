"""DeepSpeed ZeRO settings (`deepspeed`), and the raw config keys the trainer owns."""

from __future__ import annotations

from typing import Any, Self

from pydantic import Field, model_validator

from .common import ApiModel
from .rules import Problem, raise_problems

# DeepSpeed settings the trainer derives from the job; a raw override of them
# would put the loop and the engine out of step.
_OWNED_DEEPSPEED_KEYS = {
    "zero_optimization.stage": "deepspeed.zeroStage",
    "bf16": "training.mixedPrecision",
    "fp16": "training.mixedPrecision",
    "torch_autocast": "training.mixedPrecision",
    "train_batch_size": "training.batchSize",
    "train_micro_batch_size_per_gpu": "training.batchSize",
    "gradient_accumulation_steps": "training.gradientAccumulationSteps",
    "gradient_clipping": "training.maxGradNorm",
    # The trainer hands DeepSpeed its own optimizer and schedule, which win over these.
    "optimizer": "training.optimizer and training.learningRate",
    "scheduler": "training.lrScheduler",
}


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO settings."""

    zero_stage: int | None = Field(
        default=None,
        ge=0,
        le=2,  # ZeRO-3 is not supported by the trainer yet: refused here, not in a worker
        description=(
            "ZeRO stage 0-2. Unset: chosen per run and logged with its reason: 0 (fastest) "
            "when the trained weights, their gradients and Adam state plus the frozen weights "
            "take at most half of a GPU's memory, else 2 (a single rank stays at 0); 2 with "
            "`offloadOptimizer`; a resumed run keeps its checkpoint's stage."
        ),
    )
    offload_optimizer: bool = Field(
        default=False, description="Keep optimizer state in CPU memory (ZeRO 1-2)."
    )
    offload_parameters: bool = Field(
        default=False,
        description=(
            "Keep parameters in CPU memory: needs ZeRO stage 3, which the trainer does not "
            "support yet, so `true` is refused."
        ),
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Raw DeepSpeed config merged over the generated one, for settings not exposed "
            "here. Keys the trainer sets itself (ZeRO stage, precision, batch sizes, "
            "gradient clipping, optimizer, scheduler) are refused, naming the field to use."
        ),
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> Self:
        problems = []
        if self.offload_parameters:
            problems.append(
                Problem(
                    "offloadParameters",
                    "needs ZeRO stage 3, which the trainer does not support yet",
                )
            )
        if self.offload_optimizer and self.zero_stage == 0:  # unset: the trainer picks 2
            problems.append(Problem("offloadOptimizer", "needs zeroStage 1 or 2"))
        raw = self.config or {}
        for key, instead in _OWNED_DEEPSPEED_KEYS.items():
            section, _, name = key.partition(".")
            present = name in (raw.get(section) or {}) if name else section in raw
            if present:
                problems.append(Problem(f"config.{key}", f"is set by the trainer; use {instead}"))
        raise_problems(problems)
        return self
