"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden states are the
UNet's cross-attention input."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.trainer.families.base import Components, ModelFamily


def tokenize(tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Token ids padded and cut to the tokenizer's limit (77 for CLIP)."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)  # type: ignore[no-any-return]


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    text_encoder_names = ("text_encoder",)
    card_tag = "stable-diffusion"

    def load_text(self, folder: Path) -> dict[str, Any]:
        from transformers import CLIPTextModel, CLIPTokenizer

        return {
            "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        }

    def pipeline(self, components: Components, scheduler: Any, **trained: Any) -> Any:
        parts = {
            "vae": components.vae,
            "text_encoder": components.text_encoder,
            "tokenizer": components.tokenizer,
            "unet": components.unet,
            **trained,
        }
        return self.pipeline_type()(
            **parts,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def tokenize(
        self, components: Components, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {"input_ids": tokenize(components.tokenizer, prompts, device)}

    def encode(
        self, text_encoders: Mapping[str, nn.Module], tokens: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": text_encoders["text_encoder"](tokens["input_ids"])[0]}

    def unet_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": inputs["encoder_hidden_states"]}
