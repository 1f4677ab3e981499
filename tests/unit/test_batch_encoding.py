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


def test_a_dataset_image_that_cannot_be_used_is_stood_in_for_by_its_batch(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated file among a dataset's thousands, read hours in: a usable image of its
    batch stands in for it (the same at every run, so resume trains the same batches),
    and the log names it, rather than the run ending there again at every resume. A
    batch with none usable ends the run, naming the file."""
    from finetune.trainer.data.batches import CaptionBatches
    from finetune.trainer.data.captions import DatasetFiles, IndexedCaptions, layout_of
    from finetune.trainer.errors import JobInputError
    from finetune.trainer.storage.local import LocalStore

    folder = write_images(tmp_path / "data", 3, resolution=64)
    (folder / "image-001.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    for index in range(3):
        (folder / f"image-{index:03d}.txt").write_text(f"a photo of disc {index}")
    files = DatasetFiles(LocalStore(folder))
    stream = IndexedCaptions(files, layout_of(files, "auto").pairs, seed=0, rank=0, world=1)
    components = load_components(tiny_model)
    preprocess = ImagePreprocessor(64, True, False, seed=0)

    def batches(size: int) -> CaptionBatches:
        return CaptionBatches(stream, preprocess, encoder(components), Rank(0, 0, 1), size)

    torch.manual_seed(0)  # the VAE samples its latents
    first = batches(3).batch(0)  # the whole dataset: the broken image among them
    torch.manual_seed(0)
    again = batches(3).batch(0)
    assert first.latents.shape[0] == 3
    assert torch.equal(first.latents, again.latents), "the same stand-in at every run"
    named = [r.getMessage() for r in caplog.records if "image-001.png" in r.getMessage()]
    assert len(named) == 2  # once per CaptionBatches: each run's
    assert named[0].startswith(f"{folder / 'image-001.png'}: not a readable image")
    assert named[0].endswith("; a usable image of its batch stands in for it")

    alone = batches(1)
    position = next(p for p in range(3) if stream.stream.example_at(p) == 1)
    with pytest.raises(JobInputError, match=r"image-001\.png: not a readable image .*no image"):
        alone.batch(position)
