"""Class images for prior preservation, generated with the base model when missing."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from finetune.api.training import TrainingSpec
from finetune.trainer.data.class_homes import images_in
from finetune.trainer.models.components import Components, inference_pipeline
from finetune.trainer.outputs.generation import step_callback
from finetune.trainer.storage.files import written_whole

log = logging.getLogger(__name__)


def generate_missing(
    spec: TrainingSpec,
    components: Components,
    folders: list[Path],
    device: torch.device,
    dtype: torch.dtype,
    alive: Callable[[], None] = lambda: None,
    saved: Callable[[int, Path], None] = lambda index, image: None,
) -> None:
    """Top each concept's class folder up to `classImages.count` images, kept for reuse;
    `alive` is called at each denoising step (hundreds of images take a while), and
    `saved(concept index, image)` once each image is whole in its folder."""
    pipeline: Any = None
    for index, (concept, folder) in enumerate(zip(spec.data.concepts, folders, strict=True)):
        folder.mkdir(parents=True, exist_ok=True)
        have = images_in(folder)
        missing = concept.class_images.count - len(have)
        if missing <= 0 or concept.class_prompt is None:
            continue
        log.info(
            "concept %d: generating %d class images into %s (%d there)",
            index,
            missing,
            folder,
            len(have),
        )
        if pipeline is None:
            pipeline = inference_pipeline(components)
        tag = hashlib.sha1(concept.class_prompt.encode()).hexdigest()[:8]
        # Seeded by how many exist, so topping up makes new images rather than repeats.
        generator = torch.Generator(device=device).manual_seed(spec.training.seed + len(have))
        # New names only: a gap (an image removed) must not make one overwrite another.
        names = (f"class-{tag}-{number:05d}.png" for number in itertools.count(len(have)))
        free = (folder / name for name in names if not (folder / name).exists())
        made = 0
        while made < missing:
            count = min(4, missing - made)
            with (
                torch.no_grad(),
                torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
            ):
                images = pipeline(
                    concept.class_prompt,
                    num_images_per_prompt=count,
                    num_inference_steps=25,
                    height=spec.data.resolution,
                    width=spec.data.resolution,
                    generator=generator,
                    callback_on_step_end=step_callback(None, alive),
                ).images
            for image in images:
                target = next(free)
                with written_whole(target) as partial:  # never a truncated image
                    image.save(partial, format="PNG")
                saved(index, target)
                made += 1
