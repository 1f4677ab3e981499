"""Generating a run's images (rank 0): what it takes, and the one way every sample is made,
saved as PNGs plus a grid."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.api.training import TrainingSpec
from finetune.trainer.methods import TrainedModules, TrainingMethod
from finetune.trainer.models.components import Components, inference_pipeline
from finetune.trainer.process.stopping import StopRequest
from finetune.trainer.storage.files import written_whole

PREFIX = "prompt"  # of the validation prompts' images


def grid(images: list[Any], columns: int) -> Any:
    from PIL import Image

    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


def png_text(chunks: Mapping[str, str]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    return info


@dataclass(frozen=True)
class Samples:
    grid: Path
    images: list[list[Any]]  # PIL images, per prompt


@dataclass(frozen=True)
class GenerationContext:
    """What generating images for a run needs: its spec (prompts, seed, resolution), its
    output folder, the model being trained and its method, where and in which precision
    to run, the stop request that cuts a generation short, and what to call at each
    denoising step to show the run is alive (a validation may outlast the heartbeat
    timeout)."""

    spec: TrainingSpec
    work_dir: Path
    components: Components
    method: TrainingMethod
    module: TrainedModules
    device: torch.device
    dtype: torch.dtype
    stop: StopRequest
    alive: Callable[[], None] = lambda: None

    def trained_samples(
        self,
        folder: Path,
        prompts: Sequence[str] | None = None,
        prefix: str = PREFIX,
        *,
        steps: int | None = None,
        grid_text: Mapping[str, str] | None = None,
    ) -> Samples:
        """The model as it is now, through the method's sampling modules and scheduler."""
        return self.generate(
            self.method.sampling_modules(self.module),
            self.method.sampling_scheduler(),
            folder,
            prompts,
            prefix,
            steps=steps,
            grid_text=grid_text,
        )

    @torch.no_grad()
    def generate(
        self,
        trained: dict[str, torch.nn.Module],
        scheduler: Any,
        folder: Path,
        prompts: Sequence[str] | None = None,
        prefix: str = PREFIX,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        pipeline_options: dict[str, Any] | None = None,
        grid_text: Mapping[str, str] | None = None,
    ) -> Samples:
        """Generate `imagesPerPrompt` images for each prompt (`validation.prompts` unless
        given) with a fixed seed, as `PREFIX-II-NN.png` and a grid (`grid.png`, or
        `PREFIX-grid.png` for another prefix), in `steps` denoising steps with
        `guidance_scale` (by default the validation's), with `pipeline_options` in place of
        the base model's pipeline settings where given (a teacher's own). `grid_text`: PNG
        text chunks the grid carries (what it was made with).

        A stop request ends it between two denoising steps (`Stopped`), the folder
        removed: no step's samples are ever half there."""
        spec, device, dtype = self.spec, self.device, self.dtype
        pipeline = inference_pipeline(
            self.components, scheduler, pipeline_options=pipeline_options, **trained
        )
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
                        callback_on_step_end=step_callback(self.stop, self.alive),
                    ).images
                for number, image in enumerate(result):
                    image.save(folder / f"{prefix}-{index:02d}-{number:02d}.png")
                images.append(result)
            path = folder / ("grid.png" if prefix == PREFIX else f"{prefix}-grid.png")
            every = [image for per_prompt in images for image in per_prompt]
            # Written last and whole: a grid there says the step's samples are all there.
            with written_whole(path) as partial:
                grid(every, validation.images_per_prompt).save(
                    partial, format="PNG", pnginfo=png_text(grid_text or {})
                )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            for name, module in trained.items():
                module.train(modes[name])
        return Samples(path, images)


def step_callback(stop: StopRequest | None, alive: Callable[[], None]) -> Any:
    """A pipeline's `callback_on_step_end`: at each denoising step, `alive()`, and
    `Stopped` raised once a stop is requested (with `stop`)."""

    def each_step(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        alive()
        if stop is not None:
            stop.raise_if_requested()
        return tensors

    return each_step
