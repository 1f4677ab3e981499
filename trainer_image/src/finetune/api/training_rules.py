"""The rules of a training spec that relate several fields (a method's needs, metrics,
choosing by a metric), each problem named by the field to fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .distillation import comparison_problems
from .methods import (
    CONCEPT_METHODS,
    LCM_METHODS,
    LORA_METHODS,
    METHOD_DEFAULTS,
    TEXT_ENCODER_METHODS,
    Method,
)
from .metrics import SUBJECT_METRICS, TEACHER_METRICS, Metric
from .outputs import OutputFormat
from .rules import Problem
from .selection import OutputFrom

if TYPE_CHECKING:  # the spec runs these rules from its validator, so it imports this module
    from .training import TrainingSpec


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
    if spec.output.from_ == OutputFrom.BEST and spec.checkpointing.keep_best is None:
        problems.append(
            Problem("output.from", "best needs checkpointing.keepBest (the metric to choose by)")
        )
    return problems
