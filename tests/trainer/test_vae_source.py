"""`baseModel.vaeUri`: a VAE of the job's own in place of the model's, such as SDXL's
fp16-fix VAE. It runs in the compute dtype, and full-model outputs ship it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.jobs import finetune_run, job_file, refused

pytestmark = pytest.mark.slow


def other_vae(model: Path, folder: Path) -> Path:
    """The model's own VAE with every weight moved: a VAE that differs from its own."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.mul_(0.9)
    vae.save_pretrained(folder)
    return folder


def test_an_sdxl_dreambooth_run_trains_with_the_jobs_vae_in_bf16_and_ships_it(
    tmp_path: Path, tiny_sdxl_model: Path, disc_images: Path
) -> None:
    from diffusers import AutoencoderKL

    vae = other_vae(tiny_sdxl_model, tmp_path / "vae-fix")
    job = job_file(
        tmp_path,
        tiny_sdxl_model,
        disc_images,
        method="dreambooth",
        baseModel={"vaeUri": str(vae)},
        training={"maxSteps": 2, "mixedPrecision": "bf16"},
        checkpointing={"everyNSteps": 2},
    )
    run = finetune_run(job, nproc=1)

    # SDXL's own VAE would stay float32 under bf16; the job's own runs in bf16.
    plan = next(line for line in run.stderr.splitlines() if "precision plan" in line)
    assert re.search(r"; vae: \d+ bfloat16(;|$)", plan), plan
    shipped = AutoencoderKL.from_pretrained(tmp_path / "out", subfolder="vae").state_dict()
    given = AutoencoderKL.from_pretrained(vae).state_dict()
    own = AutoencoderKL.from_pretrained(tiny_sdxl_model, subfolder="vae").state_dict()
    assert shipped.keys() == given.keys()
    for name, tensor in shipped.items():
        torch.testing.assert_close(tensor, given[name], msg=name)
    assert any(not torch.equal(shipped[name], own[name]) for name in own)
    # The frozen parts ship as they came, not as the bf16 copies training ran with.
    for part in ("text_encoder", "text_encoder_2"):
        saved = load_file(tmp_path / "out" / part / "model.safetensors")
        base = load_file(tiny_sdxl_model / part / "model.safetensors")
        assert saved.keys() == base.keys(), part
        assert all(torch.equal(saved[k], base[k]) for k in base), part


def test_a_vae_uri_that_holds_no_vae_is_refused_naming_the_field(
    tmp_path: Path, tiny_model: Path, disc_images: Path
) -> None:
    job = job_file(
        tmp_path, tiny_model, disc_images, baseModel={"vaeUri": str(tiny_model / "unet")}
    )
    refused(job, "spec.baseModel.vaeUri", "UNet2DConditionModel, not an AutoencoderKL")
    job = job_file(tmp_path, tiny_model, disc_images, baseModel={"vaeUri": str(tmp_path / "none")})
    refused(job, "spec.baseModel.vaeUri", "no config.json")
    odd = tmp_path / "odd-vae"
    odd.mkdir()
    (odd / "config.json").write_text("[]")
    job = job_file(tmp_path, tiny_model, disc_images, baseModel={"vaeUri": str(odd)})
    refused(job, "spec.baseModel.vaeUri", "config.json is not a JSON object")
