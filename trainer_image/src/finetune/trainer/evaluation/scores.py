"""What one validation measured, and where it is kept: a `train_log.jsonl` line per
validation, read back for the model card's table (so a resumed run's card shows the
validations before the resume too)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.api.metrics import Metric
from finetune.api.status import ConceptMetrics, DistillationMetrics, ValidationMetrics
from finetune.api.training import TrainingSpec
from finetune.trainer.evaluation.identifiers import identifiers
from finetune.trainer.telemetry.train_log import entries

ALL = "all"  # the concept label of scores over every sample
# Prior-preservation drift: DINO of class-prompt samples to the class images (with
# prior preservation and `dino`); scored beside the metrics a job names.
PRES = "pres"
# What a figure means, in `settings_basis`: raised where the trainer changes how it scores.
# 2: with training.ema the samples are the EMA's; Custom Diffusion tokens match longest first.
SCORING = 2
# Python's names of the status fields, by metric.
_FIELDS = {
    Metric.CLIP_TEXT.value: "clip_text",
    Metric.CLIP_IMAGE.value: "clip_image",
    Metric.DINO.value: "dino",
    PRES: "pres",
}


@dataclass(frozen=True)
class Scores:
    step: int
    # metric (`clipText`, `clipImage`, `dino`) -> value, in `validation.metrics`' order
    overall: dict[str, float]
    # customDiffusion: modifier token -> metric -> value over that concept's prompts
    concepts: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0  # what scoring took, models loaded and freed included
    # lcm, lcmLora: the student's step count -> metric -> value against the teacher
    distillation: dict[int, dict[str, float]] = field(default_factory=dict)
    # The validation settings it was scored with (`settings_basis`); None in the logs of
    # versions before it was kept.
    basis: str | None = None

    def log_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"step": self.step, "validation": self.overall}
        if self.basis is not None:
            entry["basis"] = self.basis
        if self.concepts:
            entry["concepts"] = self.concepts
        if self.distillation:  # JSON keys are strings
            entry["distillation"] = {str(n): v for n, v in self.distillation.items()}
        entry.update(evaluationSeconds=self.seconds, time=time.time())
        return entry

    @classmethod
    def from_log_entry(cls, entry: dict[str, Any]) -> Scores:
        return cls(
            int(entry["step"]),
            dict(entry["validation"]),
            {k: dict(v) for k, v in entry.get("concepts", {}).items()},
            float(entry.get("evaluationSeconds", 0.0)),
            {int(n): dict(v) for n, v in entry.get("distillation", {}).items()},
            entry.get("basis"),
        )

    def comparable(self, basis: str | None) -> bool:
        """Whether these figures may be weighed against those scored with `basis`."""
        return basis is None or self.basis is None or self.basis == basis

    def status(self) -> ValidationMetrics:
        """`status.progress.metrics`."""
        first = next(iter(self.overall.items()), None)
        return ValidationMetrics(
            step=self.step,
            summary=f"{first[0]} {first[1]:.4f}" if first is not None else None,
            concepts=[ConceptMetrics(concept=c, **_named(v)) for c, v in self.concepts.items()],
            distillation=[
                DistillationMetrics(steps=n, **_named(v)) for n, v in self.distillation.items()
            ],
            **_named(self.overall),
        )

    def labelled(self) -> list[tuple[str, str, float]]:
        """(metric, concept, value) of every figure; the whole set's concept is `all`."""
        figures = [(m, ALL, v) for m, v in self.overall.items()]
        for concept, values in self.concepts.items():
            figures += [(m, concept, v) for m, v in values.items()]
        return figures

    def by_steps(self) -> list[tuple[str, int, float]]:
        """(metric, student steps, value) of the teacher comparison (lcm, lcmLora)."""
        return [(m, n, v) for n, values in self.distillation.items() for m, v in values.items()]


def settings_basis(spec: TrainingSpec) -> str:
    """A digest of the validation settings a figure depends on besides the weights: the
    prompts, images per prompt, denoising steps, guidance, the teacher comparison, the
    evaluators and the identifiers clipText leaves out of the prompts (a version before
    that kept them in). `validation` may change on a resume, and figures scored with other settings
    (more prompts, other evaluators) do not measure the same thing. When validations happen
    (`everyNSteps`) and which metrics are scored change no figure, and are left out, as are
    settings left at their defaults (a field a later version adds changes no digest).
    `SCORING` changes it where the trainer changes what a figure means."""
    settings = spec.validation.model_dump(
        mode="json", by_alias=True, exclude={"every_n_steps", "metrics"}, exclude_defaults=True
    )
    settings["scoring"] = SCORING
    left_out = identifiers(spec)
    if left_out:  # whatever the metrics, as with every other setting
        settings["clipTextLeavesOut"] = list(left_out)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _named(values: dict[str, float]) -> dict[str, float]:
    return {_FIELDS[m]: v for m, v in values.items() if m in _FIELDS}


def history(log_path: Path) -> list[Scores]:
    """Every validation in a train log, by step; where a resumed run scored a step again,
    its newest scores."""
    if not log_path.is_file():
        return []
    newest: dict[int, Scores] = {}
    for entry in entries(log_path.read_text()):
        if "validation" in entry:
            scores = Scores.from_log_entry(entry)
            newest[scores.step] = scores
    return [newest[step] for step in sorted(newest)]
