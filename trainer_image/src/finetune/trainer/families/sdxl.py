"""Stable Diffusion XL: two CLIP text encoders and a UNet told the image's geometry.

The UNet's cross-attention input is both encoders' penultimate hidden states side by side;
its added embedding takes the second encoder's pooled (projected) embedding and the
`time_ids` (original size, crop corner, target size) of each image.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.api.methods import Method
from finetune.trainer.data.geometry import ImageGeometry
from finetune.trainer.errors import JobInputError
from finetune.trainer.families.base import Components, ModelFamily
from finetune.trainer.families.sd import tokenize

TOKENS = {"text_encoder": "input_ids", "text_encoder_2": "input_ids_2"}


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
    methods = frozenset({Method.LORA, Method.DREAMBOOTH})
    vae_in_float32 = True
    buckets_by_default = True
    card_tag = "stable-diffusion-xl"

    def load(self, folder: Path) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        try:
            return Components(
                folder=folder,
                family=self,
                tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
                text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                    folder, subfolder="text_encoder_2"
                ),
                vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
            )
        except (OSError, ValueError, KeyError) as exc:
            raise JobInputError(f"{folder}: cannot load the model: {exc}") from exc

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
        return self.pipeline_type()(**parts, scheduler=scheduler, add_watermarker=False)

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
