"""The small interface every training method implements; the loop does the rest.

A method says which modules train (gathered in one `nn.Module`, since
DeepSpeed takes one model per engine), computes the loss of a batch, and saves
what it trained. Data, the optimizer, checkpoints and samples are shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...api.training import TrainingSpec
from ..diffusion import add_noise, denoising_loss
from ..models import Components


class TrainedModules(nn.Module):
    """Every module with trainable parameters, so one DeepSpeed engine holds them all.

    Training the text encoder beside the UNet is the case the reference
    DreamBooth script cannot run under DeepSpeed; one wrapper module fixes it.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.text_encoder is not None:
            assert input_ids is not None
            encoder_hidden_states = self.text_encoder(input_ids)[0]
        assert encoder_hidden_states is not None
        return self.unet(noisy_latents, timesteps, encoder_hidden_states).sample  # type: ignore[no-any-return]


class TrainingMethod(ABC):
    """One training method. Subclasses set up what trains and how it is saved."""

    def __init__(self, spec: TrainingSpec, components: Components) -> None:
        self.spec = spec
        self.components = components

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
        if module.text_encoder is not None:
            te_params = [p for p in module.text_encoder.parameters() if p.requires_grad]
            groups.append(
                {"params": te_params, "lr": hp.text_encoder_learning_rate or hp.learning_rate}
            )
        return groups

    def loss(
        self,
        engine: Any,
        latents: torch.Tensor,
        text: dict[str, torch.Tensor],
        prior_count: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The denoising loss of one micro-batch, computed through the engine."""
        scheduler = self.components.noise_scheduler
        noised = add_noise(latents, scheduler, self.spec.training)
        inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in text.items()}
        prediction = engine(noised.noisy_latents.to(dtype), noised.timesteps, **inputs)
        return denoising_loss(prediction, noised, scheduler, self.spec.training, prior_count)

    @abstractmethod
    def save(self, module: TrainedModules, folder: Path) -> list[Path]:
        """Write the final weights into `folder`; return the files written."""

    def sampling_modules(self, module: TrainedModules) -> dict[str, nn.Module]:
        """The trained modules to put into a pipeline for samples."""
        parts: dict[str, nn.Module] = {"unet": module.unet}
        if module.text_encoder is not None:
            parts["text_encoder"] = module.text_encoder
        return parts
