"""What a model family is: the second plugin axis beside the training method.

A family knows its architecture: which parts a model folder holds and how they load,
how a prompt becomes the UNet's conditioning (and what else the UNet is given), which
diffusers pipeline samples with it and saves it, and how its LoRA files are laid out.
Methods ask their family; none checks which family it has.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finetune.trainer.data.geometry import ImageGeometry
from finetune.trainer.errors import JobInputError


def python_string(text: str) -> str:
    """`text` as a Python string literal in double quotes, for the code a model card shows
    (a prompt or path may hold quotes or backslashes)."""
    return json.dumps(text, ensure_ascii=False)


def read_model_index(folder: Path) -> dict[str, Any] | None:
    """A diffusers folder's `model_index.json`; None where it has none that is an object."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


@dataclass
class Components:
    """The loaded parts of a base model. `text_encoder`/`tokenizer` are the first (the
    only one for SD); a second, where the family has one, is `text_encoder_2`/`tokenizer_2`."""

    folder: Path
    family: ModelFamily
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    vae_folder: Path | None = None  # where the VAE came from when not `folder/vae`
    # The pipeline's own settings from `model_index.json` (`ModelFamily.pipeline_options`).
    pipeline_options: dict[str, Any] = field(default_factory=dict)

    @property
    def text_encoders(self) -> dict[str, Any]:
        """The text encoders by their pipeline name (`text_encoder`, `text_encoder_2`)."""
        return {
            name: getattr(self, name)
            for name in self.family.text_encoder_names
            if getattr(self, name) is not None
        }

    @property
    def tokenizers(self) -> dict[str, Any]:
        """The tokenizers by the name of the text encoder each feeds."""
        return {
            name: getattr(self, name.replace("text_encoder", "tokenizer"))
            for name in self.family.text_encoder_names
        }


class ModelFamily(ABC):
    """One architecture family. Stateless: one instance serves every run."""

    name: ClassVar[str]
    # The diffusers pipeline class (as `model_index.json` names it, and the model card).
    pipeline_class: ClassVar[str]
    # Folders a model folder of this family holds besides `model_index.json`.
    parts: ClassVar[tuple[str, ...]]
    text_encoder_names: ClassVar[tuple[str, ...]]
    # Keep the VAE in float32 whatever the precision (SDXL's overflows in fp16).
    vae_in_float32: ClassVar[bool] = False
    # Aspect-ratio buckets when `data.buckets` is unset (SDXL was trained with them).
    buckets_by_default: ClassVar[bool] = False
    card_tag: ClassVar[str]  # the hub tag of the model card
    # Token embedding files: the key of each text encoder's rows (diffusers' SDXL layout:
    # `clip_l`, `clip_g`). Empty: the one text encoder's row under the token itself.
    embedding_keys: ClassVar[Mapping[str, str]] = {}

    def load(self, folder: Path, vae_folder: Path | None = None) -> Components:
        """The parts the trainer works with, from a diffusers folder of this family; the
        VAE from `vae_folder` (an `AutoencoderKL` folder) where one is given."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        try:
            text = self.load_text(folder)
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
            scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
            vae = None if vae_folder else AutoencoderKL.from_pretrained(folder, subfolder="vae")
        except (OSError, ValueError, KeyError) as exc:
            raise JobInputError(f"{folder}: cannot load the model: {exc}") from exc
        if vae_folder is not None:
            try:
                vae = AutoencoderKL.from_pretrained(vae_folder)
            except (OSError, ValueError, KeyError) as exc:
                raise JobInputError(
                    f"spec.baseModel.vaeUri: {vae_folder}: cannot load the VAE: {exc}"
                ) from exc
        return Components(
            folder=folder,
            family=self,
            vae=vae,
            unet=unet,
            noise_scheduler=scheduler,
            vae_folder=vae_folder,
            pipeline_options=self.pipeline_options(folder),
            **text,
        )

    def pipeline_options(self, folder: Path) -> dict[str, Any]:
        """The settings of the family's pipeline that a model folder's `model_index.json`
        holds beside its parts; samples and saved models keep them as they came."""
        return {}

    @abstractmethod
    def load_text(self, folder: Path) -> dict[str, Any]:
        """The tokenizers and text encoders of a model folder, by `Components` field."""

    def pipeline_type(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    @abstractmethod
    def pipeline(self, components: Components, scheduler: Any, **trained: Any) -> Any:
        """The family's pipeline over `components`, trained modules in place of theirs."""

    @abstractmethod
    def tokenize(
        self, components: Components, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Token ids for each text encoder, by the name its encoder reads them under."""

    @abstractmethod
    def encode(
        self, text_encoders: Mapping[str, nn.Module], tokens: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The prompt's conditioning from its token ids (`tokenize`)."""

    def image_inputs(
        self, geometry: list[ImageGeometry], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """What the UNet is told about each training image beside its latents."""
        return {}

    @abstractmethod
    def unet_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The UNet's keyword arguments beside the latents and timesteps, from a batch's
        conditioning (`encode`) and image inputs (`image_inputs`)."""

    def embedding_file(
        self, token: str, rows: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A new token's trained embedding (its row in each text encoder, by name) as the
        file `load_textual_inversion` reads: `{token: row}` for one text encoder, else a
        `[1, width]` tensor per encoder under its `embedding_keys` entry."""
        if not self.embedding_keys:
            (row,) = rows.values()
            return {token: row}
        return {key: rows[name][None] for name, key in self.embedding_keys.items()}

    def embedding_usage(self, folder: str, tokens: list[str]) -> list[str]:
        """Python lines that load each token's file (`embedding_file`) from `folder` into
        the text encoders of a pipeline `pipe`."""
        q = python_string
        if not self.embedding_keys:
            return [
                f"pipe.load_textual_inversion({q(folder)}, weight_name={q(token + '.safetensors')})"
                for token in tokens
            ]
        lines = ["from safetensors.torch import load_file"]
        for token in tokens:
            lines.append(f"rows = load_file({q(f'{folder}/{token}.safetensors')})")
            for name, key in self.embedding_keys.items():
                tokenizer = name.replace("text_encoder", "tokenizer")
                lines.append(
                    f"pipe.load_textual_inversion(rows[{q(key)}], token={q(token)}, "
                    f"text_encoder=pipe.{name}, tokenizer=pipe.{tokenizer})"
                )
        return lines

    def unconditional(
        self,
        options: Mapping[str, Any],
        empty_prompt: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """`inputs` (a batch's conditioning and image inputs) with the prompt's part
        replaced by what the family's pipeline, with `options` (`pipeline_options`),
        guides away from when no negative prompt is given: by default the conditioning
        of the empty prompt, `empty_prompt` (`encode` of one ""). The image inputs stay
        the batch's."""
        return {
            **inputs,
            **{
                name: value.to(inputs[name]).expand_as(inputs[name])
                for name, value in empty_prompt.items()
            },
        }

    def save_lora(
        self,
        folder: Path,
        layers: Mapping[str, dict[str, torch.Tensor]],
        metadata: Mapping[str, dict[str, Any]],
    ) -> None:
        """LoRA layers by part (`unet`, `text_encoder`...) in diffusers' own file layout,
        as this family's pipeline writes and `load_lora_weights` reads it."""
        arguments: dict[str, Any] = {}
        for part, state in layers.items():
            arguments[f"{part}_lora_layers"] = state
            arguments[f"{part}_lora_adapter_metadata"] = metadata[part]
        self.pipeline_type().save_lora_weights(folder, **arguments, safe_serialization=True)
