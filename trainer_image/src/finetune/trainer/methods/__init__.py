"""Training methods by the name a job gives in `spec.method`."""

from __future__ import annotations

from pathlib import Path

from ...api.methods import Method
from ...api.training import TrainingSpec
from ..errors import JobInputError
from ..models import Components
from .base import TrainedModules, TrainingMethod
from .custom_diffusion import CustomDiffusion
from .dreambooth import DreamBooth
from .lcm import Lcm, LcmLora
from .lora import Lora

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
