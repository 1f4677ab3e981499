"""Where a base model (and a VAE in place of its own) comes from: any input URI,
resolved to a checked diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.api import pod
from finetune.trainer.errors import JobInputError
from finetune.trainer.storage.inputs import local_folder
from finetune.trainer.storage.s3 import S3Settings

# What a Stable Diffusion folder must hold for the trainer to use it.
REQUIRED_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def resolve_model(
    uri: str, cache_dir: Path, s3: S3Settings, token_env: str = pod.HF_TOKEN_ENV
) -> Path:
    """A local diffusers folder for `uri` (a local folder, s3:// or hf://), downloading it
    into `cache_dir` when remote (from the hub with the token in `token_env`)."""
    folder = local_folder(uri, cache_dir, s3, "models", token_env)
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


VAE_FIELD = "spec.baseModel.vaeUri"


def resolve_vae(uri: str, cache_dir: Path, s3: S3Settings) -> Path:
    """A local folder holding the diffusers `AutoencoderKL` at `uri`, checked."""
    folder = local_folder(uri, cache_dir, s3, "models")
    if not (folder / "config.json").is_file():
        raise JobInputError(f"{VAE_FIELD}: {uri}: not a diffusers model folder (no config.json)")
    found = config_of(folder, VAE_FIELD, uri).get("_class_name")
    if found != "AutoencoderKL":
        raise JobInputError(f"{VAE_FIELD}: {uri}: holds a {found}, not an AutoencoderKL")
    if not any(folder.glob("diffusion_pytorch_model*.safetensors")) and not any(
        folder.glob("diffusion_pytorch_model*.bin")
    ):
        raise JobInputError(f"{VAE_FIELD}: {uri}: the AutoencoderKL's weights are missing")
    return folder.resolve()


def config_of(folder: Path, field: str, uri: str) -> dict[str, Any]:
    """A model folder's `config.json`; refusals name the field and the URI."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise JobInputError(f"{field}: {uri}: config.json is unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise JobInputError(f"{field}: {uri}: config.json is not a JSON object")
    return config
