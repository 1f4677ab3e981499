"""Where a base model comes from: any input URI, resolved to a checked diffusers folder."""

from __future__ import annotations

from pathlib import Path

from finetune.trainer.errors import JobInputError
from finetune.trainer.storage.inputs import local_folder
from finetune.trainer.storage.s3 import S3Settings

# What a Stable Diffusion folder must hold for the trainer to use it.
REQUIRED_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def resolve_model(uri: str, cache_dir: Path, s3: S3Settings) -> Path:
    """A local diffusers folder for `uri` (a local folder, s3:// or hf://), downloading it
    into `cache_dir` when remote."""
    folder = local_folder(uri, cache_dir, s3, "models")
    check_model_folder(folder, uri)
    return folder


def check_model_folder(folder: Path, uri: str) -> None:
    if not folder.is_dir():
        raise JobInputError(f"{uri}: no such model folder")
    missing = [part for part in REQUIRED_PARTS if not (folder / part).exists()]
    if missing:
        raise JobInputError(
            f"{uri}: not a diffusers Stable Diffusion folder (missing {', '.join(missing)})"
        )
