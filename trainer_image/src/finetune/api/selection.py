"""Choosing by a validation metric: the checkpoint to keep (`checkpointing.keepBest`),
when to stop (`training.earlyStopping`), and which weights are the result (`output.from`)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from .common import ApiModel
from .metrics import Metric


class Mode(StrEnum):
    MAX = "max"
    MIN = "min"


class OutputFrom(StrEnum):
    LAST = "last"
    BEST = "best"


_METRIC = (
    "One of `validation.metrics`, over every validation sample (lcm and lcmLora: the "
    "samples at `validation.inferenceSteps`)."
)
_MODE = "`max` (higher is better, as for every similarity) or `min`."


class KeepBest(ApiModel):
    """The checkpoint of the best validation, kept besides the newest `keepLast`."""

    metric: Metric = Field(description=_METRIC)
    mode: Mode = Field(default=Mode.MAX, description=_MODE)


class EarlyStopping(ApiModel):
    """Stop a run whose validation metric stopped improving."""

    metric: Metric = Field(description=_METRIC)
    mode: Mode = Field(default=Mode.MAX, description=_MODE)
    patience: int = Field(
        default=3,
        ge=1,
        le=1000,
        description=(
            "Validations in a row without an improvement of more than `minDelta` over the "
            "best so far after which the run stops, its results written as at the end."
        ),
    )
    min_delta: float = Field(
        default=0.0, ge=0, description="The least change of the metric that counts as one."
    )
