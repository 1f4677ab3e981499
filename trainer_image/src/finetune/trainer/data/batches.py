"""The micro-batches each rank trains on, as a pure function of the micro-step.

Concept methods (dreambooth, lora, customDiffusion) draw from a few instance
images, plus class images for prior preservation; the LCM methods draw from an
image-caption dataset that may be too large to hold. Either way a resumed run
sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from finetune.api.training import TrainingSpec
from finetune.trainer.data import buckets
from finetune.trainer.data.captions import CaptionStream, open_stream
from finetune.trainer.data.class_homes import ClassHome
from finetune.trainer.data.concepts import (
    Example,
    ImagePreprocessor,
    IndexStream,
    Prepared,
    examples_from,
    split_held_out,
)
from finetune.trainer.data.encoding import Encoder
from finetune.trainer.data.geometry import ImageGeometry
from finetune.trainer.data.images import ImageRules
from finetune.trainer.errors import JobInputError
from finetune.trainer.process.distributed import Rank
from finetune.trainer.storage.inputs import said_as
from finetune.trainer.storage.s3 import S3Settings

log = logging.getLogger(__name__)


class ExamplePreparer(Protocol):
    """How the training method prepares its images (`methods.TrainingMethod`)."""

    preprocess: ImagePreprocessor

    @property
    def keeps_aspect_ratio(self) -> bool: ...

    def prepare(self, example: Example, position: int, is_class: bool) -> Prepared: ...


@dataclass
class Batch:
    latents: torch.Tensor
    # The prompt (token ids, or the frozen encoders' conditioning) and what the family's
    # UNet takes of the images (SDXL's time_ids): the trained modules' keyword arguments.
    text: dict[str, torch.Tensor]
    prior_count: int = 0  # the last `prior_count` samples are class images
    mask: torch.Tensor | None = None  # [B, 1, h, w]: where each sample's loss counts


@dataclass
class Sample:
    latents: torch.Tensor
    prompt: str
    mask: torch.Tensor | None
    geometry: ImageGeometry


class ExampleStream(Protocol):
    """Which examples a rank reads at a micro-step (`IndexStream`, `BucketStream`)."""

    def take(self, micro_step: int, rank: int, world: int, batch: int) -> list[tuple[int, int]]: ...


class Batches(Protocol):
    def batch(self, micro_step: int) -> Batch: ...

    def state(self) -> dict[str, Any]:
        """This rank's data state to keep with a checkpoint (empty when positions suffice)."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class ConceptBatches:
    """Instance images (and class images) dealt to the ranks in seeded epochs.

    With `bucketed` on, the instance examples name their bucket (`Example.size`), each
    micro-batch holds one bucket's, and its class images are cropped to that bucket too
    (they are generated square, so no bucket of their own could serve every batch).
    """

    def __init__(
        self,
        instances: list[Example],
        classes: list[Example],
        method: ExamplePreparer,
        encoder: Encoder,
        rank: Rank,
        batch_size: int,
        seed: int,
        bucketed: bool = False,
    ) -> None:
        self.instances = instances
        self.classes = classes
        self.method = method
        self.encoder = encoder
        self.rank = rank
        self.batch_size = batch_size
        self.bucketed = bucketed
        self.instance_stream: ExampleStream = (
            buckets.BucketStream([e.size for e in instances], seed, salt=0)
            if bucketed
            else IndexStream(len(instances), seed, salt=0)
        )
        self.class_stream = IndexStream(max(1, len(classes)), seed, salt=1)
        self.square = ImageGeometry.square(method.preprocess.resolution)
        self._geometry: dict[Any, ImageGeometry] = {}  # beside the encoder's cached latents

    def _take(
        self,
        stream: ExampleStream,
        examples: list[Example],
        kind: str,
        micro_step: int,
        size: tuple[int, int] | None = None,
    ) -> list[Sample]:
        """Each sample of the micro-batch (at `size`, where given, rather than each
        example's own). An image whose latents are cached is not even opened; one whose
        preparation is deterministic is encoded alone, at once, and cached: the same
        latents whichever images share its micro-batch, and whether or not a resume
        emptied the cache. The others change every step: they go through the VAE
        together, after the rest, as the reference scripts encode a batch."""
        chosen: dict[int, Sample] = {}
        pending: dict[int, Prepared] = {}  # slot -> an image that changes every step
        taken = stream.take(micro_step, self.rank.rank, self.rank.world, self.batch_size)
        for slot, (position, index) in enumerate(taken):
            example = examples[index]
            if size is not None:
                example = dataclasses.replace(example, size=size)
            key = (kind, index, example.size)  # latents are cached per bucket
            latents = self.encoder.cached_latents(key)
            if latents is not None:
                chosen[slot] = Sample(latents, example.prompt, None, self._geometry[key])
                continue
            prepared = self.method.prepare(example, position, kind == "class")
            if not prepared.cacheable:
                pending[slot] = prepared
                continue
            latents = self.encoder.latents(prepared.pixels[None], [key])
            self._geometry[key] = prepared.geometry or self.square
            chosen[slot] = Sample(latents, prepared.prompt, prepared.mask, self._geometry[key])
        for slots in _by_shape(pending):
            group = [pending[slot] for slot in slots]
            latents = self.encoder.latents(torch.stack([p.pixels for p in group]))
            for row, (slot, ready) in enumerate(zip(slots, group, strict=True)):
                geometry = ready.geometry or self.square
                chosen[slot] = Sample(latents[row : row + 1], ready.prompt, ready.mask, geometry)
        return [chosen[slot] for slot in range(len(taken))]

    def batch(self, micro_step: int) -> Batch:
        chosen = self._take(self.instance_stream, self.instances, "instance", micro_step)
        prior_count = 0
        if self.classes:
            height, width = chosen[0].geometry.target
            bucket = (width, height) if self.bucketed else None
            chosen += self._take(self.class_stream, self.classes, "class", micro_step, bucket)
            prior_count = self.batch_size
        if log.isEnabledFor(logging.DEBUG):  # what proves one shape per micro-batch
            shapes = sorted({f"{s.geometry.target[1]}x{s.geometry.target[0]}" for s in chosen})
            log.debug("micro-step %d, rank %d: %s", micro_step, self.rank.rank, ", ".join(shapes))
        latents = torch.cat([sample.latents for sample in chosen])
        mask = None
        if any(sample.mask is not None for sample in chosen):
            ones = torch.ones_like(latents[:1, :1])
            mask = torch.cat(
                [(s.mask[None].to(latents) if s.mask is not None else ones) for s in chosen]
            )
        prompts = [sample.prompt for sample in chosen]
        inputs = {
            **self.encoder.text(prompts),
            **self.encoder.images([sample.geometry for sample in chosen]),
        }
        return Batch(latents, inputs, prior_count, mask)

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        return


class CaptionBatches:
    """Image-caption pairs streamed from a dataset; nothing is cached."""

    def __init__(
        self,
        stream: CaptionStream,
        preprocess: ImagePreprocessor,
        encoder: Encoder,
        rank: Rank,
        batch_size: int,
    ) -> None:
        self.stream = stream
        self.preprocess = preprocess
        self.encoder = encoder
        self.rank = rank
        self.batch_size = batch_size
        self.named: set[str] = set()  # the refusals logged, each once

    def batch(self, micro_step: int) -> Batch:
        taken = self.stream.take(micro_step, self.batch_size)
        usable: list[tuple[torch.Tensor, str, ImageGeometry]] = []
        refused: list[JobInputError] = []
        for sample, position in taken:
            try:
                image = sample.decode(self.preprocess.rules)
            except JobInputError as exc:  # unreadable, too small, transparent...
                refused.append(exc)
                continue
            pixels, _, where = self.preprocess(image, position)
            usable.append((pixels, sample.caption, where))
        if refused:
            usable = self._stand_ins(usable, refused, len(taken))
        latents = self.encoder.latents(torch.stack([pixels for pixels, _, _ in usable]))
        prompts = [caption for _, caption, _ in usable]
        geometry = [where for _, _, where in usable]
        return Batch(latents, {**self.encoder.text(prompts), **self.encoder.images(geometry)})

    def _stand_ins(
        self,
        usable: list[tuple[torch.Tensor, str, ImageGeometry]],
        refused: list[JobInputError],
        size: int,
    ) -> list[tuple[torch.Tensor, str, ImageGeometry]]:
        """A batch whose samples a dataset image failed: the batch's usable samples stand
        in for them (the same ones at every run, so a resume trains the same batches),
        each failure named once in the log rather than ending a run hours in. A batch
        with none usable ends it, naming the first."""
        for exc in refused:
            if str(exc) not in self.named:
                self.named.add(str(exc))
                log.warning("%s; a usable image of its batch stands in for it", exc)
        if not usable:
            raise JobInputError(f"{refused[0]}; no image of its batch could stand in for it")
        return [usable[index % len(usable)] for index in range(size)]

    def state(self) -> dict[str, Any]:
        return self.stream.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state(state)


def open_batches(
    spec: TrainingSpec,
    concept_folders: list[Path],
    class_homes: list[ClassHome],
    method: ExamplePreparer,
    encoder: Encoder,
    rank: Rank,
    s3: S3Settings,
    make_class_images: Callable[[], None],
) -> Batches:
    """This rank's batches: from the caption dataset, or from the concepts' folders
    (`make_class_images` first generating the class images prior preservation lacks)."""
    hp = spec.training
    bucketed = buckets.wanted(
        spec.data,
        encoder.components.family.buckets_by_default,
        method.keeps_aspect_ratio,
        announce=rank.main,
    )
    if spec.data.dataset is not None:
        stream = open_stream(spec.data.dataset, s3, hp.seed, rank.rank, rank.world)
        return CaptionBatches(stream, method.preprocess, encoder, rank, hp.batch_size)
    instances = concept_examples(spec, concept_folders)
    if bucketed:
        sizes = buckets.bucket_sizes(
            spec.data.resolution, buckets.size_multiple(encoder.components)
        )
        instances = buckets.assign(instances, sizes)
        if rank.main:
            log.info(buckets.describe(spec.data.resolution, sizes, instances))
    classes: list[Example] = []
    if hp.prior_preservation:
        make_class_images()
        classes = class_examples(spec, class_homes)
    return ConceptBatches(
        instances, classes, method, encoder, rank, hp.batch_size, hp.seed, bucketed
    )


def concept_examples(spec: TrainingSpec, folders: list[Path]) -> list[Example]:
    """Every concept's training images, in the order of `spec.data.concepts` (the
    launcher decoded each one already)."""
    found: list[Example] = []
    for index, (concept, folder) in enumerate(zip(spec.data.concepts, folders, strict=True)):
        field = f"spec.data.concepts[{index}].instanceImages"
        examples = examples_from(
            folder, concept.instance_prompt, concept.caption_files, field, check=False
        )
        found += split_held_out(examples, concept.hold_out)[0]
    return found


def class_examples(spec: TrainingSpec, homes: list[ClassHome]) -> list[Example]:
    """Every concept's class images, in the order of `spec.data.concepts`: checked here,
    as they may be new (generated by rank 0), and named by the S3 prefix a folder mirrors."""
    found: list[Example] = []
    rules = ImageRules.of(spec.data)
    for concept, home in zip(spec.data.concepts, homes, strict=True):
        assert concept.class_prompt is not None
        with said_as(home.folder, home.uri):
            examples = examples_from(
                home.folder, concept.class_prompt, False, home.field, rules=rules
            )
        found += examples[: concept.class_images.count]
    return found


def _by_shape(pending: dict[int, Prepared]) -> list[list[int]]:
    """The slots of the images to encode, grouped by image shape (one VAE call each)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for slot, prepared in pending.items():
        groups.setdefault(tuple(prepared.pixels.shape), []).append(slot)
    return list(groups.values())
