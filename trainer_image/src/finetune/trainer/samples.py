"""Validation samples: images for the job's prompts, saved as PNGs plus a grid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..api.training import TrainingSpec
from .models import Components, inference_pipeline


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


@torch.no_grad()
def generate(
    spec: TrainingSpec,
    components: Components,
    trained: dict[str, torch.nn.Module],
    scheduler: Any,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
) -> Path:
    """Generate `imagesPerPrompt` images for each prompt with a fixed seed; return the grid."""
    pipeline = inference_pipeline(components, scheduler, **trained)
    modes = {name: module.training for name, module in trained.items()}
    for module in trained.values():
        module.eval()
    validation = spec.validation
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    try:
        for index, prompt in enumerate(validation.prompts):
            generator = torch.Generator(device=device).manual_seed(spec.training.seed + index)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                result = pipeline(
                    prompt,
                    num_images_per_prompt=validation.images_per_prompt,
                    num_inference_steps=validation.inference_steps,
                    guidance_scale=validation.guidance_scale,
                    height=spec.data.resolution,
                    width=spec.data.resolution,
                    generator=generator,
                ).images
            for number, image in enumerate(result):
                image.save(folder / f"prompt-{index:02d}-{number:02d}.png")
            images += result
    finally:
        for name, module in trained.items():
            module.train(modes[name])
    path = folder / "grid.png"
    grid(images, validation.images_per_prompt).save(path)
    return path
