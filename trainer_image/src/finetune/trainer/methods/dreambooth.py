"""DreamBooth: the whole UNet trains, and optionally the whole text encoder."""

from __future__ import annotations

from pathlib import Path

from finetune.trainer.methods.base import TrainedModules, TrainingMethod
from finetune.trainer.models.components import save_pipeline


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
        trained = {"unet": module.unet}
        if module.text_encoder is not None:
            trained["text_encoder"] = module.text_encoder
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
