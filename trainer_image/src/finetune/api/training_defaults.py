"""Defaults that depend on the method, filled into a training spec once it is valid."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .distillation import LCM_LORA_TEACHER_GUIDANCE, DistillationComparison, default_steps
from .method_settings import LoraSpec
from .methods import DEFAULT_CHECKPOINT_INTERVAL, LCM_METHODS, LORA_METHODS, METHOD_DEFAULTS, Method

if TYPE_CHECKING:  # the spec fills these from its validator, so it imports this module
    from .training import TrainingSpec


def resolve_method_defaults(spec: TrainingSpec) -> None:
    """Fill the fields whose default depends on the method (see `methods.METHOD_DEFAULTS`)."""
    defaults = METHOD_DEFAULTS[Method(spec.method)]
    hp = spec.training
    if hp.learning_rate is None:
        hp.learning_rate = defaults.learning_rate
    if hp.text_encoder_learning_rate is None and hp.train_text_encoder:
        hp.text_encoder_learning_rate = hp.learning_rate
    if spec.method in LORA_METHODS:
        if spec.lora is None:
            spec.lora = LoraSpec()
        rank = spec.lora.rank if spec.lora.rank is not None else defaults.lora_rank
        assert rank is not None, f"{spec.method} has a default LoRA rank"
        spec.lora.rank = rank
        if spec.lora.alpha is None:
            spec.lora.alpha = float(rank)
        if spec.lora.target_modules is None:
            spec.lora.target_modules = list(defaults.lora_target_modules)
    if spec.lcm is not None and spec.lcm.w_min is None:
        spec.lcm.w_min = defaults.lcm_w_min
    if spec.validation.inference_steps is None:
        spec.validation.inference_steps = defaults.validation_inference_steps
    if spec.validation.guidance_scale is None:
        spec.validation.guidance_scale = defaults.validation_guidance_scale
    if spec.method in LCM_METHODS and spec.validation.metrics:
        resolve_distillation(spec)
    if spec.checkpointing.every_n_steps is None:
        spec.checkpointing.every_n_steps = min(DEFAULT_CHECKPOINT_INTERVAL, hp.max_steps)


def resolve_distillation(spec: TrainingSpec) -> None:
    """The teacher comparison of an LCM job with metrics, on unless its settings say how."""
    validation = spec.validation
    if validation.distillation is None:
        validation.distillation = DistillationComparison()
    if validation.distillation.steps is None:
        assert spec.lcm is not None, "an LCM job has lcm settings (its teacher)"
        validation.distillation.steps = default_steps(spec.lcm.num_ddim_timesteps)
    if validation.distillation.teacher_guidance_scale is None:
        validation.distillation.teacher_guidance_scale = (
            validation.guidance_scale if spec.method == Method.LCM else LCM_LORA_TEACHER_GUIDANCE
        )
