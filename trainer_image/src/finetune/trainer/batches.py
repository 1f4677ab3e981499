"""The micro-batches each rank trains on, as a pure function of the micro-step.

Concept methods (dreambooth, lora, customDiffusion) draw from a few instance
images, plus class images for prior preservation; the LCM methods draw from an
image-caption dataset that may be too large to hold. Either way a resumed run
sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .captions import CaptionStream
from .data import Example, ImagePreprocessor, IndexStream, Prepared
from .distributed import Rank
from .encoding import Encoder

if TYPE_CHECKING:
    from .methods import TrainingMethod


@dataclass
class Batch:
    latents: torch.Tensor
    text: dict[str, torch.Tensor]  # input_ids, or encoder_hidden_states
    prior_count: int = 0  # the last `prior_count` samples are class images
    mask: torch.Tensor | None = None  # [B, 1, h, w]: where each sample's loss counts


class Batches(Protocol):
    def batch(self, micro_step: int) -> Batch: ...


class ConceptBatches:
    """Instance images (and class images) dealt to the ranks in seeded epochs."""

    def __init__(
        self,
        instances: list[Example],
        classes: list[Example],
        method: TrainingMethod,
        encoder: Encoder,
        rank: Rank,
        batch_size: int,
        seed: int,
    ) -> None:
        self.instances = instances
        self.classes = classes
        self.method = method
        self.encoder = encoder
        self.rank = rank
        self.batch_size = batch_size
        self.instance_stream = IndexStream(len(instances), seed, salt=0)
        self.class_stream = IndexStream(max(1, len(classes)), seed, salt=1)

    def _take(
        self, stream: IndexStream, examples: list[Example], kind: str, micro_step: int
    ) -> list[tuple[Prepared, tuple[str, int]]]:
        chosen = []
        for position in stream.positions(
            micro_step, self.rank.rank, self.rank.world, self.batch_size
        ):
            index = stream.example_at(position)
            prepared = self.method.prepare(examples[index], position, kind == "class")
            chosen.append((prepared, (kind, index)))
        return chosen

    def batch(self, micro_step: int) -> Batch:
        chosen = self._take(self.instance_stream, self.instances, "instance", micro_step)
        prior_count = 0
        if self.classes:
            chosen += self._take(self.class_stream, self.classes, "class", micro_step)
            prior_count = self.batch_size
        latents = torch.cat(
            [
                self.encoder.latents(p.pixels[None], key if p.cacheable else None)
                for p, key in chosen
            ]
        )
        masks = [p.mask for p, _ in chosen]
        mask = None
        if any(m is not None for m in masks):
            ones = torch.ones_like(latents[:1, :1])
            mask = torch.cat([(m[None].to(latents) if m is not None else ones) for m in masks])
        prompts = [p.prompt for p, _ in chosen]
        return Batch(latents, self.encoder.text(prompts), prior_count, mask)


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

    def batch(self, micro_step: int) -> Batch:
        pixels, prompts = [], []
        for sample, position in self.stream.take(micro_step, self.batch_size):
            image, _ = self.preprocess(sample.decode(), position)
            pixels.append(image)
            prompts.append(sample.caption)
        latents = self.encoder.latents(torch.stack(pixels))
        return Batch(latents, self.encoder.text(prompts))
