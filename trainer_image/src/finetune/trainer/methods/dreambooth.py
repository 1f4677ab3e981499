"""DreamBooth: the whole UNet trains, and optionally the whole text encoder(s)."""

from __future__ import annotations

from pathlib import Path

from finetune.trainer.methods.base import TrainedModules, TrainingMethod
from finetune.trainer.models.components import save_pipeline


class DreamBooth(TrainingMethod):
    def build(self) -> TrainedModules:
        c = self.components
        c.unet.requires_grad_(True)
        c.vae.requires_grad_(False)
        for encoder in c.text_encoders.values():
            encoder.requires_grad_(self.trains_text_encoder)
        text_encoders = c.text_encoders if self.trains_text_encoder else {}
        if self.spec.training.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
            for encoder in text_encoders.values():
                encoder.gradient_checkpointing_enable()
        return TrainedModules(c.unet, family=c.family, **text_encoders)

    def save(self, module: TrainedModules, folder: Path) -> list[Path]:
        """A complete pipeline folder that the family's pipeline class loads with
        `from_pretrained` (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`)."""
        trained = {"unet": module.unet, **module.text_encoders}
        return save_pipeline(
            self.components, _inference_scheduler(self.components.folder), folder, **trained
        )


def _inference_scheduler(model_folder: Path) -> object:
    """The base model's own scheduler, as the pipeline should ship with it."""
    import json

    from diffusers import schedulers

    config = json.loads((model_folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(schedulers, config.get("_class_name", "DDPMScheduler"))
    return scheduler_class.from_pretrained(model_folder, subfolder="scheduler")
