"""Aspect-ratio buckets (`data.buckets`): concept images keep their shape.

A bucket is a training size (width, height) in multiples of 64 px (or of the model's
own size multiple, where that is larger), with no more pixels than the square
resolution and an aspect ratio from 1:4 to 4:1; the square itself is always one.
Each image trains in the bucket of nearest aspect ratio, resized to cover it and
cropped. Each micro-batch comes from one bucket; which images it holds is a pure
function of the seed and its position in the run, so a resumed run sees exactly the
batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from finetune.trainer.data.concepts import Example, IndexStream, seeded_permutation
from finetune.trainer.data.images import upright_size

if TYPE_CHECKING:
    from finetune.api.data import DataSpec
    from finetune.trainer.families import Components

log = logging.getLogger(__name__)

FIELD = "spec.data.buckets"
STEP = 64  # px: the usual bucket step, a multiple of every Stable Diffusion's latent grid
MAX_RATIO = 4  # the longest side at most 4 times the shortest
ORDER_SALT = 100  # the micro-batches' order, apart from the streams' own salts (0, 1, 2)

Size = tuple[int, int]  # (width, height) in pixels


def wanted(data: DataSpec, family_default: bool, keeps_aspect_ratio: bool, announce: bool) -> bool:
    """Whether the job trains in buckets: as `data.buckets` says, else the family's
    default where the data and method allow it (the API refuses a forced `true` where
    they do not); `announce` logs why a family's default is not followed."""
    if data.buckets is not None:
        return data.buckets
    if not family_default:
        return False
    if data.dataset is not None:
        reason = "they apply to concept images, not to a streamed data.dataset"
    elif not keeps_aspect_ratio:
        reason = "the method makes square images (customDiffusion.augmentation)"
    else:
        return True
    if announce:
        log.info("aspect-ratio buckets are off (the model family's default is on): %s", reason)
    return False


def size_multiple(components: Components) -> int:
    """The step of bucket sizes: 64 px, or a multiple of it where the VAE's and the UNet's
    downsampling together need one."""
    vae = 2 ** (len(components.vae.config.block_out_channels) - 1)
    unet = 2 ** (len(components.unet.config.down_block_types) - 1)
    return math.lcm(STEP, vae * unet)


def bucket_sizes(resolution: int, step: int = STEP) -> list[Size]:
    """Every bucket for `resolution`, from the tallest to the widest."""
    area = resolution * resolution
    side = max(step, resolution // step * step)
    sizes = {(side, side)}
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) <= MAX_RATIO * min(width, height):
            sizes |= {(width, height), (height, width)}
    return sorted(sizes, key=lambda size: size[0] / size[1])


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (on a log scale, so 1:2 and
    2:1 are as far from a square); the first of equals."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - ratio))


def assign(examples: list[Example], buckets: Sequence[Size]) -> list[Example]:
    """`examples`, each with the size of its bucket (read from the file's header)."""
    return [
        dataclasses.replace(e, size=nearest_bucket(upright_size(e.image), buckets))
        for e in examples
    ]


def describe(resolution: int, buckets: Sequence[Size], examples: list[Example]) -> str:
    """The log line of the buckets and how many instance images each holds."""
    counts = Counter(e.size for e in examples)
    listed = ", ".join(f"{w}x{h}: {counts.get((w, h), 0)}" for w, h in buckets)
    return f"aspect-ratio buckets at {resolution} px (width x height: instance images): {listed}"


class BucketStream:
    """Which examples each rank reads at each micro-step, each micro-batch from one bucket.

    Every epoch: the examples in a seeded permutation (the `IndexStream`'s); each bucket's
    share of it cut into micro-batches, its last one filled up from its first images
    again; those micro-batches in a seeded order. The run's micro-batches are dealt out
    to the ranks in turn. Pure, so resume needs no state.
    """

    def __init__(self, sizes: Sequence[Hashable], seed: int, salt: int = 0) -> None:
        self.sizes = list(sizes)  # each example's bucket
        self.seed = seed
        self.salt = salt
        self.examples = IndexStream(len(self.sizes), seed, salt)
        self._cached: tuple[int, int] = (-1, 0)  # (epoch, batch) of `_batches`
        self._batches: list[list[int]] = []

    def _epoch(self, epoch: int, batch: int) -> list[list[int]]:
        if self._cached == (epoch, batch):
            return self._batches
        size = len(self.sizes)
        by_bucket: dict[Hashable, list[int]] = {}
        for offset in range(size):
            index = self.examples.example_at(epoch * size + offset)
            by_bucket.setdefault(self.sizes[index], []).append(index)
        batches = []
        for members in by_bucket.values():
            for start in range(0, len(members), batch):
                batches.append([members[(start + k) % len(members)] for k in range(batch)])
        order = seeded_permutation(len(batches), self.seed, self.salt + ORDER_SALT, epoch)
        self._batches = [batches[i] for i in order]
        self._cached = (epoch, batch)
        return self._batches

    def batches_per_epoch(self, batch: int) -> int:
        return sum(math.ceil(n / batch) for n in Counter(self.sizes).values())

    def take(self, micro_step: int, rank: int, world: int, batch: int) -> list[tuple[int, int]]:
        """(position in the run, example index) of each sample `rank` reads at `micro_step`."""
        number = micro_step * world + rank  # of the micro-batch in the run
        epoch, offset = divmod(number, self.batches_per_epoch(batch))
        members = self._epoch(epoch, batch)[offset]
        return [(number * batch + k, index) for k, index in enumerate(members)]
