"""Validation samples: images for the job's prompts, saved as PNGs plus a grid."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.api.training import TrainingSpec
from finetune.trainer.evaluation.scores import Scores
from finetune.trainer.evaluation.validation import Evaluation
from finetune.trainer.methods import TrainedModules, TrainingMethod
from finetune.trainer.models.components import Components, inference_pipeline
from finetune.trainer.process import distributed
from finetune.trainer.process.stopping import Stopped, StopRequest
from finetune.trainer.telemetry.prometheus import TrainerMetrics

if TYPE_CHECKING:
    from finetune.trainer.outputs.distillation import DistillationSamples

log = logging.getLogger(__name__)
PREFIX = "prompt"  # of the validation prompts' images


def sample_folder(work_dir: Path, step: int) -> Path:
    return work_dir / "samples" / f"step-{step:08d}"


def grid(images: list[Any], columns: int) -> Any:
    from PIL import Image

    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


@dataclass(frozen=True)
class Samples:
    grid: Path
    images: list[list[Any]]  # PIL images, per prompt


@dataclass(frozen=True)
class Validation:
    """What one validation left: the grid (rank 0) and, with `validation.metrics`, its scores."""

    grid: Path | None = None
    scores: Scores | None = None


@torch.no_grad()
def generate(
    spec: TrainingSpec,
    components: Components,
    trained: dict[str, torch.nn.Module],
    scheduler: Any,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    stop: StopRequest | None = None,
    prompts: Sequence[str] | None = None,
    prefix: str = PREFIX,
    *,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> Samples:
    """Generate `imagesPerPrompt` images for each prompt (`validation.prompts` unless
    given) with a fixed seed, as `PREFIX-II-NN.png` and a grid (`grid.png`, or
    `PREFIX-grid.png` for another prefix), in `steps` denoising steps with
    `guidance_scale` (by default the validation's).

    A stop request ends it between two denoising steps (`Stopped`), the folder removed:
    no step's samples are ever half there."""
    pipeline = inference_pipeline(components, scheduler, **trained)
    modes = {name: module.training for name, module in trained.items()}
    for module in trained.values():
        module.eval()
    validation = spec.validation
    folder.mkdir(parents=True, exist_ok=True)
    images: list[list[Any]] = []
    try:
        for index, prompt in enumerate(validation.prompts if prompts is None else prompts):
            generator = torch.Generator(device=device).manual_seed(spec.training.seed + index)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                result = pipeline(
                    prompt,
                    num_images_per_prompt=validation.images_per_prompt,
                    num_inference_steps=steps or validation.inference_steps,
                    guidance_scale=(
                        validation.guidance_scale if guidance_scale is None else guidance_scale
                    ),
                    height=spec.data.resolution,
                    width=spec.data.resolution,
                    generator=generator,
                    callback_on_step_end=_stop_check(stop),
                ).images
            for number, image in enumerate(result):
                image.save(folder / f"{prefix}-{index:02d}-{number:02d}.png")
            images.append(result)
        path = folder / ("grid.png" if prefix == PREFIX else f"{prefix}-grid.png")
        grid([i for per_prompt in images for i in per_prompt], validation.images_per_prompt).save(
            path
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        for name, module in trained.items():
            module.train(modes[name])
    return Samples(path, images)


def _stop_check(stop: StopRequest | None) -> Any:
    """A pipeline callback that raises `Stopped` once a stop is requested."""
    if stop is None:
        return None

    def check(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        stop.raise_if_requested()
        return tensors

    return check


@dataclass(frozen=True)
class Sampler:
    """A run's validation samples: rank 0 generates them while the others wait."""

    spec: TrainingSpec
    work_dir: Path
    components: Components
    method: TrainingMethod
    module: TrainedModules
    device: torch.device
    dtype: torch.dtype
    stop: StopRequest
    metrics: TrainerMetrics
    main: bool
    evaluation: Evaluation | None = None  # rank 0, with `validation.metrics`

    def due(self, step: int) -> bool:
        """Whether samples are made after `step` (those of the last step come with the results)."""
        validation = self.spec.validation
        return (
            bool(validation.prompts)
            and step % validation.every_n_steps == 0
            and step < self.spec.training.max_steps
        )

    def at(self, step: int) -> Validation:
        """Samples of the model as it is at `step`, on every rank together; the grid and
        the scores on rank 0."""
        validation = Validation()
        if self.main:
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
                prompts = self.spec.validation.prompts
                self.metrics.record_samples(len(prompts) * self.spec.validation.images_per_prompt)
                scores = None
                if self.evaluation is not None:
                    scores = self.evaluation.score(
                        step,
                        prompts,
                        samples.images,
                        class_samples.images if class_samples is not None else (),
                        compared.teacher() if compared else None,
                        distilled,
                    )
                validation = Validation(samples.grid, scores)
        distributed.barrier()
        return validation

    @cached_property
    def distillation(self) -> DistillationSamples | None:
        """lcm and lcmLora with `validation.metrics` (rank 0): the teacher comparison."""
        comparison = self.spec.validation.distillation
        if self.evaluation is None or comparison is None:
            return None
        from finetune.trainer.outputs.distillation import DistillationSamples

        return DistillationSamples(
            self.spec,
            comparison,
            self.work_dir,
            self.components,
            self.method,
            self.module,
            self.device,
            self.dtype,
            self.stop,
        )

    def _generate(
        self, step: int, prompts: Sequence[str] | None = None, prefix: str = PREFIX
    ) -> Samples:
        return generate(
            self.spec,
            self.components,
            self.method.sampling_modules(self.module),
            self.method.sampling_scheduler(),
            sample_folder(self.work_dir, step),
            self.device,
            self.dtype,
            self.stop,
            prompts,
            prefix,
        )
