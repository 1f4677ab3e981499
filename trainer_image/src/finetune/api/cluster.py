"""What only a cluster run needs: pods, GPUs, scheduling and the run policy.

`finetune run` ignores all of this; the operator turns it into the Job.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from .common import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, ApiModel, Quantity

MAX_NODES = 256


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A Kubernetes toleration, copied into the training pods."""

    key: str | None = Field(
        default=None, max_length=316, description="Taint key; empty matches all."
    )
    operator: TolerationOperator | None = Field(
        default=None, description="`Exists` or `Equal` (default)."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value for `Equal`.")
    effect: TaintEffect | None = Field(default=None, description="Taint effect; empty matches all.")
    toleration_seconds: int | None = Field(
        default=None, description="How long a `NoExecute` taint is tolerated."
    )


class LocalObjectReference(ApiModel):
    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="Object name.")


class ResourcesSpec(ApiModel):
    """The gang of training pods: one pod per node, all GPUs of a node in its pod."""

    nodes: int = Field(default=1, ge=1, le=MAX_NODES, description="Training pods (one per node).")
    gpus_per_node: int = Field(
        default=1,
        ge=0,
        le=16,
        description="GPUs per pod, one training process each; 0 trains on CPU with one process per pod.",
    )
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        pattern=r"^([a-z0-9.-]+/)?[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        max_length=253,
        description="Extended resource that requests GPUs.",
    )
    cpu: Quantity | None = Field(
        default=None, description="CPU request and limit per pod, e.g. `8`."
    )
    memory: Quantity | None = Field(
        default=None, description="Memory request and limit per pod, e.g. `64Gi`."
    )
    shared_memory: Quantity = Field(
        default="16Gi",
        description="Size of the memory-backed `/dev/shm` (NCCL and data loaders need it).",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints the pods tolerate."
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="A Kubernetes `Affinity`, copied into the pods unchanged."
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Trainer image; the operator's configured default when unset.",
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets for pulling the image."
    )


# Run-policy knobs that may change while a job runs (the API refuses any other spec
# change once the job has started; the operator ignores one made before, with a warning).
MUTABLE_RUN_POLICY = (
    "suspend",
    "backoffLimit",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
    "heartbeatTimeoutSeconds",
    "schedulingTimeoutSeconds",
)


class RunPolicy(ApiModel):
    """Retries, deadlines, cleanup and queueing."""

    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description=(
            "Gang restarts after failures before the job fails. Node loss and preemption do not count."
        ),
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail with `DeadlineExceeded` after this long running."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the job this long after it succeeds or fails."
    )
    suspend: bool = Field(
        default=False,
        description="Stop the pods (keeping checkpoints); unsuspend resumes from the last one.",
    )
    heartbeat_timeout_seconds: int = Field(
        default=1800,
        ge=60,
        description="Restart the gang when the trainer reports no progress for this long.",
    )
    scheduling_timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Fail with `SchedulingTimeout` when an attempt's pods are not all scheduled this long "
            "after its Job was created or resumed (time suspended or queued in Kueue does not count)."
        ),
    )
    queue_name: str | None = Field(
        default=None,
        pattern=DNS_LABEL_PATTERN,
        max_length=63,
        description="Kueue LocalQueue; set, the job starts suspended until Kueue admits it.",
    )
    priority_class_name: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description="PriorityClass of the pods.",
    )
