"""The small interface every training method implements; the loop does the rest.

A method says which modules train (gathered in one `nn.Module`, since
DeepSpeed takes one model per engine), computes the loss of a batch, and saves
what it trained. Data, the optimizer, checkpoints and samples are shared; the
optional hooks below let a method prepare its images, keep extra state (the
LCM target network) and pick the scheduler its samples use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.api.training import TrainingSpec
from finetune.trainer.data.batches import Batch
from finetune.trainer.data.concepts import Example, ImagePreprocessor, Prepared
from finetune.trainer.data.encoding import Encoder
from finetune.trainer.data.images import ImageRules
from finetune.trainer.families import Components, ModelFamily
from finetune.trainer.methods.diffusion import add_noise, denoising_loss, in_dtype


@dataclass(frozen=True)
class TeacherSampling:
    """A teacher sampling through the base model's pipeline: its modules in place of the
    base's (by pipeline name), its own scheduler's config and pipeline settings."""

    modules: dict[str, nn.Module]
    scheduler_config: Any
    pipeline_options: dict[str, Any]


class TrainedModules(nn.Module):
    """Every module with trainable parameters, so one DeepSpeed engine holds them all.

    Training the text encoder beside the UNet is the case the reference
    DreamBooth script cannot run under DeepSpeed; one wrapper module fixes it.
    Text encoders that train sit here under their pipeline names (`text_encoder`,
    `text_encoder_2`); the model's family turns tokens into the UNet's conditioning.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None = None,
        *,
        family: ModelFamily,
        text_encoder_2: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.family = family

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders that train, by name."""
        found = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {name: module for name, module in found.items() if module is not None}

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        **inputs: torch.Tensor,
    ) -> torch.Tensor:
        """`inputs`: token ids when text encoders train, else their conditioning; and
        what the family's UNet takes of the images (SDXL's `time_ids`)."""
        if self.text_encoders:
            inputs = {**inputs, **self.family.encode(self.text_encoders, inputs)}
        return self.unet(  # type: ignore[no-any-return]
            noisy_latents,
            timesteps,
            timestep_cond=timestep_cond,
            **self.family.unet_inputs(inputs),
        ).sample


class TrainingMethod(ABC):
    """One training method. Subclasses set up what trains and how it is saved."""

    def __init__(
        self, spec: TrainingSpec, components: Components, teacher_folder: Path | None = None
    ) -> None:
        self.spec = spec
        self.components = components
        self.teacher_folder = teacher_folder
        data = spec.data
        self.preprocess = ImagePreprocessor(
            data.resolution,
            data.center_crop,
            data.random_flip,
            spec.training.seed,
            ImageRules.of(data),
        )

    @property
    def trains_text_encoder(self) -> bool:
        return self.spec.training.train_text_encoder

    @abstractmethod
    def build(self) -> TrainedModules:
        """Freeze what stays fixed, add adapters, and wrap what trains."""

    def parameter_groups(self, module: TrainedModules) -> list[dict[str, Any]]:
        hp = self.spec.training
        groups = [
            {
                "params": [p for p in module.unet.parameters() if p.requires_grad],
                "lr": hp.learning_rate,
            }
        ]
        if module.text_encoders:
            te_params = [
                p
                for encoder in module.text_encoders.values()
                for p in encoder.parameters()
                if p.requires_grad
            ]
            groups.append(
                {"params": te_params, "lr": hp.text_encoder_learning_rate or hp.learning_rate}
            )
        return groups

    def prepare(self, example: Example, position: int, is_class: bool) -> Prepared:
        """One concept image as it goes into the VAE, with its prompt."""
        pixels, deterministic, geometry = self.preprocess(example.image, position, example.size)
        return Prepared(pixels, example.prompt, deterministic, geometry=geometry)

    @property
    def keeps_aspect_ratio(self) -> bool:
        """Whether `prepare` trains each image at the size its `Example` names, so that
        aspect-ratio buckets (`data.buckets`) can apply; False where it makes squares."""
        return True

    def attach(self, encoder: Encoder) -> None:
        """Called once the devices are known, before training: place extra models."""
        return

    def loss(self, engine: Any, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        """The denoising loss of one micro-batch, computed through the engine."""
        scheduler = self.components.noise_scheduler
        noised = add_noise(batch.latents, scheduler, self.spec.training)
        inputs = in_dtype(batch.text, dtype)
        prediction = engine(noised.noisy_latents.to(dtype), noised.timesteps, **inputs)
        return denoising_loss(
            prediction, noised, scheduler, self.spec.training, batch.prior_count, batch.mask
        )

    def after_step(self, module: TrainedModules) -> None:
        """Called after each optimizer step."""
        return

    def frozen_models(self) -> dict[str, nn.Module]:
        """Models of the method's own that only run (LCM's teacher), by name: the
        precision plan stores them on the device in the compute dtype."""
        return {}

    def teacher_sampling(self) -> TeacherSampling | None:
        """How the method's teacher samples (LCM's), for images to compare the trained
        model with; None for methods without a teacher."""
        return None

    def checkpoint_state(self) -> dict[str, Any] | None:
        """State of the method's own to save with each checkpoint (identical on every rank)."""
        return None

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what `checkpoint_state` returned."""
        return

    @abstractmethod
    def save(self, module: TrainedModules, folder: Path) -> list[Path]:
        """Write the final weights into `folder`; return the files written."""

    def sampling_modules(self, module: TrainedModules) -> dict[str, nn.Module]:
        """The trained modules to put into a pipeline for samples."""
        return {"unet": module.unet, **module.text_encoders}

    def sampling_scheduler(self) -> Any:
        """The scheduler validation samples use: DPM-Solver, good in 20-25 steps."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(self.components.noise_scheduler.config)
