"""An LCM student's samples beside its teacher's (`validation.distillation`, rank 0).

The teacher's images are made once per run, at the first validation: the method's
teacher UNet in the family's pipeline over the base model's other parts, with the
teacher folder's scheduler and pipeline settings (`TeacherSampling`), DPM-Solver at
`teacherInferenceSteps` and `teacherGuidanceScale`, the validation's prompts and seeds.
They lie in the output's `samples/teacher/` with `teacher.json`, written last, naming
what made them: a resumed run whose settings match reads them back rather than
sampling the teacher again. Every validation then samples the student at each step count
of `distillation.steps` with the same seeds (at `validation.inferenceSteps`, the
validation's own samples serve), as `steps-NN-*` beside them, and lays everything out in
`distillation-grid.png`: a row per sample, the teacher's image first, then the student's
at each step count.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.api.distillation import DistillationComparison
from finetune.trainer.outputs.generation import PREFIX, GenerationContext, Samples, grid

log = logging.getLogger(__name__)

TEACHER = "teacher"
RECORD = "teacher.json"
GRID = "distillation-grid.png"


def teacher_folder(work_dir: Path) -> Path:
    return work_dir / "samples" / TEACHER


def steps_prefix(steps: int) -> str:
    return f"steps-{steps:02d}"


@dataclass
class DistillationSamples:
    """The teacher's images of a run, and the student's at each step count."""

    context: GenerationContext
    comparison: DistillationComparison
    _teacher: list[list[Any]] | None = field(default=None, init=False)

    def teacher(self) -> list[list[Any]]:
        """The teacher's images per prompt (PIL), read back or made once."""
        if self._teacher is None:
            self._teacher = self._read_teacher() or self._make_teacher()
        return self._teacher

    def at(self, folder: Path, own: Samples) -> dict[int, list[list[Any]]]:
        """The student's samples per prompt at each step count, into `folder` (the
        validation's), `own` being those at `validation.inferenceSteps`; and the grid."""
        distilled: dict[int, list[list[Any]]] = {}
        for steps in self.comparison.steps or []:
            if steps == self.context.spec.validation.inference_steps:
                distilled[steps] = own.images
                continue
            made = self.context.trained_samples(folder, prefix=steps_prefix(steps), steps=steps)
            distilled[steps] = made.images
        columns = [self.teacher(), *distilled.values()]
        rows = [[images[p][n] for images in columns] for p, n in _positions(own.images)]
        grid([image for row in rows for image in row], len(columns)).save(self.grid(folder))
        return distilled

    @staticmethod
    def grid(folder: Path) -> Path:
        """The teacher-and-student grid of the validation samples in `folder`."""
        return folder / GRID

    def _record(self) -> dict[str, Any]:
        """What the teacher's images depend on: a change makes them again."""
        spec = self.context.spec
        teacher = spec.lcm.teacher_model if spec.lcm else None
        assert teacher is not None, "an LCM job has a teacher"
        return {
            "teacher": teacher.uri,
            "prompts": list(spec.validation.prompts),
            "imagesPerPrompt": spec.validation.images_per_prompt,
            "seed": spec.training.seed,
            "resolution": spec.data.resolution,
            "inferenceSteps": self.comparison.teacher_inference_steps,
            "guidanceScale": self.comparison.teacher_guidance_scale,
        }

    def _read_teacher(self) -> list[list[Any]] | None:
        from PIL import Image

        folder = teacher_folder(self.context.work_dir)
        try:
            recorded = json.loads((folder / RECORD).read_text())
        except (OSError, ValueError):
            return None
        if recorded != self._record():
            log.info("the teacher's images in %s were made otherwise: making them again", folder)
            return None
        validation = self.context.spec.validation
        try:
            images = [
                [
                    Image.open(folder / f"{PREFIX}-{p:02d}-{n:02d}.png").convert("RGB")
                    for n in range(validation.images_per_prompt)
                ]
                for p in range(len(validation.prompts))
            ]
        except OSError:
            return None
        log.info("the teacher's images: reused from %s", folder)
        return images

    def _make_teacher(self) -> list[list[Any]]:
        from diffusers import DPMSolverMultistepScheduler

        context = self.context
        teacher = context.method.teacher_sampling()
        assert teacher is not None, "only a method with a teacher compares with it"
        folder = teacher_folder(context.work_dir)
        shutil.rmtree(folder, ignore_errors=True)  # another setting's, or cut short
        made = context.generate(
            teacher.modules,
            DPMSolverMultistepScheduler.from_config(teacher.scheduler_config),
            folder,
            steps=self.comparison.teacher_inference_steps,
            guidance_scale=self.comparison.teacher_guidance_scale,
            pipeline_options=teacher.pipeline_options,
        )
        (folder / RECORD).write_text(json.dumps(self._record(), indent=2) + "\n")
        log.info("the teacher's images: made in %s", folder)
        return made.images


def _positions(per_prompt: list[list[Any]]) -> list[tuple[int, int]]:
    """(prompt, image) of every sample, in the order of the validation grid."""
    return [(p, n) for p, images in enumerate(per_prompt) for n in range(len(images))]
