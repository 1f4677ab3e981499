"""A base model's components, loaded from its diffusers folder (see `sources`), and the
pipelines assembled from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.trainer.errors import JobInputError


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline the trainer works with."""

    folder: Path
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any


def load_components(folder: Path) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        return Components(
            folder=folder,
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise JobInputError(f"{folder}: cannot load the model: {exc}") from exc


def assemble_pipeline(components: Components, scheduler: Any, **trained: Any) -> Any:
    """A pipeline over the loaded components, with trained modules in place of theirs."""
    from diffusers import StableDiffusionPipeline

    parts = {
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "tokenizer": components.tokenizer,
        "unet": components.unet,
        **trained,
    }
    return StableDiffusionPipeline(
        **parts,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def inference_pipeline(components: Components, scheduler: Any = None, **trained: Any) -> Any:
    """A pipeline for validation images and class images; DPM-Solver unless `scheduler`
    is given."""
    from diffusers import DPMSolverMultistepScheduler

    pipeline = assemble_pipeline(
        components,
        scheduler or DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config),
        **trained,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_pipeline(
    components: Components, scheduler: Any, folder: Path, **trained: Any
) -> list[Path]:
    """A complete float32 pipeline folder that `StableDiffusionPipeline.from_pretrained`
    loads; returns the files written."""
    import torch

    pipeline = assemble_pipeline(components, scheduler, **trained)
    pipeline.to(torch.float32)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return sorted(p for p in folder.rglob("*") if p.is_file())
