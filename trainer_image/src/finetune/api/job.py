"""The FineTuneJob resource: a TrainingSpec plus what the cluster needs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from .cluster import ResourcesSpec, RunPolicy
from .common import ApiModel
from .status import FineTuneJobStatus
from .training import TrainingSpec

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CATEGORIES = ("finetune",)

# Children are named `<job>-<suffix>` and pods `<job>-<attempt>-<index>-<hash>`;
# keeping job names short leaves room for that within DNS's 63 characters.
MAX_NAME_LENGTH = 40
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # RFC 1035 label, as Service names need


class ObjectMeta(ApiModel):
    """The parts of Kubernetes metadata a job file sets; the rest passes through."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=NAME_PATTERN,
        description="Lower-case letters, digits and '-', starting with a letter.",
    )
    namespace: str | None = Field(default=None, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJobSpec(TrainingSpec):
    """Desired state of a FineTuneJob."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pods and GPUs.")
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy, description="Retries, deadlines, cleanup, queueing."
    )

    def training_spec(self) -> TrainingSpec:
        """The part the trainer reads, as the user wrote it (defaults resolved)."""
        fields = set(TrainingSpec.model_fields)
        return TrainingSpec.model_validate(self.model_dump(include=fields, exclude_none=True))


class FineTuneJob(ApiModel):
    """A fine-tuning run of a Stable Diffusion model."""

    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
