"""Images that change every step (augmentation, random crops) go through the VAE together,
one call per micro-batch, as the reference scripts encode them. Images prepared the same
way every time are encoded alone, once, and cached: their latents do not depend on which
images share their micro-batch, so a resumed run (its cache empty) gets the very latents
an uninterrupted one cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.assets import write_images
from finetune.trainer.data.batches import ConceptBatches
from finetune.trainer.data.concepts import Example, ImagePreprocessor, Prepared
from finetune.trainer.models.components import load_components
from finetune.trainer.process.distributed import Rank
from tests.unit.test_families import encoder

BATCH = 3


class Preparer:
    """Square 64 px images; `cacheable` says whether their preparation is deterministic."""

    def __init__(self, cacheable: bool) -> None:
        self.preprocess = ImagePreprocessor(64, True, False, seed=0)
        self.cacheable = cacheable

    def prepare(self, example: Example, position: int, is_class: bool) -> Prepared:
        pixels, _, geometry = self.preprocess(example.image, position)
        return Prepared(pixels, example.prompt, self.cacheable, geometry=geometry)


def counted(components: Any) -> list[int]:
    """Wrap the VAE's `encode` to record each call's batch size."""
    calls: list[int] = []
    original = components.vae.encode

    def encode(pixels: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(pixels))
        return original(pixels, *args, **kwargs)

    components.vae.encode = encode
    return calls


@pytest.mark.parametrize("cacheable", [False, True])
def test_images_that_change_every_step_are_encoded_a_micro_batch_at_a_time(
    tiny_model: Path, tmp_path: Path, cacheable: bool
) -> None:
    images = write_images(tmp_path / "discs", 6, resolution=64)
    examples = [Example(path, "a photo of sks disc") for path in sorted(images.glob("*.png"))]
    components = load_components(tiny_model)
    calls = counted(components)
    batches = ConceptBatches(
        examples, [], Preparer(cacheable), encoder(components), Rank(0, 0, 1), BATCH, 0
    )
    for step in range(4):  # two epochs of two micro-batches
        assert batches.batch(step).latents.shape == (BATCH, 4, 32, 32)
    # Deterministic images are encoded once each, alone, in the first epoch; the others
    # every step, a micro-batch at a time.
    assert calls == ([1] * 2 * BATCH if cacheable else [BATCH] * 4)


@torch.no_grad()
def test_a_cached_distribution_is_the_images_own(tiny_model: Path, tmp_path: Path) -> None:
    images = write_images(tmp_path / "discs", BATCH, resolution=64)
    examples = [Example(path, "a photo of sks disc") for path in sorted(images.glob("*.png"))]
    components = load_components(tiny_model)
    coder = encoder(components)
    batches = ConceptBatches(examples, [], Preparer(True), coder, Rank(0, 0, 1), BATCH, 0)
    batches.batch(0)
    preparer = Preparer(True)
    for index, example in enumerate(examples):
        alone = components.vae.encode(preparer.prepare(example, 0, False).pixels[None])
        kept = coder._latents[("instance", index, None)]
        assert torch.equal(kept, alone.latent_dist.parameters)  # exactly: resume relies on it
