"""The evaluator models, loaded from local folders through transformers, and freed after use.

CLIP (`CLIPModel`, its tokenizer and image processor) embeds images and prompts in one
space; a DINO ViT (`ViTModel` without its pooler, `ViTImageProcessor`) embeds images by
its CLS token, as the DreamBooth paper measures subject fidelity. Both run in float32
under `torch.no_grad`, in batches, and hand back float32 embeddings on the CPU.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from PIL.Image import Image

BATCH_SIZE = 16
T = TypeVar("T")


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ImageEmbedder(Protocol):
    def images(self, images: Sequence[Image]) -> torch.Tensor: ...


class ClipEmbedder:
    """CLIP image and text embeddings (after the projections), one space for both."""

    def __init__(self, folder: Path, device: torch.device, batch_size: int = BATCH_SIZE) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.device = device
        self.batch_size = batch_size
        self.model: Any = CLIPModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        self.processor: Any = AutoImageProcessor.from_pretrained(folder)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(folder)
        # Prompts longer than the text tower's positions are cut, as when training.
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def images(self, images: Sequence[Image]) -> torch.Tensor:
        found = []
        for batch in batches(images, self.batch_size):
            pixels = self.processor(images=list(batch), return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            found.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(found)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        found = []
        for batch in batches(prompts, self.batch_size):
            tokens = self.tokenizer(
                list(batch),
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output
            found.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(found)


class DinoEmbedder:
    """The CLS token of a DINO ViT's last layer."""

    def __init__(self, folder: Path, device: torch.device, batch_size: int = BATCH_SIZE) -> None:
        from transformers import AutoImageProcessor, ViTModel

        self.device = device
        self.batch_size = batch_size
        self.model: Any = (
            ViTModel.from_pretrained(folder, add_pooling_layer=False, dtype=torch.float32)
            .to(device)
            .eval()
        )
        self.processor: Any = AutoImageProcessor.from_pretrained(folder)

    @torch.no_grad()
    def images(self, images: Sequence[Image]) -> torch.Tensor:
        found = []
        for batch in batches(images, self.batch_size):
            pixels = self.processor(images=list(batch), return_tensors="pt")["pixel_values"]
            hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state
            found.append(hidden[:, 0].float().cpu())
        return torch.cat(found)


E = TypeVar("E", ClipEmbedder, DinoEmbedder)


@contextmanager
def loaded(kind: type[E], folder: Path, device: torch.device) -> Iterator[E]:
    """An evaluator for the duration of a block; its memory is given back afterwards, so
    a run trains with none of it held (CLIP ViT-L/14 is 1.7 GB in float32)."""
    embedder = kind(folder, device)
    try:
        yield embedder
    finally:
        del embedder
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
