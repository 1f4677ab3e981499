"""Stable Diffusion XL: two CLIP text encoders and a UNet told the image's geometry.

The UNet's cross-attention input is both encoders' penultimate hidden states side by side;
its added embedding takes the second encoder's pooled (projected) embedding and the
`time_ids` (original size, crop corner, target size) of each image.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finetune.trainer.data.geometry import ImageGeometry
from finetune.trainer.families.base import Components, ModelFamily, read_model_index
from finetune.trainer.families.sd import tokenize

TOKENS = {"text_encoder": "input_ids", "text_encoder_2": "input_ids_2"}
FORCE_ZEROS = "force_zeros_for_empty_prompt"


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    parts = (
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    text_encoder_names = ("text_encoder", "text_encoder_2")
    vae_in_float32 = True
    buckets_by_default = True
    card_tag = "stable-diffusion-xl"
    embedding_keys: ClassVar[Mapping[str, str]] = {
        "text_encoder": "clip_l",
        "text_encoder_2": "clip_g",
    }

    def load_text(self, folder: Path) -> dict[str, Any]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return {
            "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            "tokenizer_2": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2"
            ),
        }

    def pipeline(self, components: Components, scheduler: Any, **trained: Any) -> Any:
        parts = {
            "vae": components.vae,
            "text_encoder": components.text_encoder,
            "text_encoder_2": components.text_encoder_2,
            "tokenizer": components.tokenizer,
            "tokenizer_2": components.tokenizer_2,
            "unet": components.unet,
            **trained,
        }
        # No invisible watermark: it needs a package of its own and alters every sample.
        return self.pipeline_type()(
            **parts, scheduler=scheduler, add_watermarker=False, **components.pipeline_options
        )

    def tokenize(
        self, components: Components, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {
            TOKENS[name]: tokenize(tokenizer, prompts, device)
            for name, tokenizer in components.tokenizers.items()
        }

    def encode(
        self, text_encoders: Mapping[str, nn.Module], tokens: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        hidden = []
        for name in self.text_encoder_names:
            output = text_encoders[name](tokens[TOKENS[name]], output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # the penultimate layer, as SDXL trained
        # The second encoder's first output is its projected, pooled embedding.
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": output[0]}

    def image_inputs(
        self, geometry: list[ImageGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]:
        rows = [[*g.original, *g.crop, *g.target] for g in geometry]
        return {"time_ids": torch.tensor(rows, dtype=torch.float32, device=device)}

    def unet_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "encoder_hidden_states": inputs["encoder_hidden_states"],
            "added_cond_kwargs": {
                "text_embeds": inputs["text_embeds"],
                "time_ids": inputs["time_ids"],
            },
        }

    def pipeline_options(self, folder: Path) -> dict[str, Any]:
        # Whether the pipeline guides away from zeros or from the empty prompt when no
        # negative prompt is given; diffusers' default, True, where the folder says nothing.
        index = read_model_index(folder) or {}
        return {FORCE_ZEROS: bool(index.get(FORCE_ZEROS, True))}

    def unconditional(
        self,
        options: Mapping[str, Any],
        empty_prompt: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        if not options.get(FORCE_ZEROS, True):
            return super().unconditional(options, empty_prompt, inputs)
        # Zeros for the hidden states and the pooled embedding, as SDXL base's pipeline
        # guides, and as diffusers' SDXL LCM scripts distill. The time ids stay the
        # image's: they describe its geometry, not the prompt.
        return {**inputs, **{name: torch.zeros_like(inputs[name]) for name in empty_prompt}}
