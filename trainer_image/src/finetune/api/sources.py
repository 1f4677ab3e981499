"""Where a job's models come from: a diffusers model by URI, and the base model's family."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from .common import ApiModel, SecretKeyRef, Uri


class ModelSource(ApiModel):
    """Where a diffusers model comes from."""

    uri: Uri = Field(
        description=(
            "`hf://org/name[@revision]` (pin the revision for reproducible runs), "
            "`s3://bucket/prefix` holding a diffusers folder, or a local diffusers folder."
        ),
    )
    hub_token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a Hugging Face token, for gated or private hub models.",
    )


class ModelFamily(StrEnum):
    AUTO = "auto"
    SD = "sd"
    SDXL = "sdxl"


class BaseModelSource(ModelSource):
    """The model to fine-tune, and which architecture family it is."""

    family: ModelFamily = Field(
        default=ModelFamily.AUTO,
        description=(
            "`sd` (Stable Diffusion 1.x and 2.x), `sdxl` (Stable Diffusion XL), or `auto`: "
            "read from the model folder's `model_index.json` (`StableDiffusionPipeline`: "
            "sd, `StableDiffusionXLPipeline`: sdxl). Both train every method; a family the trainer cannot train is refused "
            "before training starts."
        ),
    )
    vae_uri: Uri | None = Field(
        default=None,
        description=(
            "A VAE to use instead of the model's own `vae/`, e.g. "
            "`hf://madebyollin/sdxl-vae-fp16-fix`: a folder, `s3://` prefix or `hf://` "
            "repository holding a diffusers `AutoencoderKL` (`config.json` and weights). It "
            "encodes the training images, decodes the samples and is saved into full-model "
            "outputs. It runs in the compute dtype; without it SDXL's own VAE runs in "
            "float32, since it overflows in fp16."
        ),
    )
