"""The finished result: weights, a model card, and an atomic hand-over.

Outputs are written into a staging folder and moved into place only once all
are complete, the model card last, so a crash never leaves something that
looks like a finished model.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from finetune.api.metrics import Metric
from finetune.api.training import TrainingSpec
from finetune.trainer.data.class_homes import FOLDER as CLASS_IMAGES
from finetune.trainer.evaluation.identifiers import identifiers
from finetune.trainer.evaluation.scores import ALL, PRES, Scores
from finetune.trainer.evaluation.selection import Chosen, Stall
from finetune.trainer.families.base import python_string
from finetune.trainer.storage.store import Store
from finetune.trainer.storage.uploader import Task, Uploader

if TYPE_CHECKING:
    from finetune.trainer.families import ModelFamily

STAGING = ".staging"
# What the results' upload leaves out: local working state, and the class images, sent
# as they are generated (`class_homes`).
NOT_RESULTS = ("checkpoints", ".run", STAGING, CLASS_IMAGES)
MODEL_CARD = "README.md"


def staging_folder(work_dir: Path) -> Path:
    folder = work_dir / STAGING
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def promote(staging: Path, work_dir: Path) -> list[Path]:
    """Move every staged entry into `work_dir`, the model card last."""
    entries = sorted(staging.iterdir(), key=lambda p: p.name == MODEL_CARD)
    moved = []
    for entry in entries:
        target = work_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
        moved.append(target)
    staging.rmdir()
    return moved


def code(text: str) -> str:
    """`text` as a Markdown code span: fenced by a backtick run longer than any inside it
    (padded where it starts or ends with one), its line breaks shown as ⏎ (a span is one
    line)."""
    text = text.replace("\r\n", "\n").replace("\n", "⏎").replace("\r", "⏎")
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def cell(text: str) -> str:
    """`text` in a table cell: its pipes escaped, which a table splits on even inside a
    code span."""
    return text.replace("|", "\\|")


def model_card(
    spec: TrainingSpec,
    name: str,
    steps: int,
    final_loss: float | None,
    grid: Path | None,
    work_dir: Path,
    files: list[tuple[str, int, str]] | None = None,
    scores: list[Scores] | None = None,
    best: Chosen | None = None,
    stall: Stall | None = None,
    *,
    family: ModelFamily,
) -> str:
    """`files`: (path in the results, bytes, sha256) of what the card describes; `scores`:
    every validation's, by step; `best`: the validation whose weights these are
    (`output.from: best`); `stall`: where `training.earlyStopping` ended the run;
    `family`: the model's, whose pipeline class loads the result and whose hub tag the
    card carries."""
    method = spec.method
    hyper = spec.training.model_dump(by_alias=True, exclude_none=True, mode="json")
    for section in ("lora", "custom_diffusion", "lcm"):
        value = getattr(spec, section)
        if value is not None:
            hyper[section] = value.model_dump(by_alias=True, exclude_none=True, mode="json")
    prompts = [c.instance_prompt for c in spec.data.concepts]
    validation_prompt = spec.validation.prompts[0] if spec.validation.prompts else "a photo"
    lines = [
        "---",
        yaml.safe_dump(
            {
                "base_model": spec.base_model.uri,
                "library_name": "diffusers",
                "tags": [family.card_tag, method, "finetune-operator"],
            },
            sort_keys=False,
        ).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"Fine-tuned from {code(spec.base_model.uri)} with **{method}** for {steps} steps"
        + (f" (final loss {final_loss:.4f})." if final_loss is not None else "."),
        "",
        *early_stop(spec, steps, stall),
        *chosen_weights(spec, best, steps),
        "## How to use",
        "",
        "```python",
        *usage(spec, prompts[0] if prompts else validation_prompt, family),
        "```",
        "",
    ]
    if prompts:
        lines += ["## Training prompts", "", *[f"- {code(p)}" for p in prompts], ""]
    if spec.validation.prompts:
        lines += ["## Validation prompts", "", *[f"- {code(p)}" for p in spec.validation.prompts]]
        lines += [""]
    if grid is not None:
        lines += ["## Samples", "", f"![samples]({grid.relative_to(work_dir).as_posix()})", ""]
    if scores:
        lines += metrics_table(spec, scores)
    if files:
        lines += ["## Files", "", "| file | bytes | sha256 |", "| --- | ---: | --- |"]
        lines += [f"| {cell(code(path))} | {size} | `{sha256}` |" for path, size, sha256 in files]
        lines += [""]
    lines += [
        "## Hyperparameters",
        "",
        "```yaml",
        yaml.safe_dump(hyper, sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def early_stop(spec: TrainingSpec, steps: int, stall: Stall | None) -> list[str]:
    """The card's word on `training.earlyStopping`, when it ended the run."""
    rule = spec.training.early_stopping
    if stall is None or rule is None:
        return []
    value = stall.best.overall[rule.metric]
    return [
        f"Training stopped early after step {steps} of {spec.training.max_steps} "
        f"(`training.earlyStopping`): `{rule.metric}` had not improved by more than "
        f"{rule.min_delta:g} for {stall.since} validations (patience {rule.patience}); "
        f"its best, {rule.mode} {value:.4f}, was at step {stall.best.step}.",
        "",
    ]


def chosen_weights(spec: TrainingSpec, best: Chosen | None, steps: int) -> list[str]:
    """The card's word on `output.from: best`: whose weights these are (and their step's
    loss, when not the last step's), and the best validation's when its checkpoint was
    gone."""
    keep = spec.checkpointing.keep_best
    if best is None or keep is None:
        return []
    chosen = best.scores
    value = chosen.overall[keep.metric]
    # The card's first line gives the last step's loss; another step's is its own.
    loss = (
        f" Step {chosen.step}'s training loss was {best.loss:.4f}."
        if best.loss is not None and chosen.step != steps
        else ""
    )
    if best.gone is None:
        return [
            f"These are the weights of step {chosen.step}, the best validation by "
            f"`{keep.metric}` ({keep.mode} {value:.4f}; `output.from: best`).{loss}",
            "",
        ]
    gone = best.gone.overall[keep.metric]
    return [
        f"These are the weights of step {chosen.step}, the best validation by "
        f"`{keep.metric}` among those whose weights were left ({keep.mode} {value:.4f}; "
        f"`output.from: best`).{loss} The best, step {best.gone.step} ({gone:.4f}), has no "
        "checkpoint left: retention deleted it before `checkpointing.keepBest` named it "
        "(set or changed on a resume), or it could not be read.",
        "",
    ]


def metrics_sentence(spec: TrainingSpec, metrics: list[str], pres: bool) -> str:
    """What each metric scored in this run compares, for the method."""
    held = sum(c.hold_out for c in spec.data.concepts)
    against = f"{held} held-out instance images" if held else "the instance images (none held out)"
    if spec.validation.distillation is not None:
        against = "the teacher's image of the same prompt and seed"
    left_out = identifiers(spec)
    without = f" (without {', '.join(f'`{w}`' for w in left_out)})" if left_out else ""
    parts = {
        Metric.CLIP_TEXT.value: f"`clipText` (CLIP) with their prompts{without}",
        Metric.CLIP_IMAGE.value: f"`clipImage` (CLIP) with {against}",
        Metric.DINO.value: f"`dino` (DINO ViT) with {against}",
        PRES: "`pres` (DINO) of class-prompt samples with the class images",
    }
    named = [parts[m] for m in metrics if m in parts and (m != PRES or pres)]
    if not named:
        return ""
    listed = ", ".join(named[:-1]) + (" and " if len(named) > 1 else "") + named[-1]
    return f"Cosine similarities of each validation's samples: {listed}."


def metrics_table(spec: TrainingSpec, scores: list[Scores]) -> list[str]:
    """A row per validation step (and, for customDiffusion, per concept): the metrics
    scored."""
    scored = {m for entry in scores for m in entry.overall}
    metrics = [str(m) for m in spec.validation.metrics if str(m) in scored]
    pres = PRES in scored
    metrics += [PRES] if pres else []
    lines = [
        "## Validation metrics",
        "",
        metrics_sentence(spec, metrics, pres),
        "",
        "| step | concept | " + " | ".join(metrics) + " |",
        "| ---: | --- |" + " ---: |" * len(metrics),
    ]
    for entry in scores:
        rows = [(ALL, entry.overall), *entry.concepts.items()]
        for concept, values in rows:
            label = concept if concept == ALL else cell(code(concept))
            cells = [f"{values[m]:.4f}" if m in values else "-" for m in metrics]
            lines.append(f"| {entry.step} | {label} | " + " | ".join(cells) + " |")
    return [*lines, "", *distillation_table(spec, scores)]


def distillation_table(spec: TrainingSpec, scores: list[Scores]) -> list[str]:
    """lcm, lcmLora: a row per validation and student step count, against the teacher."""
    comparison = spec.validation.distillation
    if comparison is None or not any(entry.distillation for entry in scores):
        return []
    metrics = [str(m) for m in spec.validation.metrics]
    lines = [
        "## Student and teacher",
        "",
        f"The student's samples at each step count (LCMScheduler, the validation's seeds) "
        f"against the teacher's in {comparison.teacher_inference_steps} steps (DPM-Solver, "
        f"guidance {comparison.teacher_guidance_scale:g}; `samples/teacher/`): `clipText` "
        "with the prompts, `clipImage` with the teacher's image of the same prompt and seed. "
        "Each validation's `distillation-grid.png` shows a row per sample, the teacher's "
        "first.",
        "",
        "| step | student steps | " + " | ".join(metrics) + " |",
        "| ---: | ---: |" + " ---: |" * len(metrics),
    ]
    for entry in scores:
        for steps, values in entry.distillation.items():
            cells = [f"{values[m]:.4f}" if m in values else "-" for m in metrics]
            lines.append(f"| {entry.step} | {steps} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def usage(spec: TrainingSpec, prompt: str, family: ModelFamily) -> list[str]:
    """Python that loads this method's result with diffusers' public API, through the
    model family's pipeline class (and, for new tokens, into its text encoders)."""
    q = python_string
    pipeline = family.pipeline_class
    here = q("path/to/this/folder")
    load_base = [f"from diffusers import {pipeline}", *_base_pipeline(spec, pipeline)]
    method = spec.method
    few_steps = (
        f"image = pipe({q(prompt)}, num_inference_steps={spec.validation.inference_steps}, "
        f"guidance_scale={spec.validation.guidance_scale}).images[0]"
    )
    if method == "lora":
        lines = [*load_base, f"pipe.load_lora_weights({here})"]
    elif method == "lcmLora":
        lcm = spec.lcm
        assert lcm is not None
        lines = [
            f"from diffusers import LCMScheduler, {pipeline}",
            *_base_pipeline(spec, pipeline),
            "pipe.scheduler = LCMScheduler.from_config(",
            "    pipe.scheduler.config,"
            f" original_inference_steps={lcm.num_ddim_timesteps},"
            f" timestep_scaling={lcm.timestep_scaling_factor},",
            ")",
            f"pipe.load_lora_weights({here})",
        ]
        return [*lines, few_steps]
    elif method == "customDiffusion":
        assert spec.custom_diffusion is not None
        lines = [
            *load_base,
            *family.embedding_usage("path/to/this/folder", spec.custom_diffusion.modifier_tokens),
            "# `_pipeline=pipe`: without it diffusers 0.42 does not install the weights",
            "# (huggingface/diffusers#9320).",
            "pipe.unet.load_attn_procs(",
            f'    {here}, weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe',
            ")",
        ]
    elif method == "lcm":
        lines = [
            f"from diffusers import {pipeline}",
            f"pipe = {pipeline}.from_pretrained({here})  # LCMScheduler included",
        ]
        return [*lines, few_steps]
    else:
        lines = [
            f"from diffusers import {pipeline}",
            f"pipe = {pipeline}.from_pretrained({here})",
        ]
    return [*lines, f"image = pipe({q(prompt)}).images[0]"]


def _base_pipeline(spec: TrainingSpec, pipeline: str) -> list[str]:
    """Python that loads the base model, with the job's own VAE where it has one."""
    base = python_string(_repository(spec.base_model.uri))
    if spec.base_model.vae_uri is None:
        return [f"pipe = {pipeline}.from_pretrained({base})"]
    vae = python_string(_repository(spec.base_model.vae_uri))
    return [
        "from diffusers import AutoencoderKL",
        f"vae = AutoencoderKL.from_pretrained({vae})",
        f"pipe = {pipeline}.from_pretrained({base}, vae=vae)",
    ]


def _repository(uri: str) -> str:
    return uri.removeprefix("hf://").split("@")[0]


def upload_results(
    folder: Path,
    store: Store,
    check: Callable[[], None] = lambda: None,
    there: Callable[[Path, str], bool] | None = None,
) -> None:
    """Put a finished run's results in `store`, the model card last so a prefix with a
    README.md is complete. Checkpoints (uploaded as they are saved) and working files
    stay out, and so do files `there(path, key)` says the store holds already (the run's
    record, sent with its checkpoints). The files go up in the background while `check()`
    runs (a stop's `Patience`): what it raises leaves the upload."""
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.relative_to(folder).parts[0] not in NOT_RESULTS
        and not (there is not None and there(p, p.relative_to(folder).as_posix()))
    ]
    ordered = sorted(files, key=lambda p: (p == folder / MODEL_CARD, str(p)))
    uploader = Uploader(store)
    uploader.submit(Task(0, [(path, path.relative_to(folder).as_posix()) for path in ordered]))
    uploader.wait(check)  # raised out of: the thread stays behind, a daemon
    uploader.close()
