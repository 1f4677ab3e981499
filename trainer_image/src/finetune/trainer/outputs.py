"""The finished result: weights, a model card, and an atomic hand-over.

Outputs are written into a staging folder and moved into place only once all
are complete, the model card last, so a crash never leaves something that
looks like a finished model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ..api.training import TrainingSpec

STAGING = ".staging"
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


def model_card(
    spec: TrainingSpec,
    name: str,
    steps: int,
    final_loss: float | None,
    grid: Path | None,
    work_dir: Path,
) -> str:
    method = spec.method
    hyper = spec.training.model_dump(by_alias=True, exclude_none=True, mode="json")
    if spec.lora is not None:
        hyper["lora"] = spec.lora.model_dump(by_alias=True, exclude_none=True, mode="json")
    prompts = [c.instance_prompt for c in spec.data.concepts]
    lines = [
        "---",
        yaml.safe_dump(
            {
                "base_model": spec.base_model.uri,
                "library_name": "diffusers",
                "tags": ["stable-diffusion", method, "finetune-operator"],
            },
            sort_keys=False,
        ).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"Fine-tuned from `{spec.base_model.uri}` with **{method}** for {steps} steps"
        + (f" (final loss {final_loss:.4f})." if final_loss is not None else "."),
        "",
        "## How to use",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
    ]
    if method in ("lora", "lcmLora"):
        lines += [
            f'pipe = StableDiffusionPipeline.from_pretrained("{spec.base_model.uri.removeprefix("hf://")}")',
            'pipe.load_lora_weights("path/to/this/folder")',
        ]
    else:
        lines += ['pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")']
    lines += [f'image = pipe("{(prompts or ["a photo"])[0]}").images[0]', "```", ""]
    if prompts:
        lines += ["## Training prompts", "", *[f"- `{p}`" for p in prompts], ""]
    if spec.validation.prompts:
        lines += ["## Validation prompts", "", *[f"- `{p}`" for p in spec.validation.prompts], ""]
    if grid is not None:
        lines += ["## Samples", "", f"![samples]({grid.relative_to(work_dir).as_posix()})", ""]
    lines += [
        "## Hyperparameters",
        "",
        "```yaml",
        yaml.safe_dump(hyper, sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
