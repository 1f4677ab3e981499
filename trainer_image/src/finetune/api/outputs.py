"""What a run saves: checkpoints for resume (`checkpointing`) and the results with where
they go (`output`)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from .common import ApiModel, SecretRef, StorageUri
from .methods import DEFAULT_CHECKPOINT_INTERVAL
from .selection import KeepBest, OutputFrom


class CheckpointingSpec(ApiModel):
    """Full training state saved for resume."""

    every_n_steps: int | None = Field(
        default=None,
        ge=1,
        description=f"Save every N steps and at the last (a run's end or early stop). Default: {DEFAULT_CHECKPOINT_INTERVAL}, or `training.maxSteps` when smaller.",
    )
    keep_last: int = Field(
        default=3, ge=1, le=1000, description="Checkpoints kept; older ones are deleted."
    )
    keep_best: KeepBest | None = Field(
        default=None,
        description=(
            "Also keep the checkpoint of the best validation by a metric. A checkpoint is "
            "then saved at every validation step too (besides every `everyNSteps`)."
        ),
    )


class OutputFormat(StrEnum):
    DIFFUSERS = "diffusers"
    KOHYA = "kohya"


class OutputSpec(ApiModel):
    """Where results go, and how to reach S3."""

    uri: StorageUri = Field(
        description="`s3://bucket/prefix` or a local folder for weights, samples, checkpoints and the model card."
    )
    formats: list[OutputFormat] = Field(
        default_factory=lambda: [OutputFormat.DIFFUSERS],
        min_length=1,
        max_length=2,
        description="`diffusers`, plus `kohya` for a LoRA file that A1111 and ComfyUI load.",
    )
    credentials_secret_ref: SecretRef | None = Field(
        default=None,
        description=(
            "Secret with S3 credentials, used for every `s3://` URI of the job; without it the "
            "standard AWS chain applies (environment, web identity)."
        ),
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        max_length=2048,
        description="Endpoint of an S3-compatible store (MinIO, Ceph, R2); AWS when unset.",
    )
    s3_region: str | None = Field(
        default=None, max_length=64, description="S3 region; the AWS default chain when unset."
    )
    from_: OutputFrom = Field(
        default=OutputFrom.LAST,
        alias="from",
        description=(
            "Which weights are the result: the `last` step's, or the `best` validation's "
            "by `checkpointing.keepBest` among those whose weights are left (a kept "
            "checkpoint's, or the last step's); the model card says which step's they are."
        ),
    )
