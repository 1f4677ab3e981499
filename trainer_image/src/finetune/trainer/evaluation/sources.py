"""Where the evaluator models come from: the URIs of `validation.evaluator`, resolved like
`baseModel.uri` (a local folder, an `s3://` prefix mirrored into the cache, an `hf://`
snapshot) by the launcher before any worker starts, and checked to be what transformers
will load, so a wrong URI fails in seconds with the field named."""

from __future__ import annotations

from pathlib import Path

from finetune.api.common import is_hub
from finetune.api.training import TrainingSpec, evaluator_uris
from finetune.api.validation import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL
from finetune.trainer.errors import JobInputError
from finetune.trainer.models.sources import config_of
from finetune.trainer.storage import hub
from finetune.trainer.storage.inputs import local_folder
from finetune.trainer.storage.s3 import S3Settings

CLIP_FIELD = "validation.evaluator.clipModel"
DINO_FIELD = "validation.evaluator.dinoModel"
DEFAULTS = (DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL)
# What each evaluator's folder must hold: its transformers model type and files.
MODEL_TYPES = {CLIP_FIELD: "clip", DINO_FIELD: "vit"}
NEEDED_FILES = {
    CLIP_FIELD: ("config.json", "preprocessor_config.json", "tokenizer_config.json"),
    DINO_FIELD: ("config.json", "preprocessor_config.json"),
}


def resolve_evaluators(
    spec: TrainingSpec, cache_dir: Path, s3: S3Settings
) -> tuple[Path | None, Path | None]:
    """Local folders of the CLIP and DINO models the job's metrics need (None where none)."""
    folders = {
        field: evaluator_folder(
            uri, f"spec.{field}", MODEL_TYPES[field], NEEDED_FILES[field], cache_dir, s3
        )
        for field, uri in evaluator_uris(spec).items()
    }
    return folders.get(CLIP_FIELD), folders.get(DINO_FIELD)


def evaluator_folder(
    uri: str,
    field: str,
    model_type: str,
    needed: tuple[str, ...],
    cache_dir: Path,
    s3: S3Settings,
) -> Path:
    # The defaults are hub models a user may not know the job downloads: the hub's
    # retries and errors name the field.
    default = uri in DEFAULTS
    if is_hub(uri):
        folder = hub.snapshot(uri, cache_dir / "hub", field=field, default=default)
        if not has_weights(folder):
            # Older hub repositories hold PyTorch pickles only; fetch those, and only then.
            pickles = [p for p in hub.IGNORED if p != "*.bin"]
            folder = hub.snapshot(uri, cache_dir / "hub", pickles, field=field, default=default)
    else:
        folder = local_folder(uri, cache_dir, s3, "models")
    if not folder.is_dir():
        raise JobInputError(f"{field}: {uri}: no such model folder")
    if (folder / "config.json").is_file():  # the kind of model first: the most telling mistake
        found = config_of(folder, field, uri).get("model_type")
        if found != model_type:
            raise JobInputError(f"{field}: {uri}: a {found!r} model, not {model_type!r}")
    missing = [name for name in needed if not (folder / name).is_file()]
    if not has_weights(folder):
        missing.append("model.safetensors or pytorch_model.bin")
    if missing:
        raise JobInputError(
            f"{field}: {uri}: not a transformers model folder (missing {', '.join(missing)})"
        )
    return folder.resolve()


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file()
