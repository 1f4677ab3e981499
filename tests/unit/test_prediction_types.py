"""Stable Diffusion 2.x predicts v, 1.x the noise: the training target and the samples
follow the model's scheduler config. A UNet that predicts the exact answer shows it: it
has no loss against the right target, and its samples land on the image it knows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.api.hyperparameters import Hyperparameters
from finetune.assets import build_model
from finetune.trainer.methods.diffusion import add_noise, denoising_loss
from finetune.trainer.models.components import inference_pipeline, load_components

KINDS = ("epsilon", "v_prediction")


@pytest.fixture(scope="module")
def v_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("sd2") / "tiny-v", prediction_type="v_prediction")


def alpha_sigma(scheduler: object, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cumulative = scheduler.alphas_cumprod[timesteps].float()  # type: ignore[attr-defined]
    return cumulative.sqrt()[:, None, None, None], (1 - cumulative).sqrt()[:, None, None, None]


def oracle(kind: str, image: torch.Tensor, scheduler: object):  # type: ignore[no-untyped-def]
    """A UNet that knows the clean latents `image`: its exact prediction of `kind`
    (the noise, or v = alpha * noise - sigma * image) for any noisy latents."""

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(scheduler, timesteps.reshape(-1).expand(len(noisy)))
        noise = (noisy - alpha * image) / sigma
        return noise if kind == "epsilon" else alpha * noise - sigma * image

    return predict


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_the_loss_targets_what_the_scheduler_config_predicts(
    kind: str, snr_gamma: float | None
) -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=kind)
    hp = Hyperparameters(snrGamma=snr_gamma)
    torch.manual_seed(0)
    latents = torch.randn(8, 4, 8, 8)
    noised = add_noise(latents, scheduler, hp)
    for answer in KINDS:
        prediction = oracle(answer, latents, scheduler)(noised.noisy_latents, noised.timesteps)
        loss = float(denoising_loss(prediction, noised, scheduler, hp))
        if answer == kind:
            assert loss < 1e-8, (answer, loss)
        else:
            assert loss > 1e-3, (answer, loss)


@torch.no_grad()
def test_a_v_prediction_models_samples_are_denoised_as_v(v_model: Path) -> None:
    """The validation pipeline's scheduler reads the UNet's output as v: driven by a UNet
    that predicts v exactly, it ends on the known image (read as noise it would not)."""
    pipeline = inference_pipeline(load_components(v_model))
    scheduler = pipeline.scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ends = {}
    for kind in KINDS:
        predict = oracle(kind, image, scheduler)
        scheduler.set_timesteps(20)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            latents = scheduler.step(predict(latents, t), t, latents).prev_sample
        ends[kind] = float((latents - image).abs().max())
    assert ends["v_prediction"] < 1e-2, ends
    assert ends["epsilon"] > 0.1, ends
