"""The training methods and the defaults that depend on which one a job uses.

A few hyperparameters have no single sensible default: DreamBooth wants a
learning rate of 5e-6, LoRA 1e-4. Those fields default to null in the API and
are filled from this table when a job is validated, so the trainer, the
ConfigMap and `finetune validate` all see the same resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Method(StrEnum):
    DREAMBOOTH = "dreambooth"
    LORA = "lora"
    CUSTOM_DIFFUSION = "customDiffusion"
    LCM = "lcm"
    LCM_LORA = "lcmLora"


LORA_METHODS = frozenset({Method.LORA, Method.LCM_LORA})
LCM_METHODS = frozenset({Method.LCM, Method.LCM_LORA})
# Methods that learn from instance images with prompts (the DreamBooth family);
# the LCM methods learn from an image-caption dataset instead.
CONCEPT_METHODS = frozenset({Method.DREAMBOOTH, Method.LORA, Method.CUSTOM_DIFFUSION})
# Methods where the text encoder may be trained (fully, or through LoRA).
TEXT_ENCODER_METHODS = frozenset({Method.DREAMBOOTH, Method.LORA})


ATTENTION_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
# LCM-LoRA adapts more than attention: the recipe of the LCM-LoRA paper.
LCM_LORA_MODULES = (
    *ATTENTION_MODULES,
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


@dataclass(frozen=True)
class MethodDefaults:
    learning_rate: float
    validation_inference_steps: int
    validation_guidance_scale: float
    lora_rank: int | None = None
    lora_target_modules: tuple[str, ...] = ()
    lcm_w_min: float | None = None


# Values from the diffusers reference recipes for each method.
METHOD_DEFAULTS: dict[Method, MethodDefaults] = {
    Method.DREAMBOOTH: MethodDefaults(5e-6, 25, 7.5),
    Method.LORA: MethodDefaults(1e-4, 25, 7.5, lora_rank=4, lora_target_modules=ATTENTION_MODULES),
    Method.CUSTOM_DIFFUSION: MethodDefaults(1e-5, 25, 6.0),
    Method.LCM: MethodDefaults(1e-6, 4, 8.0, lcm_w_min=5.0),
    Method.LCM_LORA: MethodDefaults(
        1e-4, 4, 1.0, lora_rank=64, lora_target_modules=LCM_LORA_MODULES, lcm_w_min=3.0
    ),
}

DEFAULT_CHECKPOINT_INTERVAL = 500
