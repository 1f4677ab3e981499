"""Training methods by the name a job gives in `spec.method`."""

from __future__ import annotations

from ...api.methods import Method
from ...api.training import TrainingSpec
from ..errors import JobInputError
from ..models import Components
from .base import TrainedModules, TrainingMethod
from .dreambooth import DreamBooth
from .lora import Lora

METHODS: dict[str, type[TrainingMethod]] = {
    Method.DREAMBOOTH: DreamBooth,
    Method.LORA: Lora,
}


def method_for(spec: TrainingSpec, components: Components) -> TrainingMethod:
    try:
        return METHODS[spec.method](spec, components)
    except KeyError:
        raise JobInputError(
            f"spec.method: {spec.method} is not implemented by this trainer yet"
        ) from None


__all__ = ["METHODS", "TrainedModules", "TrainingMethod", "method_for"]
