"""Aspect-ratio buckets (`data.buckets`): which sizes, which image goes where, and a batch
order that is a pure function of the seed and the position with one bucket per batch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from finetune.api.data import CaptionDataset, DataSpec
from finetune.trainer.data import buckets
from finetune.trainer.data.batches import ConceptBatches
from finetune.trainer.data.concepts import Example, ImagePreprocessor, Prepared
from finetune.trainer.data.images import ORIENTATION_TAG
from finetune.trainer.models.components import load_components
from finetune.trainer.process.distributed import Rank
from tests.unit.test_families import encoder

PORTRAIT, LANDSCAPE, SQUARE = (60, 180), (200, 50), (100, 100)


def test_buckets_keep_about_the_resolutions_pixels_in_multiples_of_64() -> None:
    sizes = buckets.bucket_sizes(1024)
    assert {(1024, 1024), (832, 1216), (1216, 832)} <= set(sizes)
    for width, height in sizes:
        assert (width % 64, height % 64) == (0, 0)
        assert 0.75 * 1024**2 <= width * height <= 1024**2, (width, height)
        assert max(width, height) <= 4 * min(width, height)
        assert (height, width) in sizes
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios)
    assert (ratios[0], ratios[-1]) == (0.25, 4)
    assert buckets.bucket_sizes(128) == [(64, 256), (64, 192), (128, 128), (192, 64), (256, 64)]
    assert buckets.bucket_sizes(64) == [(64, 64)]


def test_each_image_goes_to_the_bucket_of_nearest_aspect_ratio(tmp_path: Path) -> None:
    """Sizes are read upright: a JPEG whose EXIF turns it a quarter is a portrait."""
    sizes = buckets.bucket_sizes(1024)
    assert buckets.nearest_bucket((3000, 2000), sizes) == (1216, 832)
    assert buckets.nearest_bucket((2000, 3000), sizes) == (832, 1216)
    assert buckets.nearest_bucket((777, 777), sizes) == (1024, 1024)

    wide = Image.new("RGB", (300, 100), "blue")
    exif = wide.getexif()
    exif[ORIENTATION_TAG] = 6  # "rotate 90 degrees clockwise to view"
    wide.save(tmp_path / "turned.jpg", exif=exif)
    wide.save(tmp_path / "wide.png")
    found = buckets.assign(
        [Example(tmp_path / "turned.jpg", "p"), Example(tmp_path / "wide.png", "p")],
        buckets.bucket_sizes(128),
    )
    assert [e.size for e in found] == [(64, 192), (192, 64)]


def test_the_batch_order_is_a_pure_function_of_seed_and_position() -> None:
    """Every micro-batch from one bucket; every image once per epoch (a bucket's last
    batch filled up from its own); what a fresh stream (a resumed run) reads at any step
    is what one that ran from the start reads; ranks read different batches."""
    sizes = [(64, 192)] * 5 + [(192, 64)] * 3 + [(128, 128)] * 2
    batch, world = 2, 2
    stream = buckets.BucketStream(sizes, seed=7)
    assert stream.batches_per_epoch(batch) == 3 + 2 + 1
    read = {
        (step, rank): stream.take(step, rank, world, batch)
        for step in range(12)
        for rank in range(world)
    }
    for (step, rank), taken in read.items():
        assert len({sizes[index] for _, index in taken}) == 1, (step, rank, taken)
        assert [p for p, _ in taken] == [(step * world + rank) * batch + k for k in range(batch)]
        # A resumed run: a new stream, asked first for this very step.
        assert buckets.BucketStream(sizes, seed=7).take(step, rank, world, batch) == taken
    first_epoch = [
        index for step in range(3) for rank in range(world) for _, index in read[step, rank]
    ]
    assert set(first_epoch) == set(range(10))
    assert Counter(first_epoch)[first_epoch[0]] <= 2  # only a bucket's filler repeats
    assert read[0, 0] != read[0, 1]
    assert len({sizes[read[s, r][0][1]] for s in range(12) for r in range(world)}) == 3
    other = buckets.BucketStream(sizes, seed=8)
    assert [other.take(s, 0, world, batch) for s in range(12)] != [read[s, 0] for s in range(12)]


class BucketPreparer:
    keeps_aspect_ratio = True

    def __init__(self) -> None:
        self.preprocess = ImagePreprocessor(128, False, False, seed=0)

    def prepare(self, example: Example, position: int, is_class: bool) -> Prepared:
        pixels, cacheable, geometry = self.preprocess(example.image, position, example.size)
        return Prepared(pixels, example.prompt, cacheable, geometry=geometry)


def test_portrait_and_landscape_images_train_in_their_buckets_with_sdxl_time_ids(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    """Each batch has one shape (two buckets at least over a few steps); SDXL's time ids
    carry each image's real size, its crop and the bucket; prior-preservation class images
    (square) are cropped to their batch's bucket."""
    files = []
    for name, size in (("tall", PORTRAIT), ("wide", LANDSCAPE), ("square", SQUARE)):
        for copy in range(2):
            files.append(tmp_path / f"{name}-{copy}.png")
            Image.new("RGB", size, (40 * copy, 90, 200)).save(files[-1])
    classes = []
    for copy in range(2):
        classes.append(Example(tmp_path / f"class-{copy}.png", "a disc"))
        Image.new("RGB", (64, 64), (200, 9, copy)).save(classes[-1].image)
    sizes = buckets.bucket_sizes(128)
    instances = buckets.assign([Example(f, "a photo of sks disc") for f in files], sizes)
    assert "128x128: 2, 192x64: 0, 256x64: 2" in buckets.describe(128, sizes, instances)
    originals = {PORTRAIT[::-1], LANDSCAPE[::-1], SQUARE[::-1]}

    components = load_components(tiny_sdxl_model)
    batches = ConceptBatches(
        instances, classes, BucketPreparer(), encoder(components), Rank(0, 0, 1), 2, 0, True
    )
    shapes = set()
    for step in range(6):
        batch = batches.batch(step)
        rows = batch.text["time_ids"].tolist()
        target = {tuple(row[4:]) for row in rows}
        assert len(target) == 1, rows  # one bucket for instance and class images alike
        height, width = target.pop()
        assert batch.latents.shape == (4, 4, height // 2, width // 2)  # the VAE halves
        shapes.add((int(width), int(height)))
        assert batch.prior_count == 2
        assert {tuple(row[:2]) for row in rows[:2]} <= originals
        assert {tuple(row[:2]) for row in rows[2:]} == {(64.0, 64.0)}
        if width != height:  # a square class image covers a long bucket: cropped along it
            assert any(row[2] + row[3] > 0 for row in rows[2:]), rows
    assert {(64, 192), (256, 64)} <= shapes


@pytest.mark.parametrize(
    ("buckets_field", "family_default", "keeps_aspect_ratio", "dataset", "expected"),
    [
        (None, False, True, False, False),  # sd: off unless asked
        (None, True, True, False, True),  # sdxl: on
        (None, True, False, False, False),  # customDiffusion's square augmentation
        (None, True, True, True, False),  # a streamed caption dataset
        (True, False, True, False, True),
        (False, True, True, False, False),
    ],
)
def test_buckets_follow_the_field_else_the_family_where_they_can(
    buckets_field: bool | None,
    family_default: bool,
    keeps_aspect_ratio: bool,
    dataset: bool,
    expected: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = DataSpec(
        buckets=buckets_field, dataset=CaptionDataset(uri="s3://data/shards/") if dataset else None
    )
    with caplog.at_level("INFO"):
        assert buckets.wanted(data, family_default, keeps_aspect_ratio, announce=True) is expected
    turned_off = family_default and buckets_field is None and not expected
    assert ("aspect-ratio buckets are off" in caplog.text) is turned_off


def model_parts(vae_blocks: int, unet_blocks: int) -> Any:
    config = SimpleNamespace
    return SimpleNamespace(
        vae=SimpleNamespace(config=config(block_out_channels=(8,) * vae_blocks)),
        unet=SimpleNamespace(config=config(down_block_types=("DownBlock2D",) * unet_blocks)),
    )


def test_bucket_sizes_follow_a_models_grid_where_it_is_coarser_than_64_px() -> None:
    assert buckets.size_multiple(model_parts(4, 4)) == 64  # SD 1.x: 8 x 8
    assert buckets.size_multiple(model_parts(4, 3)) == 64  # SDXL: 8 x 4
    assert buckets.size_multiple(model_parts(2, 2)) == 64  # the tiny models: 2 x 2
    assert buckets.size_multiple(model_parts(4, 6)) == 256  # 8 x 32
