"""The training part of a FineTuneJob: what the trainer reads, exactly as written.

The operator embeds `TrainingSpec` in the FineTuneJob spec and hands it to the
trainer unchanged through a ConfigMap; `finetune run` reads it from the job file.
Its sections live in modules of their own (`sources`, `data`, `hyperparameters`,
`method_settings`, `validation`, `outputs`, `deepspeed_settings`); the rules across
them in `training_rules`, the method-dependent defaults in `training_defaults`.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from .common import ApiModel
from .data import DataSpec
from .deepspeed_settings import DeepSpeedSpec
from .hyperparameters import Hyperparameters
from .method_settings import CustomDiffusionSpec, LcmSpec, LoraSpec
from .methods import Method
from .metrics import CLIP_METRICS, Metric
from .outputs import CheckpointingSpec, OutputSpec
from .rules import raise_problems
from .sources import BaseModelSource
from .training_defaults import resolve_method_defaults
from .training_rules import training_problems
from .validation import ValidationSpec


class TrainingSpec(ApiModel):
    """Everything the trainer needs to know about one training run."""

    method: Method = Field(
        description="`dreambooth`, `lora`, `customDiffusion`, `lcm` or `lcmLora`."
    )
    base_model: BaseModelSource = Field(
        description="The model to fine-tune (the student's start for lcm)."
    )
    data: DataSpec = Field(description="Training data.")
    training: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Hyperparameters."
    )
    lora: LoraSpec | None = Field(default=None, description="LoRA settings (lora, lcmLora).")
    custom_diffusion: CustomDiffusionSpec | None = Field(
        default=None, description="Custom Diffusion settings (customDiffusion)."
    )
    lcm: LcmSpec | None = Field(default=None, description="Distillation settings (lcm, lcmLora).")
    validation: ValidationSpec = Field(
        default_factory=ValidationSpec, description="Validation samples."
    )
    checkpointing: CheckpointingSpec = Field(
        default_factory=CheckpointingSpec, description="Checkpoints for resume."
    )
    output: OutputSpec = Field(description="Where results go.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed ZeRO.")

    @model_validator(mode="after")
    def _check_and_resolve(self) -> Self:
        raise_problems(training_problems(self))
        resolve_method_defaults(self)
        return self


def model_uris(spec: TrainingSpec) -> list[str]:
    """Every model the job loads: base model, its VAE, the LCM teacher and the evaluators."""
    base = spec.base_model
    teacher = spec.lcm.teacher_model if spec.lcm else None
    named = [base.uri, base.vae_uri, teacher.uri if teacher else None]
    return [uri for uri in named if uri] + list(evaluator_uris(spec).values())


def evaluator_uris(spec: TrainingSpec) -> dict[str, str]:
    """The evaluator models the job's metrics need, by field (`validation.evaluator.clipModel`)."""
    metrics = {Metric(m) for m in spec.validation.metrics}
    evaluator = spec.validation.evaluator
    uris = {}
    if metrics & CLIP_METRICS:
        uris["validation.evaluator.clipModel"] = evaluator.clip_model
    if Metric.DINO in metrics:
        uris["validation.evaluator.dinoModel"] = evaluator.dino_model
    return uris
