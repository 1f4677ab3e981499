"""What the operator and the trainer report back in `status`.

The operator owns phase, conditions, restarts and times; the trainer owns
progress, lastCheckpoint, artifacts and earlyStop (`pod.TRAINER_FIELDS`). Unknown fields are
ignored rather than refused: an older client must still read a newer server's status.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Self

from pydantic import ConfigDict, Field, model_validator

from .common import ApiModel
from .distillation import MAX_STEP_COUNTS

MAX_ARTIFACTS = 256  # what `status.artifacts` holds at most


class StatusModel(ApiModel):
    # Written by the trainer and the operator, not by users: only the spec refuses `.inf`.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=True)


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Condition(StatusModel):
    """A condition in the shape of Kubernetes' metav1.Condition."""

    type: str = Field(max_length=316, description="Condition type, e.g. `Running`.")
    status: ConditionStatus = Field(description="`True`, `False` or `Unknown`.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation this condition was computed from."
    )
    last_transition_time: datetime = Field(description="When the status last changed.")
    reason: str = Field(
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason, e.g. `OOMKilled`.",
    )
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")


def format_duration(seconds: float) -> str:
    """12345 -> '3h25m', 75 -> '1m15s', as kubectl prints ages."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _score(text: str) -> Any:
    return Field(default=None, description=text)


_CLIP_TEXT = "Image-prompt CLIP similarity (prompt fidelity)."
_CLIP_IMAGE = "CLIP image similarity to the instance images (lcm, lcmLora: the teacher's)."
_DINO = "DINO similarity to the instance images (subject fidelity)."


class ConceptMetrics(StatusModel):
    concept: str = Field(max_length=64, description="The concept's modifier token.")
    clip_text: float | None = _score(_CLIP_TEXT)
    clip_image: float | None = _score(_CLIP_IMAGE)
    dino: float | None = _score(_DINO)


class DistillationMetrics(StatusModel):
    """lcm and lcmLora: the student's samples at one step count, against its teacher's."""

    steps: int = Field(ge=1, description="The student's denoising steps.")
    clip_text: float | None = _score(_CLIP_TEXT)
    clip_image: float | None = _score(
        "CLIP image similarity to the teacher's image of the same prompt and seed."
    )


class ValidationMetrics(StatusModel):
    """The latest `validation.metrics` over every validation sample: cosine similarities."""

    step: int = Field(ge=0, description="The step whose samples were scored.")
    summary: str | None = Field(
        default=None,
        max_length=64,
        description="The first of `validation.metrics` and its value, e.g. `dino 0.6680`.",
    )
    clip_text: float | None = _score(_CLIP_TEXT)
    clip_image: float | None = _score(_CLIP_IMAGE)
    dino: float | None = _score(_DINO)
    pres: float | None = _score(
        "Prior preservation (with `dino` and `training.priorPreservation`): DINO similarity "
        "of class-prompt samples to the class images."
    )
    concepts: list[ConceptMetrics] = Field(
        default_factory=list,
        max_length=16,
        description="customDiffusion: the scores of each concept's prompts, by modifier token.",
    )
    distillation: list[DistillationMetrics] = Field(
        default_factory=list,
        max_length=MAX_STEP_COUNTS,
        description="lcm and lcmLora: the scores at each of `validation.distillation.steps`.",
    )


class Progress(StatusModel):
    """Training progress, written by the trainer every few seconds."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, ge=0, description="`training.maxSteps`.")
    percent: int = Field(default=0, ge=0, le=100, description="Steps done, in percent.")
    loss: float | None = Field(default=None, description="Smoothed training loss.")
    images_per_second: float | None = Field(default=None, ge=0, description="Training throughput.")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds to finish.")
    eta: str | None = Field(
        default=None, max_length=32, description="`etaSeconds` as kubectl shows it, e.g. `12m30s`."
    )
    last_heartbeat: datetime | None = Field(
        default=None, description="When the trainer last reported."
    )
    metrics: ValidationMetrics | None = Field(
        default=None, description="The latest validation's fidelity scores (`validation.metrics`)."
    )

    @model_validator(mode="after")
    def _derive_eta(self) -> Self:
        if self.eta_seconds is not None and self.eta is None:
            self.eta = format_duration(self.eta_seconds)
        return self


class EarlyStop(StatusModel):
    """Why the trainer ended a run before `training.maxSteps` (`training.earlyStopping`)."""

    step: int = Field(ge=0, description="The step the run stopped after.")
    metric: str = Field(max_length=64, description="The metric that stopped improving.")
    best: float = Field(description="Its best value.")
    best_step: int = Field(ge=0, description="The step of its best value.")
    message: str = Field(default="", max_length=1024, description="What happened, for humans.")


class CheckpointRef(StatusModel):
    uri: str = Field(max_length=2048, description="Where the checkpoint lies.")
    step: int = Field(ge=0, description="Step it was taken at.")


class ArtifactKind(StrEnum):
    LORA = "lora"
    KOHYA_LORA = "kohyaLora"
    PIPELINE = "pipeline"
    CUSTOM_DIFFUSION = "customDiffusion"
    EMBEDDING = "embedding"
    MODEL_CARD = "modelCard"
    SAMPLES = "samples"


class Artifact(StatusModel):
    uri: str = Field(max_length=2048, description="Where the file lies.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file.")
    bytes: int = Field(ge=0, description="Size in bytes.")
    kind: ArtifactKind = Field(description="What the file is.")


class FailedAttempt(StatusModel):
    """A failed gang attempt whose Job and pods are kept for `kubectl logs`."""

    attempt: int = Field(ge=0, description="The attempt's number.")
    job: str = Field(max_length=253, description="Its Job, `<name>-a<attempt>`.")
    pods: list[str] = Field(
        default_factory=list, max_length=256, description="Its pods that failed, by name."
    )
    reason: str = Field(max_length=1024, description="Why it failed, e.g. `TrainerError`.")


class FineTuneJobStatus(StatusModel):
    """Observed state of a FineTuneJob."""

    phase: Phase | None = Field(
        default=None,
        description="Pending, Running, Restarting, Suspended, Succeeded or Failed.",
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Conditions, one per type."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation the operator last acted on."
    )
    progress: Progress | None = Field(default=None, description="Training progress.")
    last_checkpoint: CheckpointRef | None = Field(
        default=None, description="The newest durable checkpoint."
    )
    artifacts: list[Artifact] = Field(
        default_factory=list, max_length=MAX_ARTIFACTS, description="Final outputs with checksums."
    )
    early_stop: EarlyStop | None = Field(
        default=None,
        description="Set by the trainer when `training.earlyStopping` ended the run.",
    )
    restarts: int = Field(default=0, ge=0, description="Gang restarts so far, for any reason.")
    failed_attempts: int = Field(
        default=0,
        ge=0,
        description="Gang failures counted against `runPolicy.backoffLimit` (node loss and preemption are not).",
    )
    attempt: int = Field(
        default=0,
        ge=0,
        description="The current gang attempt; its Job is `<name>-a<attempt>`.",
    )
    last_failed_attempt: FailedAttempt | None = Field(
        default=None,
        description=(
            "The newest failed attempt, kept (its Job and failed pods) until a later attempt "
            "succeeds or the job is deleted."
        ),
    )
    start_time: datetime | None = Field(
        default=None, description="When every pod of the gang first ran."
    )
    completion_time: datetime | None = Field(
        default=None, description="When the job succeeded or failed."
    )
    failure_reason: str | None = Field(
        default=None,
        max_length=1024,
        description="CamelCase reason of a failure, e.g. `OOMKilled`.",
    )
    failure_message: str | None = Field(
        default=None, max_length=32768, description="What went wrong, for humans."
    )
