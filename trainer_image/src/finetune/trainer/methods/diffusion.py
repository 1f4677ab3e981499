"""The denoising loss every Stable Diffusion fine-tuning method shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from finetune.api.hyperparameters import Hyperparameters


@dataclass
class NoisedBatch:
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def in_dtype(inputs: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A batch's inputs with the floating-point ones in `dtype` (token ids stay integers)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}


def add_noise(latents: torch.Tensor, scheduler: object, hp: Hyperparameters) -> NoisedBatch:
    """Sample noise (with the optional offset) and timesteps, and noise the latents."""
    noise = torch.randn_like(latents)
    if hp.noise_offset:
        noise += hp.noise_offset * torch.randn(
            latents.shape[0], latents.shape[1], 1, 1, device=latents.device
        )
    steps = scheduler.config.num_train_timesteps  # type: ignore[attr-defined]
    timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)  # type: ignore[attr-defined]
    prediction = scheduler.config.prediction_type  # type: ignore[attr-defined]
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)  # type: ignore[attr-defined]
    else:
        raise ValueError(f"unsupported prediction type {prediction!r} in the model's scheduler")
    return NoisedBatch(noisy, timesteps, target)


def denoising_loss(
    prediction: torch.Tensor,
    noised: NoisedBatch,
    scheduler: object,
    hp: Hyperparameters,
    prior_count: int = 0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE against the target, Min-SNR weighted when `snrGamma` is set. The last
    `prior_count` samples are class images, weighted by `priorLossWeight`. A `mask`
    ([B, 1, h, w]) limits each sample's loss to where it is 1."""
    prediction, target = prediction.float(), noised.target.float()
    squared = F.mse_loss(prediction, target, reduction="none")
    if mask is None:
        per_sample = squared.mean(dim=(1, 2, 3))
    else:
        weights = mask.float().expand_as(squared)
        per_sample = (squared * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))
    if hp.snr_gamma is not None:
        snr = compute_snr(scheduler, noised.timesteps)
        weights = torch.clamp(snr, max=hp.snr_gamma) / snr
        if scheduler.config.prediction_type == "v_prediction":  # type: ignore[attr-defined]
            weights = torch.clamp(snr, max=hp.snr_gamma) / (snr + 1)
        per_sample = per_sample * weights
    if prior_count:
        instance, prior = per_sample[:-prior_count], per_sample[-prior_count:]
        return instance.mean() + hp.prior_loss_weight * prior.mean()
    return per_sample.mean()
