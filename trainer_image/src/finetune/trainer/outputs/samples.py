"""Validation samples: images for the job's prompts at a step, with the class prompts'
(PRES) and an LCM student's beside its teacher's, and their scores."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.trainer.evaluation.scores import Scores
from finetune.trainer.evaluation.validation import Evaluation
from finetune.trainer.outputs.artifacts import sample_folder
from finetune.trainer.outputs.generation import PREFIX, GenerationContext, Samples
from finetune.trainer.process import distributed
from finetune.trainer.process.stopping import Stopped
from finetune.trainer.telemetry.prometheus import TrainerMetrics

if TYPE_CHECKING:
    from finetune.trainer.outputs.distillation import DistillationSamples

log = logging.getLogger(__name__)

# The grid's PNG text chunk naming the validation settings it was made with
# (`settings_basis`): a run again reuses a step's samples only where they match.
SETTINGS_CHUNK = "finetune:validation-settings"


@dataclass(frozen=True)
class Validation:
    """What one validation left: the grid (rank 0) and, with `validation.metrics`, its scores
    and an LCM student's grid beside its teacher's."""

    grid: Path | None = None
    scores: Scores | None = None
    distillation_grid: Path | None = None


@dataclass(frozen=True)
class Sampler:
    """A run's validation samples: rank 0 generates them while the others wait."""

    context: GenerationContext
    metrics: TrainerMetrics
    main: bool
    basis: str  # the validation settings the samples are made with (`settings_basis`)
    evaluation: Evaluation | None = None  # rank 0, with `validation.metrics`
    # Rank 0, with an S3 output: deletes the output's copies of a step's samples.
    forget: Callable[[Path], None] | None = None

    def due(self, step: int) -> bool:
        """Whether samples are made after `step` (those of the last step come with the results)."""
        spec = self.context.spec
        return (
            bool(spec.validation.prompts)
            and step % spec.validation.every_n_steps == 0
            and step < spec.training.max_steps
        )

    def made(self, step: int, scores: Scores | None) -> Validation | None:
        """Rank 0: the validation of `step` an earlier run made with this run's settings,
        its grid there and, with `validation.metrics`, `scores` (its train-log line: written
        once everything was); None where that run ended before, or made it otherwise (other
        prompts, say)."""
        grid = sample_folder(self.context.work_dir, step) / "grid.png"
        if not grid.is_file() or (self.evaluation is not None and scores is None):
            return None
        try:
            made_with = _made_with(grid)
        except OSError:  # not a whole PNG
            return None
        if made_with not in (None, self.basis):  # None: a version before the chunk
            log.info("step %d: its samples were made with other validation settings", step)
            return None
        return Validation(grid, scores)

    def at(self, step: int) -> Validation:
        """Samples of the model as it is at `step`, on every rank together; the grid and
        the scores on rank 0."""
        validation = Validation()
        if self.main:
            # Made again (a run again with other prompts): none of the earlier ones stay.
            folder = sample_folder(self.context.work_dir, step)
            shutil.rmtree(folder, ignore_errors=True)
            if self.forget is not None:
                self.forget(folder)
            try:
                samples = self._generate(step)
                # PRES: the class prompts' samples too, beside the others.
                classes = self.evaluation.class_prompts if self.evaluation is not None else []
                class_samples = self._generate(step, classes, "class") if classes else None
                # lcm, lcmLora: the student at each step count, beside its teacher.
                compared = self.distillation
                distilled = compared.at(samples.grid.parent, samples) if compared else None
            except Stopped:  # the loop's next step stops every rank, with a checkpoint
                log.warning("step %d: samples left out, a stop was requested", step)
            else:
                shown = self.context.spec.validation
                self.metrics.record_samples(len(shown.prompts) * shown.images_per_prompt)
                scores = None
                if self.evaluation is not None:
                    scores = self.evaluation.score(
                        step,
                        shown.prompts,
                        samples.images,
                        class_samples.images if class_samples is not None else (),
                        compared.teacher() if compared else None,
                        distilled,
                    )
                beside_teacher = compared.grid(samples.grid.parent) if compared else None
                validation = Validation(samples.grid, scores, beside_teacher)
        distributed.barrier()
        return validation

    @cached_property
    def distillation(self) -> DistillationSamples | None:
        """lcm and lcmLora with `validation.metrics` (rank 0): the teacher comparison."""
        comparison = self.context.spec.validation.distillation
        if self.evaluation is None or comparison is None:
            return None
        from finetune.trainer.outputs.distillation import DistillationSamples

        return DistillationSamples(self.context, comparison)

    def _generate(
        self,
        step: int,
        prompts: Sequence[str] | None = None,
        prefix: str = PREFIX,
    ) -> Samples:
        folder = sample_folder(self.context.work_dir, step)
        text = {SETTINGS_CHUNK: self.basis}
        return self.context.trained_samples(folder, prompts, prefix, grid_text=text)


def _made_with(grid: Path) -> str | None:
    """The validation settings a grid names; None where it names none."""
    from PIL import Image

    with Image.open(grid) as image:
        text = getattr(image, "text", {})  # PNG's text chunks; reading them reads the file
        return text.get(SETTINGS_CHUNK)
