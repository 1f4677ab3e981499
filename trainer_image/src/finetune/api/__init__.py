"""The FineTuneJob API (finetune.dev/v1alpha1): pydantic models, nothing heavier.

The CRD in `crds/` is generated from these models (`finetune crd`).
"""

from .cluster import ResourcesSpec, RunPolicy, Toleration
from .job import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    VERSION,
    FineTuneJob,
    FineTuneJobSpec,
    ObjectMeta,
)
from .methods import METHOD_DEFAULTS, Method
from .status import Condition, FineTuneJobStatus, Phase, Progress
from .training import TrainingSpec

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "METHOD_DEFAULTS",
    "PLURAL",
    "SHORT_NAMES",
    "VERSION",
    "Condition",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Method",
    "ObjectMeta",
    "Phase",
    "Progress",
    "ResourcesSpec",
    "RunPolicy",
    "Toleration",
    "TrainingSpec",
]
