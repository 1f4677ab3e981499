"""The optimisation recipe every method shares (`training`): steps, learning rate and its
schedule, batch, precision, loss weighting, EMA, early stopping and the optimizer."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from .common import ApiModel
from .selection import EarlyStopping


class LrScheduler(StrEnum):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"


class MixedPrecision(StrEnum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"


class EmaSpec(ApiModel):
    """Exponential moving average of the trained weights (full fine-tunes only)."""

    enabled: bool = Field(
        default=False,
        description="Keep an EMA copy of the UNet: validations sample it, and it is the result.",
    )
    decay: float = Field(default=0.9999, gt=0, lt=1, description="EMA decay per optimizer step.")


class Hyperparameters(ApiModel):
    """The optimisation recipe shared by every method."""

    max_steps: int = Field(
        default=500, ge=1, le=10_000_000, description="Optimizer steps to train."
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "Peak learning rate. Default by method: dreambooth 5e-6, lora 1e-4, "
            "customDiffusion 1e-5, lcm 1e-6, lcmLora 1e-4."
        ),
    )
    text_encoder_learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Learning rate of the text encoder when it trains; default `learningRate`.",
    )
    lr_scheduler: LrScheduler = Field(
        default=LrScheduler.CONSTANT, description="Learning-rate schedule after warmup."
    )
    lr_warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps.")
    lr_num_cycles: int = Field(
        default=1, ge=1, description="Hard restarts for `cosine_with_restarts`."
    )
    lr_power: float = Field(default=1.0, gt=0, description="Power of the `polynomial` schedule.")
    batch_size: int = Field(default=1, ge=1, le=4096, description="Images per GPU per micro-step.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-steps per optimizer step."
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="Seed for weights, noise and data order, so a job reruns identically.",
    )
    mixed_precision: MixedPrecision = Field(
        default=MixedPrecision.NO,
        description=(
            '`"no"` (quoted: YAML reads a bare no as false), `fp16` or `bf16` (use `bf16` '
            "on Ampere or newer GPUs)."
        ),
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward to save memory."
    )
    compile: bool = Field(
        default=False,
        description=(
            "Compile the UNet with `torch.compile`: faster steps after a first step that "
            "compiles (its time is logged apart). Samples compile once more."
        ),
    )
    channels_last: bool = Field(
        default=False, description="Store the UNet's convolution weights channels-last (GPU)."
    )
    allow_tf32: bool = Field(
        default=True,
        description=(
            "TF32 for the matmuls and convolutions that run in fp32 on Ampere or newer GPUs; "
            "off for bit-exact fp32."
        ),
    )
    train_text_encoder: bool = Field(
        default=False,
        description=(
            "Also train the text encoder: fully for dreambooth, through LoRA adapters "
            "(`lora.textEncoderTargetModules`) for lora."
        ),
    )
    prior_preservation: bool = Field(
        default=False,
        description="Train on class images beside the instance images (needs each concept's `classPrompt`).",
    )
    prior_loss_weight: float = Field(
        default=1.0, ge=0, description="Weight of the class-image loss in prior preservation."
    )
    snr_gamma: float | None = Field(
        default=None,
        gt=0,
        description="Min-SNR loss weighting gamma (5.0 is the recommended value); off when unset.",
    )
    noise_offset: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Offset noise scale; 0.05-0.1 helps very dark or bright images.",
    )
    ema: EmaSpec = Field(default_factory=EmaSpec, description="Weight EMA for full fine-tunes.")
    early_stopping: EarlyStopping | None = Field(
        default=None,
        description=(
            "Stop once a validation metric has not improved for `patience` validations: "
            "the results are written from that step, the job succeeds with reason "
            "`EarlyStopped`. Off when unset."
        ),
    )
    optimizer: Optimizer = Field(
        default=Optimizer.ADAMW,
        description=(
            "`adamw`, or `adamw8bit` (bitsandbytes: in the CUDA trainer image; elsewhere "
            "the project's `gpu` extra)."
        ),
    )
    adam_beta1: float = Field(default=0.9, ge=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(default=0.999, ge=0, lt=1, description="Adam beta2.")
    adam_weight_decay: float = Field(default=1e-2, ge=0, description="Decoupled weight decay.")
    adam_epsilon: float = Field(default=1e-8, gt=0, description="Adam epsilon.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
