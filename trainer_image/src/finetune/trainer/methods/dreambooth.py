"""DreamBooth: the whole UNet trains, and optionally the whole text encoder."""

from __future__ import annotations

from pathlib import Path

from .base import TrainedModules, TrainingMethod


class DreamBooth(TrainingMethod):
    def build(self) -> TrainedModules:
        unet = self.components.unet
        text_encoder = self.components.text_encoder if self.trains_text_encoder else None
        unet.requires_grad_(True)
        self.components.vae.requires_grad_(False)
        self.components.text_encoder.requires_grad_(self.trains_text_encoder)
        if self.spec.training.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if text_encoder is not None:
                text_encoder.gradient_checkpointing_enable()
        return TrainedModules(unet, text_encoder)

    def save(self, module: TrainedModules, folder: Path) -> list[Path]:
        """A complete pipeline folder that `StableDiffusionPipeline.from_pretrained` loads."""
        import torch
        from diffusers import StableDiffusionPipeline

        c = self.components
        pipeline = StableDiffusionPipeline(
            vae=c.vae,
            text_encoder=module.text_encoder or c.text_encoder,
            tokenizer=c.tokenizer,
            unet=module.unet,
            scheduler=_inference_scheduler(c.folder),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.to(torch.float32)
        pipeline.save_pretrained(folder, safe_serialization=True)
        return sorted(p for p in folder.rglob("*") if p.is_file())


def _inference_scheduler(model_folder: Path) -> object:
    """The base model's own scheduler, as the pipeline should ship with it."""
    import json

    from diffusers import schedulers

    config = json.loads((model_folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(schedulers, config.get("_class_name", "DDPMScheduler"))
    return scheduler_class.from_pretrained(model_folder, subfolder="scheduler")
