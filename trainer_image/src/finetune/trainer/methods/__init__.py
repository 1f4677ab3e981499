"""Training methods by the name a job gives in `spec.method`."""

from __future__ import annotations

from pathlib import Path

from finetune.api.methods import Method
from finetune.api.training import TrainingSpec
from finetune.trainer.errors import JobInputError
from finetune.trainer.methods.base import TrainedModules, TrainingMethod
from finetune.trainer.methods.custom_diffusion import CustomDiffusion
from finetune.trainer.methods.dreambooth import DreamBooth
from finetune.trainer.methods.lcm import Lcm, LcmLora
from finetune.trainer.methods.lora import Lora
from finetune.trainer.models.components import Components

METHODS: dict[str, type[TrainingMethod]] = {
    Method.DREAMBOOTH: DreamBooth,
    Method.LORA: Lora,
    Method.CUSTOM_DIFFUSION: CustomDiffusion,
    Method.LCM: Lcm,
    Method.LCM_LORA: LcmLora,
}


def method_for(
    spec: TrainingSpec, components: Components, teacher_folder: Path | None = None
) -> TrainingMethod:
    try:
        method = METHODS[spec.method]
    except KeyError:
        raise JobInputError(
            f"spec.method: {spec.method} is not implemented by this trainer yet"
        ) from None
    return method(spec, components, teacher_folder)


__all__ = ["METHODS", "TrainedModules", "TrainingMethod", "method_for"]
