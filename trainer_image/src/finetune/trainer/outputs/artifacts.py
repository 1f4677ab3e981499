"""The finished result files, as `status.artifacts` lists them: where the user finds
each (the output URI plus its path there), its SHA-256, size and kind."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from finetune.api.status import MAX_ARTIFACTS, ArtifactKind
from finetune.trainer.methods.custom_diffusion import WEIGHTS_FILE as CUSTOM_DIFFUSION_FILE
from finetune.trainer.methods.lora import KOHYA_FILE, LORA_FILE
from finetune.trainer.outputs.result import MODEL_CARD
from finetune.trainer.storage.files import file_digest

PIPELINE_INDEX = "model_index.json"
SAMPLES_FOLDER = "samples"
# Weights first, then the model card, then samples: what the cap cuts is samples.
_ORDER = [
    ArtifactKind.LORA,
    ArtifactKind.KOHYA_LORA,
    ArtifactKind.CUSTOM_DIFFUSION,
    ArtifactKind.EMBEDDING,
    ArtifactKind.PIPELINE,
    ArtifactKind.MODEL_CARD,
    ArtifactKind.SAMPLES,
]


def sample_folder(work_dir: Path, step: int) -> Path:
    """Where a run's folder holds the validation samples of `step`."""
    return work_dir / SAMPLES_FOLDER / _sample_tag(step)


def _sample_tag(step: int) -> str:
    return f"step-{step:08d}"


def pipeline_parts(work_dir: Path) -> set[str]:
    """The component folders a saved pipeline's `model_index.json` names (`unet`, ...)."""
    try:
        return parts_named(json.loads((work_dir / PIPELINE_INDEX).read_text()))
    except (OSError, ValueError):
        return set()


def parts_named(index: Any) -> set[str]:
    """The component folders a pipeline's `model_index.json` (parsed) names."""
    if not isinstance(index, dict):
        return set()
    # Components are `"unet": ["diffusers", "UNet2DConditionModel"]`; absent ones are [null, null].
    return {
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0]
    }


def kind_of(relative: PurePosixPath, parts: set[str]) -> ArtifactKind | None:
    """What a file of the results is, by its path; None for what is not a result
    (the training log, generated class images)."""
    top = relative.parts[0]
    if len(relative.parts) == 1:
        if top == LORA_FILE:
            return ArtifactKind.LORA
        if top == KOHYA_FILE:
            return ArtifactKind.KOHYA_LORA
        if top == CUSTOM_DIFFUSION_FILE:
            return ArtifactKind.CUSTOM_DIFFUSION
        if top == MODEL_CARD:
            return ArtifactKind.MODEL_CARD
        if top == PIPELINE_INDEX:
            return ArtifactKind.PIPELINE
        if top.endswith(".safetensors"):  # Custom Diffusion's `<token>.safetensors`
            return ArtifactKind.EMBEDDING
        return None
    if top == SAMPLES_FOLDER:
        return ArtifactKind.SAMPLES
    if top in parts:
        return ArtifactKind.PIPELINE
    return None


def list_artifacts(
    work_dir: Path,
    output_uri: str,
    limit: int | None = MAX_ARTIFACTS,
    first_steps: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """`status.artifacts` for the results in `work_dir`, published at `output_uri`
    (an `s3://` prefix or a local folder): at most `limit` (every one with None), weights
    first, then the model card, then samples: those of `first_steps` (the chosen weights'
    and the last step's), then the newest step's first."""
    parts = pipeline_parts(work_dir)
    found: list[tuple[ArtifactKind, PurePosixPath, Path]] = []
    for path in work_dir.rglob("*"):
        relative = PurePosixPath(path.relative_to(work_dir).as_posix())
        kind = kind_of(relative, parts)
        if kind is not None and path.is_file():
            found.append((kind, relative, path))
    found.sort(key=lambda item: (_ORDER.index(item[0]), str(item[1])))
    results = [item for item in found if item[0] != ArtifactKind.SAMPLES]
    samples = [item for item in found if item[0] == ArtifactKind.SAMPLES]
    # `samples/step-NNNNNNNN/...`: newest folder first (a stable sort keeps file order),
    # `first_steps`' before all.
    samples.sort(key=lambda item: item[1].parts[1], reverse=True)
    first = [_sample_tag(step) for step in dict.fromkeys(first_steps)]
    samples.sort(
        key=lambda item: first.index(item[1].parts[1]) if item[1].parts[1] in first else len(first)
    )
    base = output_uri.rstrip("/")
    return [
        {
            "uri": f"{base}/{relative}",
            "sha256": file_digest(path),
            "bytes": path.stat().st_size,
            "kind": kind.value,
        }
        for kind, relative, path in (results + samples)[:limit]
    ]
