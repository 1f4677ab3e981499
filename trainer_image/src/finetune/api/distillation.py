"""What LCM distillation bought: the student scored against its teacher at a few step counts
(`validation.distillation`, for `lcm` and `lcmLora` with `validation.metrics`)."""

from __future__ import annotations

import itertools
from typing import Annotated

from pydantic import Field

from .common import ApiModel
from .methods import LCM_METHODS, Method
from .metrics import CLIP_METRICS, Metric
from .rules import Problem

DEFAULT_STEPS = (1, 2, 4, 8)
MAX_STEP_COUNTS = 8
# lcmLora's student takes no guidance scale (it samples at 1): its teacher samples at the
# guidance users give SD, inside the range the distillation drew from (lcm.wMin..wMax + 1).
LCM_LORA_TEACHER_GUIDANCE = 7.5


class DistillationComparison(ApiModel):
    """The student's samples at each of `steps` against the teacher's many-step samples of the
    same prompts and seeds: `clipText` to the prompt, `clipImage` to the teacher's image."""

    steps: list[Annotated[int, Field(ge=1, le=1000)]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_STEP_COUNTS,
        description=(
            "Step counts the student samples the validation prompts at (LCMScheduler), "
            "ascending, at most `lcm.numDdimTimesteps`. The samples at "
            "`validation.inferenceSteps` are the validation's own. Default: 1, 2, 4 and 8 "
            "(those up to `lcm.numDdimTimesteps`)."
        ),
    )
    teacher_inference_steps: int = Field(
        default=25,
        ge=1,
        le=1000,
        description=(
            "Denoising steps of the teacher's reference images (DPM-Solver), made once per "
            "run under the output's `samples/teacher/` and reused on resume."
        ),
    )
    teacher_guidance_scale: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Classifier-free guidance of the teacher's reference images. Default: lcm "
            f"`validation.guidanceScale` (the scale its student embeds); lcmLora "
            f"{LCM_LORA_TEACHER_GUIDANCE}."
        ),
    )


def comparison_problems(
    comparison: DistillationComparison | None,
    method: Method,
    metrics: list[Metric],
    num_ddim_timesteps: int | None,
) -> list[Problem]:
    """`validation.distillation` compares an LCM student with its teacher by the job's CLIP
    metrics, at step counts its scheduler can take."""
    if comparison is None:
        return []
    field = "validation.distillation"
    if method not in LCM_METHODS:
        return [Problem(field, f"is only used when method is lcm or lcmLora, not {method}")]
    problems = []
    if not set(metrics) & CLIP_METRICS:
        problems.append(
            Problem(field, "scores with validation.metrics: add clipText or clipImage to them")
        )
    steps = comparison.steps or []
    if any(later <= earlier for earlier, later in itertools.pairwise(steps)):
        problems.append(Problem(f"{field}.steps", f"must be ascending and distinct, got {steps}"))
    if num_ddim_timesteps is not None and steps and max(steps) > num_ddim_timesteps:
        problems.append(
            Problem(
                f"{field}.steps",
                f"{max(steps)} is more than lcm.numDdimTimesteps ({num_ddim_timesteps}), "
                "the most steps the student's LCMScheduler can take",
            )
        )
    return problems


def default_steps(num_ddim_timesteps: int) -> list[int]:
    return [n for n in DEFAULT_STEPS if n <= num_ddim_timesteps]
