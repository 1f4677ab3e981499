"""The training part of a FineTuneJob: what the trainer reads, exactly as written.

The operator embeds `TrainingSpec` in the FineTuneJob spec and hands it to the
trainer unchanged through a ConfigMap; `finetune run` reads it from the job file.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import Field, model_validator

from .common import ApiModel, Prompt, SecretKeyRef, SecretRef, Uri
from .distillation import (
    LCM_LORA_TEACHER_GUIDANCE,
    DistillationComparison,
    comparison_problems,
    default_steps,
)
from .methods import (
    CONCEPT_METHODS,
    DEFAULT_CHECKPOINT_INTERVAL,
    LCM_METHODS,
    LORA_METHODS,
    METHOD_DEFAULTS,
    TEXT_ENCODER_METHODS,
    Method,
)
from .metrics import CLIP_METRICS, SUBJECT_METRICS, TEACHER_METRICS, Metric
from .rules import Problem, raise_problems
from .selection import EarlyStopping, KeepBest, OutputFrom

MAX_CONCEPTS = 16
MAX_PROMPTS = 32
MAX_TOKENS = 16
MAX_MODULES = 32


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


class ClassImages(ApiModel):
    """Regularisation images for prior preservation."""

    uri: Uri | None = Field(
        default=None,
        description=(
            "Folder or `s3://` prefix of class images. Missing images (fewer than `count`) "
            "are generated with the base model from the class prompt and stored here for "
            "reuse; without a URI they are stored under the output."
        ),
    )
    count: int = Field(default=100, ge=1, le=10000, description="How many class images to use.")


class Concept(ApiModel):
    """One subject or style to teach the model."""

    instance_images: Uri = Field(
        description="Folder or `s3://` prefix of the concept's images (PNG, JPEG or WebP)."
    )
    instance_prompt: Prompt = Field(
        description="Prompt naming the concept, e.g. `a photo of sks dog`."
    )
    caption_files: bool = Field(
        default=True,
        description=(
            "Use `NAME.txt` beside `NAME.png`/`NAME.jpg` as that image's prompt; images "
            "without one use `instancePrompt`."
        ),
    )
    class_prompt: Prompt | None = Field(
        default=None,
        description="Prompt for the concept's class, e.g. `a photo of dog`. Needed for prior preservation.",
    )
    class_images: ClassImages = Field(
        default_factory=ClassImages,
        description="Class images for prior preservation (only read when it is on).",
    )
    hold_out: int = Field(
        default=0,
        ge=0,
        le=10000,
        description=(
            "Instance images kept out of training (the last N by file name), the real "
            "images `validation.metrics` compare samples with; 0: compare with all of them. "
            "Must leave at least one image to train on."
        ),
    )


class DatasetFormat(StrEnum):
    AUTO = "auto"
    FOLDER = "folder"
    WEBDATASET = "webdataset"


class CaptionDataset(ApiModel):
    """An image-caption dataset, for LCM distillation."""

    uri: Uri = Field(
        description=(
            "Folder of images with `NAME.txt` captions, a folder or `s3://` prefix of "
            "webdataset `.tar` shards, or an `s3://` prefix of images with captions."
        ),
    )
    format: DatasetFormat = Field(
        default=DatasetFormat.AUTO,
        description="`folder`, `webdataset`, or `auto` (shards when the URI holds `.tar` files).",
    )


class AlphaMode(StrEnum):
    WHITE = "white"
    BLACK = "black"
    REFUSE = "refuse"


class DataSpec(ApiModel):
    """What the model learns from, and how images are prepared."""

    concepts: list[Concept] = Field(
        default_factory=list,
        max_length=MAX_CONCEPTS,
        description=(
            "Concepts for dreambooth, lora and customDiffusion (customDiffusion takes several "
            "at once; the others train each concept's images together)."
        ),
    )
    dataset: CaptionDataset | None = Field(
        default=None, description="Image-caption dataset for lcm and lcmLora."
    )
    resolution: int = Field(
        default=512,
        ge=64,
        le=4096,
        multiple_of=8,
        description=(
            "Training resolution in pixels; images are resized so the short side matches "
            "(with `buckets`, to cover a bucket of about this size squared)."
        ),
    )
    center_crop: bool = Field(
        default=False,
        description="Crop the centre square (or bucket); otherwise a random crop.",
    )
    random_flip: bool = Field(default=False, description="Flip images horizontally at random.")
    buckets: bool | None = Field(
        default=None,
        description=(
            "Aspect-ratio buckets for concept images: each image keeps its aspect ratio, "
            "resized to cover the bucket (width x height, multiples of 64 px, about "
            "`resolution`² pixels, 1:4 to 4:1) of nearest aspect ratio and cropped to it "
            "(as `centerCrop` says); each micro-batch comes from one bucket, and SDXL is told "
            "each image's real size and crop. The log lists the buckets and how many images "
            "each holds. With prior preservation a batch's class images are cropped to its "
            "bucket. Unset: the model family's default (on for sdxl, off for sd); true or "
            "false forces it. Not for lcm/lcmLora datasets or customDiffusion's "
            "`augmentation` (square images; unset turns buckets off there)."
        ),
    )
    alpha: AlphaMode = Field(
        default=AlphaMode.WHITE,
        description=(
            "Images with transparent pixels (RGBA, LA, transparent palettes): composited on "
            "`white` or `black`, or `refuse`d with an error naming the file."
        ),
    )
    min_image_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description=(
            "Refuse images whose short side is below this many pixels. Unset: images below "
            "half of `resolution` are used with a warning."
        ),
    )


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

    enabled: bool = Field(default=False, description="Keep an EMA copy and save it as the result.")
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
        description="`no`, `fp16` or `bf16` (use `bf16` on Ampere or newer GPUs).",
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
        description="`adamw`, or `adamw8bit` (needs bitsandbytes in the trainer image).",
    )
    adam_beta1: float = Field(default=0.9, ge=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(default=0.999, ge=0, lt=1, description="Adam beta2.")
    adam_weight_decay: float = Field(default=1e-2, ge=0, description="Decoupled weight decay.")
    adam_epsilon: float = Field(default=1e-8, gt=0, description="Adam epsilon.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")


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


DEFAULT_CLIP_MODEL = "hf://openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "hf://facebook/dino-vits16"


class EvaluatorSpec(ApiModel):
    """The models that score validation samples, resolved like `baseModel.uri`."""

    clip_model: Uri = Field(
        default=DEFAULT_CLIP_MODEL,
        description=(
            "CLIP model (transformers `CLIPModel` with its tokenizer and image processor) "
            "for `clipText` and `clipImage`: `hf://`, `s3://` or a local folder."
        ),
    )
    dino_model: Uri = Field(
        default=DEFAULT_DINO_MODEL,
        description=(
            "DINO ViT (transformers `ViTModel` with its image processor) for `dino`: "
            "`hf://`, `s3://` or a local folder."
        ),
    )


class ValidationSpec(ApiModel):
    """Sample images generated during training."""

    prompts: list[Prompt] = Field(
        default_factory=list,
        max_length=MAX_PROMPTS,
        description="Prompts to sample; no samples when empty.",
    )
    every_n_steps: int = Field(
        default=100, ge=1, description="Sample every N steps and at the end."
    )
    images_per_prompt: int = Field(default=4, ge=1, le=64, description="Images per prompt.")
    inference_steps: int | None = Field(
        default=None, ge=1, le=1000, description="Denoising steps. Default: 25; lcm and lcmLora 4."
    )
    guidance_scale: float | None = Field(
        default=None,
        ge=0,
        description="Classifier-free guidance. Default: 7.5; customDiffusion 6; lcm 8; lcmLora 1.",
    )
    metrics: list[Metric] = Field(
        default_factory=list,
        max_length=len(Metric),
        description=(
            "Fidelity scores of the samples at every validation: `clipText` (image-prompt "
            "CLIP similarity), `clipImage` and `dino` (similarity to the concepts' held-out, "
            "else all, instance images; dreambooth, lora and customDiffusion). For lcm and "
            "lcmLora, `clipImage` compares each sample with the teacher's image of the same "
            "prompt and seed, and `distillation` adds the scores at 1-8 steps. Off when empty."
        ),
    )
    distillation: DistillationComparison | None = Field(
        default=None,
        description=(
            "lcm and lcmLora with `metrics`: the student against its teacher at several step "
            "counts. Default: on, with the settings below."
        ),
    )
    evaluator: EvaluatorSpec = Field(
        default_factory=EvaluatorSpec,
        description="Models that compute `metrics` (loaded on rank 0 only, freed after use).",
    )


class CheckpointingSpec(ApiModel):
    """Full training state saved for resume."""

    every_n_steps: int | None = Field(
        default=None,
        ge=1,
        description=f"Save every N steps. Default: {DEFAULT_CHECKPOINT_INTERVAL}, or `training.maxSteps` when smaller.",
    )
    keep_last: int = Field(
        default=3, ge=1, le=1000, description="Checkpoints kept; older ones are deleted."
    )
    keep_best: KeepBest | None = Field(
        default=None,
        description=(
            "Also keep the checkpoint of the best validation by a metric. A checkpoint is "
            "then saved at every validation step too (besides every `everyNSteps`)."
        ),
    )


class OutputFormat(StrEnum):
    DIFFUSERS = "diffusers"
    KOHYA = "kohya"


class OutputSpec(ApiModel):
    """Where results go, and how to reach S3."""

    uri: Uri = Field(
        description="`s3://bucket/prefix` or a local folder for weights, samples, checkpoints and the model card."
    )
    formats: list[OutputFormat] = Field(
        default_factory=lambda: [OutputFormat.DIFFUSERS],
        min_length=1,
        max_length=2,
        description="`diffusers`, plus `kohya` for a LoRA file that A1111 and ComfyUI load.",
    )
    credentials_secret_ref: SecretRef | None = Field(
        default=None,
        description=(
            "Secret with S3 credentials, used for every `s3://` URI of the job; without it the "
            "standard AWS chain applies (environment, web identity)."
        ),
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        max_length=2048,
        description="Endpoint of an S3-compatible store (MinIO, Ceph, R2); AWS when unset.",
    )
    s3_region: str | None = Field(
        default=None, max_length=64, description="S3 region; the AWS default chain when unset."
    )
    from_: OutputFrom = Field(
        default=OutputFrom.LAST,
        alias="from",
        description=(
            "Which weights are the result: the `last` step's, or the `best` validation's "
            "by `checkpointing.keepBest` (its checkpoint's weights, or the last step's when "
            "its final validation is the best)."
        ),
    )


# DeepSpeed settings the trainer derives from the job; a raw override of them
# would put the loop and the engine out of step.
_OWNED_DEEPSPEED_KEYS = {
    "zero_optimization.stage": "deepspeed.zeroStage",
    "bf16": "training.mixedPrecision",
    "fp16": "training.mixedPrecision",
    "torch_autocast": "training.mixedPrecision",
    "train_batch_size": "training.batchSize",
    "train_micro_batch_size_per_gpu": "training.batchSize",
    "gradient_accumulation_steps": "training.gradientAccumulationSteps",
    "gradient_clipping": "training.maxGradNorm",
}


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO settings."""

    zero_stage: int | None = Field(
        default=None,
        ge=0,
        le=3,
        description=(
            "ZeRO stage 0-2. Unset: chosen per run and logged with its reason: 0 (fastest) "
            "when the trained weights, their gradients and Adam state plus the frozen weights "
            "take at most half of a GPU's memory, else 2; 2 with `offloadOptimizer`; a "
            "resumed run keeps its checkpoint's stage."
        ),
    )
    offload_optimizer: bool = Field(
        default=False, description="Keep optimizer state in CPU memory (ZeRO 1-3)."
    )
    offload_parameters: bool = Field(
        default=False, description="Keep parameters in CPU memory (ZeRO 3 only)."
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="Raw DeepSpeed config merged over the generated one, for settings not exposed here.",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> Self:
        problems = []
        if self.offload_parameters and self.zero_stage != 3:
            problems.append(Problem("offloadParameters", "needs zeroStage 3"))
        if self.offload_optimizer and self.zero_stage == 0:  # unset: the trainer picks 2
            problems.append(Problem("offloadOptimizer", "needs zeroStage 1, 2 or 3"))
        raw = self.config or {}
        for key, instead in _OWNED_DEEPSPEED_KEYS.items():
            section, _, name = key.partition(".")
            present = name in (raw.get(section) or {}) if name else section in raw
            if present:
                problems.append(Problem(f"config.{key}", f"is set by the trainer; use {instead}"))
        raise_problems(problems)
        return self


class TrainingSpec(ApiModel):
    """Everything the trainer needs to know about one training run."""

    method: Method = Field(
        description="`dreambooth`, `lora`, `customDiffusion`, `lcm` or `lcmLora`."
    )
    base_model: BaseModelSource = Field(
        description="The model to fine-tune (the student's start for lcm)."
    )
    data: DataSpec = Field(description="Training data.")
    training: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Hyperparameters."
    )
    lora: LoraSpec | None = Field(default=None, description="LoRA settings (lora, lcmLora).")
    custom_diffusion: CustomDiffusionSpec | None = Field(
        default=None, description="Custom Diffusion settings (customDiffusion)."
    )
    lcm: LcmSpec | None = Field(default=None, description="Distillation settings (lcm, lcmLora).")
    validation: ValidationSpec = Field(
        default_factory=ValidationSpec, description="Validation samples."
    )
    checkpointing: CheckpointingSpec = Field(
        default_factory=CheckpointingSpec, description="Checkpoints for resume."
    )
    output: OutputSpec = Field(description="Where results go.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed ZeRO.")

    @model_validator(mode="after")
    def _check_and_resolve(self) -> Self:
        raise_problems(training_problems(self))
        resolve_method_defaults(self)
        return self


def training_problems(spec: TrainingSpec) -> list[Problem]:
    """Rules that relate several fields; each problem names the field to fix."""
    method = Method(spec.method)
    problems: list[Problem] = []

    def need(condition: bool, path: str, message: str) -> None:
        if not condition:
            problems.append(Problem(path, message))

    for section, allowed in (
        ("lora", LORA_METHODS),
        ("customDiffusion", {Method.CUSTOM_DIFFUSION}),
        ("lcm", LCM_METHODS),
    ):
        value = getattr(spec, {"customDiffusion": "custom_diffusion"}.get(section, section))
        if value is not None and method not in allowed:
            names = " or ".join(sorted(allowed))
            problems.append(Problem(section, f"is only used when method is {names}, not {method}"))

    if method in CONCEPT_METHODS:
        need(
            bool(spec.data.concepts),
            "data.concepts",
            f"at least one concept is needed for {method}",
        )
        need(
            spec.data.dataset is None,
            "data.dataset",
            f"is only used by lcm and lcmLora, not {method}",
        )
    else:
        need(
            spec.data.dataset is not None,
            "data.dataset",
            f"an image-caption dataset is needed for {method}",
        )
        need(not spec.data.concepts, "data.concepts", f"are not used by {method}; use data.dataset")
        teacher = spec.lcm.teacher_model if spec.lcm else None
        need(teacher is not None, "lcm.teacherModel", f"a teacher model is needed for {method}")

    if spec.data.buckets:
        need(
            spec.data.dataset is None,
            "data.buckets",
            f"buckets apply to concept images, not to {method}'s streamed data.dataset; "
            "leave data.buckets unset or false",
        )
        cd = spec.custom_diffusion
        need(
            not (method == Method.CUSTOM_DIFFUSION and cd is not None and cd.augmentation),
            "data.buckets",
            "customDiffusion.augmentation makes square images; set one of them to false",
        )

    if method == Method.CUSTOM_DIFFUSION:
        cd = spec.custom_diffusion
        tokens = cd.modifier_tokens if cd else []
        need(
            bool(tokens),
            "customDiffusion.modifierTokens",
            "at least one token is needed for customDiffusion",
        )
        if cd and tokens:
            need(
                len(set(tokens)) == len(tokens),
                "customDiffusion.modifierTokens",
                "tokens must be distinct",
            )
            need(
                len(cd.initializer_tokens) >= len(tokens),
                "customDiffusion.initializerTokens",
                f"needs one token per modifier token ({len(tokens)}), got {len(cd.initializer_tokens)}",
            )
            for i, concept in enumerate(spec.data.concepts):
                need(
                    any(t in concept.instance_prompt for t in tokens),
                    f"data.concepts[{i}].instancePrompt",
                    "must contain one of customDiffusion.modifierTokens",
                )

    problems += _metric_problems(spec)
    problems += _selection_problems(spec)

    hp = spec.training
    if hp.train_text_encoder:
        need(
            method in TEXT_ENCODER_METHODS,
            "training.trainTextEncoder",
            f"is not supported by {method}"
            + (
                " (it trains the modifier-token embeddings already)"
                if method == Method.CUSTOM_DIFFUSION
                else ""
            ),
        )
    if hp.prior_preservation:
        need(
            method in CONCEPT_METHODS, "training.priorPreservation", f"is not supported by {method}"
        )
        for i, concept in enumerate(spec.data.concepts):
            need(
                concept.class_prompt is not None,
                f"data.concepts[{i}].classPrompt",
                "is needed when training.priorPreservation is on",
            )
    if hp.ema.enabled:
        need(
            method in {Method.DREAMBOOTH, Method.LCM},
            "training.ema.enabled",
            f"EMA applies to full fine-tunes (dreambooth, lcm), not {method}",
        )
    if hp.lr_warmup_steps > hp.max_steps:
        problems.append(
            Problem("training.lrWarmupSteps", f"is larger than training.maxSteps ({hp.max_steps})")
        )

    interval = spec.checkpointing.every_n_steps
    if interval is not None and interval > hp.max_steps:
        problems.append(
            Problem(
                "checkpointing.everyNSteps",
                f"{interval} is larger than training.maxSteps ({hp.max_steps})",
            )
        )

    if OutputFormat.KOHYA in spec.output.formats:
        need(
            method in LORA_METHODS,
            "output.formats",
            f"kohya is a LoRA format; {method} does not train LoRA",
        )
    need(
        len(set(spec.output.formats)) == len(spec.output.formats),
        "output.formats",
        "formats must be distinct",
    )

    if spec.lcm is not None:
        defaults = METHOD_DEFAULTS[method]
        w_min = spec.lcm.w_min if spec.lcm.w_min is not None else defaults.lcm_w_min
        if w_min is not None and w_min > spec.lcm.w_max:
            problems.append(
                Problem("lcm.wMin", f"{w_min} is larger than lcm.wMax ({spec.lcm.w_max})")
            )
    return problems


def model_uris(spec: TrainingSpec) -> list[str]:
    """Every model the job loads: base model, its VAE, the LCM teacher and the evaluators."""
    base = spec.base_model
    teacher = spec.lcm.teacher_model if spec.lcm else None
    named = [base.uri, base.vae_uri, teacher.uri if teacher else None]
    return [uri for uri in named if uri] + list(evaluator_uris(spec).values())


def evaluator_uris(spec: TrainingSpec) -> dict[str, str]:
    """The evaluator models the job's metrics need, by field (`validation.evaluator.clipModel`)."""
    metrics = {Metric(m) for m in spec.validation.metrics}
    evaluator = spec.validation.evaluator
    uris = {}
    if metrics & CLIP_METRICS:
        uris["validation.evaluator.clipModel"] = evaluator.clip_model
    if Metric.DINO in metrics:
        uris["validation.evaluator.dinoModel"] = evaluator.dino_model
    return uris


def _metric_problems(spec: TrainingSpec) -> list[Problem]:
    """Validation metrics score samples of the validation prompts; the subject metrics
    compare them with instance images, which only the concept methods have."""
    validation, method = spec.validation, Method(spec.method)
    metrics = [Metric(m) for m in validation.metrics]
    problems = []
    if len(set(metrics)) != len(metrics):
        problems.append(Problem("validation.metrics", "metrics must be distinct"))
    if metrics and not validation.prompts:
        problems.append(
            Problem(
                "validation.metrics", "needs validation.prompts: the metrics score their samples"
            )
        )
    subject = [m.value for m in metrics if m in SUBJECT_METRICS]
    names = " and ".join(subject)
    # LCM students are compared with their teacher's images instead (clipImage only).
    unmatched = (
        [m for m in subject if m not in TEACHER_METRICS] if method in LCM_METHODS else subject
    )
    if unmatched and method not in CONCEPT_METHODS:
        applies = (
            "clipText and clipImage (to the teacher's images) apply"
            if method in LCM_METHODS
            else "only clipText applies"
        )
        problems.append(
            Problem(
                "validation.metrics",
                f"{' and '.join(unmatched)} compare{'s' if len(unmatched) == 1 else ''} samples with the instance images of "
                f"data.concepts, which {method} does not have; {applies}",
            )
        )
    problems += comparison_problems(
        validation.distillation, method, metrics, spec.lcm.num_ddim_timesteps if spec.lcm else None
    )
    cd = spec.custom_diffusion if method == Method.CUSTOM_DIFFUSION else None
    tokens = cd.modifier_tokens if cd else []
    mentioned = any(t in prompt for prompt in validation.prompts for t in tokens)
    if subject and tokens and validation.prompts and not mentioned:
        problems.append(
            Problem(
                "validation.prompts",
                f"no prompt contains one of customDiffusion.modifierTokens, so "
                f"{names} {'has' if len(subject) == 1 else 'have'} no concept to compare "
                "samples with",
            )
        )
    return problems


def _selection_problems(spec: TrainingSpec) -> list[Problem]:
    """keepBest, earlyStopping and `output.from: best` choose by a metric the job scores."""
    metrics = [Metric(m) for m in spec.validation.metrics]
    listed = ", ".join(metrics) if metrics else "none"
    problems = []
    for path, rule in (
        ("checkpointing.keepBest.metric", spec.checkpointing.keep_best),
        ("training.earlyStopping.metric", spec.training.early_stopping),
    ):
        if rule is not None and Metric(rule.metric) not in metrics:
            problems.append(
                Problem(path, f"{rule.metric} is not among validation.metrics ({listed})")
            )
    if spec.output.from_ == OutputFrom.BEST:
        if spec.checkpointing.keep_best is None:
            problems.append(
                Problem(
                    "output.from", "best needs checkpointing.keepBest (the metric to choose by)"
                )
            )
        if spec.training.ema.enabled:
            problems.append(
                Problem(
                    "output.from",
                    "best is not available with training.ema: validations score the trained "
                    "weights, the result would be their EMA",
                )
            )
    return problems


def resolve_method_defaults(spec: TrainingSpec) -> None:
    """Fill the fields whose default depends on the method (see `methods.METHOD_DEFAULTS`)."""
    defaults = METHOD_DEFAULTS[Method(spec.method)]
    hp = spec.training
    if hp.learning_rate is None:
        hp.learning_rate = defaults.learning_rate
    if hp.text_encoder_learning_rate is None and hp.train_text_encoder:
        hp.text_encoder_learning_rate = hp.learning_rate
    if spec.method in LORA_METHODS:
        if spec.lora is None:
            spec.lora = LoraSpec()
        rank = spec.lora.rank if spec.lora.rank is not None else defaults.lora_rank
        assert rank is not None, f"{spec.method} has a default LoRA rank"
        spec.lora.rank = rank
        if spec.lora.alpha is None:
            spec.lora.alpha = float(rank)
        if spec.lora.target_modules is None:
            spec.lora.target_modules = list(defaults.lora_target_modules)
    if spec.lcm is not None and spec.lcm.w_min is None:
        spec.lcm.w_min = defaults.lcm_w_min
    if spec.validation.inference_steps is None:
        spec.validation.inference_steps = defaults.validation_inference_steps
    if spec.validation.guidance_scale is None:
        spec.validation.guidance_scale = defaults.validation_guidance_scale
    if spec.method in LCM_METHODS and spec.validation.metrics:
        resolve_distillation(spec)
    if spec.checkpointing.every_n_steps is None:
        spec.checkpointing.every_n_steps = min(DEFAULT_CHECKPOINT_INTERVAL, hp.max_steps)


def resolve_distillation(spec: TrainingSpec) -> None:
    """The teacher comparison of an LCM job with metrics, on unless its settings say how."""
    validation = spec.validation
    if validation.distillation is None:
        validation.distillation = DistillationComparison()
    if validation.distillation.steps is None:
        assert spec.lcm is not None, "an LCM job has lcm settings (its teacher)"
        validation.distillation.steps = default_steps(spec.lcm.num_ddim_timesteps)
    if validation.distillation.teacher_guidance_scale is None:
        validation.distillation.teacher_guidance_scale = (
            validation.guidance_scale if spec.method == Method.LCM else LCM_LORA_TEACHER_GUIDANCE
        )
