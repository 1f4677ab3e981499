"""A base model's components, loaded from its diffusers folder (see `sources`) by its
family, and the family's pipelines assembled from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from finetune.trainer.families import Components, ModelFamily, detect


def load_components(
    folder: Path, family: ModelFamily | None = None, vae_folder: Path | None = None
) -> Components:
    """The parts of the model in `folder`, loaded as `family` (by default the one its
    `model_index.json` names); the VAE from `vae_folder` where one is given."""
    return (family or detect(folder)).load(folder, vae_folder)


def assemble_pipeline(components: Components, scheduler: Any, **trained: Any) -> Any:
    """The family's pipeline over the loaded components, with trained modules in place
    of theirs."""
    return components.family.pipeline(components, scheduler, **trained)


def inference_pipeline(
    components: Components,
    scheduler: Any = None,
    *,
    pipeline_options: dict[str, Any] | None = None,
    **trained: Any,
) -> Any:
    """A pipeline for validation images and class images; DPM-Solver unless `scheduler`
    is given, with the components' pipeline settings unless `pipeline_options` are."""
    from diffusers import DPMSolverMultistepScheduler

    if pipeline_options is not None:
        components = dataclasses.replace(components, pipeline_options=pipeline_options)
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
    """A complete float32 pipeline folder that the family's pipeline class loads with
    `from_pretrained`; returns the files written."""
    import torch

    pipeline = assemble_pipeline(
        components, scheduler, **{**as_they_came(components, trained), **trained}
    )
    pipeline.to(torch.float32)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def as_they_came(components: Components, trained: dict[str, Any]) -> dict[str, Any]:
    """The frozen parts the precision plan stored in a lower dtype, loaded again in
    float32 from their folders: a saved model ships them as they came, not rounded."""
    import torch

    parts = {}
    for name in ("vae", *components.family.text_encoder_names):
        module = getattr(components, name)
        if name in trained or module is None or module.dtype == torch.float32:
            continue
        if name == "vae" and components.vae_folder is not None:
            parts[name] = type(module).from_pretrained(components.vae_folder)
        else:
            parts[name] = type(module).from_pretrained(components.folder, subfolder=name)
    return parts


__all__ = [
    "Components",
    "assemble_pipeline",
    "inference_pipeline",
    "load_components",
    "save_pipeline",
]
