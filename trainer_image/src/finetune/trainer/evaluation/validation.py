"""One validation's samples scored, on rank 0: the evaluators loaded, used and freed.

The samples of prompt i are scored against prompt i (clipText) and against the
reference images of the groups `references` assigns them (clipImage, dino). The
embeddings of the reference images do not change during a run, so each evaluator
computes them once and they are kept (on the CPU) for every later validation.

An LCM student has no subject: its clipImage compares each sample with the teacher's
image of the same prompt and seed (both start from the same noise, and the student
learns to reach in a few steps what the teacher's solver reaches in many), at the
validation's own step count and at each of `validation.distillation.steps`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from finetune.api.metrics import Metric
from finetune.api.training import TrainingSpec
from finetune.trainer.data import images as decoding
from finetune.trainer.data.images import ImageRules
from finetune.trainer.evaluation import fidelity
from finetune.trainer.evaluation.embedders import ClipEmbedder, DinoEmbedder, ImageEmbedder, loaded
from finetune.trainer.evaluation.identifiers import identifiers, scored_text
from finetune.trainer.evaluation.references import (
    ReferenceGroup,
    class_references,
    groups_of_prompt,
    reference_groups,
)
from finetune.trainer.evaluation.scores import PRES, Scores, settings_basis

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


class Evaluation:
    """Scores a run's validation samples with the metrics its job asks for."""

    def __init__(
        self,
        spec: TrainingSpec,
        concept_folders: list[Path],
        clip_folder: Path | None,
        dino_folder: Path | None,
        device: torch.device,
        class_folders: list[Path] | None = None,
    ) -> None:
        self.metrics = [Metric(m) for m in spec.validation.metrics]
        self.basis = settings_basis(spec)
        # Left out of the text clipText compares samples with: CLIP does not know them.
        self.identifiers = identifiers(spec)
        if self.identifiers and Metric.CLIP_TEXT in self.metrics:
            log.info("clipText: prompts are scored without %s", ", ".join(self.identifiers))
        self.clip_folder = clip_folder
        self.dino_folder = dino_folder
        self.device = device
        self.rules = ImageRules.of(spec.data)
        # Listed only (images are read when a subject metric first needs them).
        self.groups = reference_groups(spec, concept_folders) if spec.data.concepts else []
        # PRES: with prior preservation and dino, class-prompt samples against class images.
        pres = spec.training.prior_preservation and Metric.DINO in self.metrics
        self.classes = class_references(spec, class_folders) if pres and class_folders else []
        # (metric, group index) -> the group's reference embeddings, computed once; the
        # class groups' under (PRES, index).
        self._references: dict[tuple[str, int], torch.Tensor] = {}
        self._teacher: torch.Tensor | None = None  # CLIP of the teacher's images, once

    @property
    def class_prompts(self) -> list[str]:
        """The prompts whose samples PRES scores (none without it)."""
        return [group.label for group in self.classes]

    def score(
        self,
        step: int,
        prompts: Sequence[str],
        samples: Sequence[Sequence[Image]],
        class_samples: Sequence[Sequence[Image]] = (),
        teacher: Sequence[Sequence[Image]] | None = None,
        distilled: Mapping[int, Sequence[Sequence[Image]]] | None = None,
    ) -> Scores:
        """The scores of `samples[i]`, the images generated for `prompts[i]`;
        `class_samples[i]`: those of `class_prompts[i]`, for PRES. An LCM student's:
        `teacher[i]`, the teacher's images of `prompts[i]` (same seeds as `samples[i]`),
        and `distilled[n]`, its samples of every prompt at n steps."""
        started = time.perf_counter()
        flat = _flat(samples)
        prompt_of = torch.tensor([i for i, per_prompt in enumerate(samples) for _ in per_prompt])
        groups = [groups_of_prompt(prompts[i], self.groups) for i in prompt_of.tolist()]
        per_sample: dict[Metric, torch.Tensor] = {}  # NaN where a sample has no value
        per_group: dict[Metric, dict[int, float]] = {}
        pres: float | None = None
        by_steps: dict[int, dict[str, float]] = {}
        clip_metrics = {Metric.CLIP_TEXT, Metric.CLIP_IMAGE} & set(self.metrics)
        if clip_metrics:
            assert self.clip_folder is not None, "the launcher resolves the CLIP model"
            with loaded(ClipEmbedder, self.clip_folder, self.device) as clip:
                texts = clip.texts([scored_text(p, self.identifiers) for p in prompts])[prompt_of]
                if teacher is not None:
                    per_sample |= self._against_teacher(clip, flat, texts, teacher)
                    for steps, images in (distilled or {}).items():
                        values = self._against_teacher(clip, _flat(images), texts, teacher)
                        by_steps[steps] = {m.value: _mean(values[m]) for m in values}
                else:
                    embedded = clip.images(flat)
                    if Metric.CLIP_TEXT in clip_metrics:
                        per_sample[Metric.CLIP_TEXT] = fidelity.prompt_fidelity(embedded, texts)
                    if Metric.CLIP_IMAGE in clip_metrics:
                        per_sample[Metric.CLIP_IMAGE], per_group[Metric.CLIP_IMAGE] = self._subject(
                            Metric.CLIP_IMAGE, clip, embedded, groups
                        )
        if Metric.DINO in self.metrics:
            assert self.dino_folder is not None, "the launcher resolves the DINO model"
            with loaded(DinoEmbedder, self.dino_folder, self.device) as dino:
                per_sample[Metric.DINO], per_group[Metric.DINO] = self._subject(
                    Metric.DINO, dino, dino.images(flat), groups
                )
                pres = self._pres(dino, class_samples)
        overall = {  # the job's order: the first is the status' summary
            m.value: _mean(per_sample[m])
            for m in self.metrics
            if m in per_sample and per_sample[m].isfinite().any()
        }
        if Metric.DINO in self.metrics and pres is not None:
            overall[PRES] = pres
        return Scores(
            step,
            overall,
            self._by_concept(per_sample, per_group, groups),
            time.perf_counter() - started,
            by_steps,
            self.basis,
        )

    def _teacher_embeddings(
        self, clip: ClipEmbedder, teacher: Sequence[Sequence[Image]]
    ) -> torch.Tensor:
        """The teacher's images do not change during a run: embedded at the first validation."""
        if self._teacher is None:
            self._teacher = clip.images(_flat(teacher))
        return self._teacher

    def _against_teacher(
        self,
        clip: ClipEmbedder,
        images: Sequence[Image],
        texts: torch.Tensor,
        teacher: Sequence[Sequence[Image]],
    ) -> dict[Metric, torch.Tensor]:
        """clipText and clipImage (each image to the teacher's of the same prompt and seed)
        per image, in the job's order of metrics."""
        embedded = clip.images(images)
        figures = {
            Metric.CLIP_TEXT: lambda: fidelity.prompt_fidelity(embedded, texts),
            Metric.CLIP_IMAGE: lambda: fidelity.paired_fidelity(
                embedded, self._teacher_embeddings(clip, teacher)
            ),
        }
        return {m: figures[m]() for m in self.metrics if m in figures}

    def _subject(
        self,
        metric: Metric,
        embedder: ImageEmbedder,
        samples: torch.Tensor,
        groups: list[list[int]],
    ) -> tuple[torch.Tensor, dict[int, float]]:
        """Subject fidelity per sample (its mean over the groups it belongs to; NaN where
        it belongs to none) and per group (over the group's samples)."""
        totals = torch.zeros(len(samples))
        counts = torch.zeros(len(samples))
        by_group = {}
        for index in range(len(self.groups)):
            members = _members(index, groups)
            if not members:
                continue
            references = self._reference_embeddings(metric, index, embedder)
            values = fidelity.subject_fidelity(samples[members], references)
            totals[members] += values
            counts[members] += 1
            by_group[index] = fidelity.mean(values)
        return totals / counts, by_group

    def _pres(self, dino: ImageEmbedder, class_samples: Sequence[Sequence[Image]]) -> float | None:
        """DINO similarity of the class prompts' samples to their class images, over every
        class sample: how well the class prior survives (None without class samples)."""
        values = [
            fidelity.subject_fidelity(
                dino.images(list(images)), self._reference_embeddings(PRES, index, dino)
            )
            for index, images in enumerate(class_samples)
            if images
        ]
        return fidelity.mean(torch.cat(values)) if values else None

    def _reference_embeddings(
        self, metric: str, index: int, embedder: ImageEmbedder
    ) -> torch.Tensor:
        key = (metric, index)
        if key not in self._references:
            group: ReferenceGroup = (self.classes if metric == PRES else self.groups)[index]
            pictures = [decoding.decode(p, str(p), self.rules) for p in group.images]
            self._references[key] = embedder.images(pictures)
        return self._references[key]

    def _by_concept(
        self,
        per_sample: dict[Metric, torch.Tensor],
        per_group: dict[Metric, dict[int, float]],
        groups: list[list[int]],
    ) -> dict[str, dict[str, float]]:
        """customDiffusion: each token's scores over the samples of its prompts."""
        found: dict[str, dict[str, float]] = {}
        for index, group in enumerate(self.groups):
            members = _members(index, groups)
            if group.token is None or not members:
                continue
            values = {m.value: by[index] for m, by in per_group.items() if index in by}
            if Metric.CLIP_TEXT in per_sample:
                values[Metric.CLIP_TEXT.value] = _mean(per_sample[Metric.CLIP_TEXT][members])
            found[group.label] = values
        return found


def _flat(per_prompt: Sequence[Sequence[Image]]) -> list[Image]:
    return [image for images in per_prompt for image in images]


def _members(index: int, groups: list[list[int]]) -> list[int]:
    """The samples that belong to group `index`."""
    return [sample for sample, belongs in enumerate(groups) if index in belongs]


def _mean(values: torch.Tensor) -> float:
    """The mean of the finite values (the samples that have one)."""
    return float(values[values.isfinite()].mean())
