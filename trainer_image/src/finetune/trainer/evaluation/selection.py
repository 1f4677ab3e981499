"""Choosing by a validation metric: the best validation so far (`checkpointing.keepBest`,
`output.from: best`) and whether the metric stopped improving (`training.earlyStopping`).

Rank 0 keeps the run's validations in order; each checkpoint's manifest carries them
(`validations`), so a resumed run knows its best and its patience from the checkpoint
it resumes from, not from the memory of the process that wrote it, and forgets the
validations of steps it trains again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.api.selection import EarlyStopping, Mode
from finetune.api.training import TrainingSpec
from finetune.trainer.evaluation.scores import Scores


def improves(value: float, best: float, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (higher for `max`)."""
    return value > best + min_delta if mode == Mode.MAX else value < best - min_delta


def ranked(history: list[Scores], metric: str, mode: str) -> list[Scores]:
    """The validations scored by `metric`, best first (the earlier of equals first: the
    sort is stable over `history`, which is in step order)."""
    scored = [s for s in history if s.overall.get(metric) is not None]
    sign = -1.0 if mode == Mode.MAX else 1.0
    return sorted(scored, key=lambda s: sign * s.overall[metric])


def best_of(history: list[Scores], metric: str, mode: str) -> Scores | None:
    """The validation with the best `metric` (the earliest of equals); None without one."""
    return next(iter(ranked(history, metric, mode)), None)


@dataclass(frozen=True)
class Chosen:
    """`output.from: best`'s weights: those of the validation `scores`, whose training loss
    was `loss`. `gone`: the best validation, when its checkpoint was gone (deleted by
    retention before a resume changed `checkpointing.keepBest`, or unreadable) and
    `scores` is the best of those whose weights were left."""

    scores: Scores
    loss: float | None = None
    gone: Scores | None = None


@dataclass(frozen=True)
class Stall:
    """The metric has not improved for `since` validations after `best`."""

    best: Scores
    since: int
    last_step: int


def stalled(history: list[Scores], rule: EarlyStopping) -> Stall | None:
    """Where the run stands when `rule` says stop: `patience` validations in a row without
    an improvement of more than `minDelta` over the best so far."""
    best: Scores | None = None
    since = 0
    for scores in history:
        value = scores.overall.get(rule.metric)
        if value is None:
            continue
        if best is None or improves(value, best.overall[rule.metric], rule.mode, rule.min_delta):
            best, since = scores, 0
        else:
            since += 1
        if since >= rule.patience:
            return Stall(best, since, scores.step)
    return None


def to_manifest(history: list[Scores]) -> list[dict[str, Any]]:
    return [scores.log_entry() for scores in history]


def from_manifest(entries: list[dict[str, Any]]) -> list[Scores]:
    return [Scores.from_log_entry(entry) for entry in entries]


class Selection:
    """Rank 0's validations of a run (scores only: the weights are in checkpoints)."""

    def __init__(self, spec: TrainingSpec, history: list[Scores], basis: str | None = None) -> None:
        self.keep_best = spec.checkpointing.keep_best
        self.early_stopping = spec.training.early_stopping
        self.history = sorted(history, key=lambda s: s.step)
        self.basis = basis  # this run's validation settings (`settings_basis`)

    def add(self, scores: Scores) -> None:
        """A validation's scores; a step scored again replaces its earlier scores."""
        self.history = [s for s in self.history if s.step != scores.step] + [scores]

    def comparable(self) -> list[Scores]:
        """The validations scored with this run's validation settings: those a choice
        weighs (the others, before a resume changed the settings, stay in the history)."""
        return [s for s in self.history if s.comparable(self.basis)]

    def set_aside(self) -> list[int]:
        """The steps whose validations were scored with other settings."""
        return [s.step for s in self.history if not s.comparable(self.basis)]

    def best(self) -> Scores | None:
        """The best validation by `keepBest`; None without the rule or a validation."""
        if self.keep_best is None:
            return None
        return best_of(self.comparable(), self.keep_best.metric, self.keep_best.mode)

    def stall(self) -> Stall | None:
        """Set once `earlyStopping` says the run should stop."""
        if self.early_stopping is None:
            return None
        return stalled(self.comparable(), self.early_stopping)

    def manifest_entries(self) -> list[dict[str, Any]]:
        return to_manifest(self.history)
