"""Settings only some methods read: LoRA adapters (`lora`), Custom Diffusion's tokens and
frozen weights (`customDiffusion`), and LCM distillation (`lcm`)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field

from .common import ApiModel
from .sources import ModelSource

MAX_TOKENS = 16
MAX_MODULES = 32


TargetModules = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=128)]],
    Field(min_length=1, max_length=MAX_MODULES),
]


class LoraSpec(ApiModel):
    """LoRA adapters (methods lora and lcmLora)."""

    rank: int | None = Field(
        default=None, ge=1, le=1024, description="Adapter rank. Default: lora 4, lcmLora 64."
    )
    alpha: float | None = Field(
        default=None, gt=0, description="Scaling alpha; default equal to `rank`."
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout inside the adapters.")
    target_modules: TargetModules | None = Field(
        default=None,
        description=(
            "UNet modules that get adapters. Default: lora the attention projections "
            "(`to_k`, `to_q`, `to_v`, `to_out.0`); lcmLora also `proj_in`, `proj_out`, the "
            "feed-forward layers, the ResNet convolutions, down/upsamplers and `time_emb_proj`."
        ),
    )
    text_encoder_target_modules: TargetModules = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        description="Text-encoder modules that get adapters when `training.trainTextEncoder` is on.",
    )


class FreezeMode(StrEnum):
    CROSSATTN_KV = "crossattnKV"
    CROSSATTN = "crossattn"


# A token names its embedding file (`<token>.safetensors`), so no path separators.
Token = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\s/\\]+$")]


class CustomDiffusionSpec(ApiModel):
    """Custom Diffusion: new tokens plus cross-attention weights."""

    modifier_tokens: list[Token] = Field(
        default_factory=list,
        max_length=MAX_TOKENS,
        description="New tokens, one per concept, used in the prompts (e.g. `<new1>`).",
    )
    initializer_tokens: list[Token] = Field(
        default_factory=lambda: ["ktn", "pll", "ucd"],
        max_length=MAX_TOKENS,
        description="Existing tokens whose embeddings initialise the modifier tokens, in order.",
    )
    freeze_model: FreezeMode = Field(
        default=FreezeMode.CROSSATTN_KV,
        description=(
            "UNet weights that train: cross-attention key/value (`crossattnKV`) or "
            "key/value/query/output (`crossattn`)."
        ),
    )
    augmentation: bool = Field(
        default=True,
        description="Random-scale augmentation with the masked loss of the reference method.",
    )


class LcmLoss(StrEnum):
    L2 = "l2"
    HUBER = "huber"


class LcmSpec(ApiModel):
    """Latent consistency distillation (methods lcm and lcmLora)."""

    teacher_model: ModelSource | None = Field(
        default=None,
        description=(
            "The teacher whose many-step samples the student learns to match in a few "
            "steps: a model of the base model's family sharing its text encoders and VAE "
            "(one whose `model_index.json` names another family is refused)."
        ),
    )
    num_ddim_timesteps: int = Field(
        default=50, ge=1, le=1000, description="Timesteps of the DDIM solver's skipping schedule."
    )
    w_min: float | None = Field(
        default=None,
        ge=0,
        description="Lowest guidance scale sampled. Default: lcm 5.0, lcmLora 3.0.",
    )
    w_max: float = Field(default=15.0, ge=0, description="Highest guidance scale sampled.")
    loss_type: LcmLoss = Field(default=LcmLoss.L2, description="`l2` or `huber`.")
    huber_c: float = Field(default=0.001, gt=0, description="Huber loss parameter c.")
    ema_decay: float = Field(
        default=0.95, gt=0, lt=1, description="Decay of the target network's EMA (lcm only)."
    )
    guidance_embedding_dim: int = Field(
        default=256,
        ge=4,
        le=4096,
        multiple_of=2,
        description="Size of the student's guidance-scale embedding (lcm only).",
    )
    timestep_scaling_factor: float = Field(
        default=10.0, gt=0, description="Scaling of the boundary-condition timestep."
    )
