"""Validation samples generated during training (`validation`): prompts, sampling settings,
the metrics that score them and the evaluator models behind those metrics."""

from __future__ import annotations

from pydantic import Field

from .common import ApiModel, Prompt, Uri
from .distillation import DistillationComparison
from .metrics import Metric

MAX_PROMPTS = 32
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
