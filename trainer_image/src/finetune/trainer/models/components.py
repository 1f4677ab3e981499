"""Find a base model (local folder, s3://, hf://) and load its components."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.api.common import is_hub, is_s3
from finetune.trainer.errors import AccessDenied, JobInputError, Unreachable
from finetune.trainer.storage.s3 import S3Settings, cache_key, download_prefix
from finetune.trainer.storage.store import RETRY_FOR_ENV, retry_budget, with_retries

# What a Stable Diffusion folder must hold for the trainer to use it.
REQUIRED_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Hub files the trainer never reads: other frameworks' weights and pickles.
_HUB_IGNORE = ["*.ckpt", "*.bin", "*.msgpack", "*.onnx", "*.h5", "*.pb", "*.xml", "*.png", "*.jpg"]


def resolve_model(uri: str, cache_dir: Path, s3: S3Settings) -> Path:
    """A local diffusers folder for `uri`, downloading it into `cache_dir` when remote."""
    if is_hub(uri):
        folder = _from_hub(uri, cache_dir / "hub")
    elif is_s3(uri):
        folder = download_prefix(uri, cache_dir / "s3-models" / cache_key(uri), s3)
    else:
        folder = Path(uri).expanduser()
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


def _from_hub(uri: str, cache_dir: Path) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = uri.removeprefix("hf://").partition("@")

    def transient(exc: BaseException) -> bool:
        """The hub out of reach (not offline on purpose), or answering 429/5xx."""
        if isinstance(exc, LocalEntryNotFoundError):
            return not constants.HF_HUB_OFFLINE
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            status = int(exc.response.status_code)
            return status == 429 or status >= 500
        return False

    def download() -> str:
        return str(
            snapshot_download(
                repo,
                revision=revision or None,
                cache_dir=cache_dir,
                token=os.environ.get("HF_TOKEN") or None,
                ignore_patterns=_HUB_IGNORE,
            )
        )

    try:
        path = with_retries(uri, download, is_transient=transient)
    except GatedRepoError as exc:
        raise AccessDenied(
            f"{uri}: the repository is gated; set a token with access (baseModel.hubTokenSecretRef)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise JobInputError(f"{uri}: no such repository on the hub, or no access to it") from exc
    except RevisionNotFoundError as exc:
        raise JobInputError(f"{uri}: no revision {revision!r} in the repository") from exc
    except LocalEntryNotFoundError as exc:
        if not constants.HF_HUB_OFFLINE:
            raise Unreachable(
                f"{uri}: the hub cannot be reached (retried for "
                f"{retry_budget():.0f} s, ${RETRY_FOR_ENV}); a later try may succeed"
            ) from exc
        raise JobInputError(f"{uri}: not in the local cache and the hub is offline") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):  # the token (HF_TOKEN) is missing, wrong or lacks access
            raise AccessDenied(f"{uri}: the hub refused the download ({status})") from exc
        if status == 404:
            raise JobInputError(f"{uri}: the hub refused the download ({status})") from exc
        raise Unreachable(f"{uri}: the hub answered {status} after retries") from exc
    return Path(path)


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline the trainer works with."""

    folder: Path
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any


def load_components(folder: Path) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        return Components(
            folder=folder,
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise JobInputError(f"{folder}: cannot load the model: {exc}") from exc


def assemble_pipeline(components: Components, scheduler: Any, **trained: Any) -> Any:
    """A pipeline over the loaded components, with trained modules in place of theirs."""
    from diffusers import StableDiffusionPipeline

    parts = {
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "tokenizer": components.tokenizer,
        "unet": components.unet,
        **trained,
    }
    return StableDiffusionPipeline(
        **parts,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def inference_pipeline(components: Components, scheduler: Any = None, **trained: Any) -> Any:
    """A pipeline for validation images and class images; DPM-Solver unless `scheduler`
    is given."""
    from diffusers import DPMSolverMultistepScheduler

    pipeline = assemble_pipeline(
        components,
        scheduler or DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config),
        **trained,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_pipeline(
    components: Components, scheduler: Any, folder: Path, **trained: Any
) -> list[Path]:
    """A complete float32 pipeline folder that `StableDiffusionPipeline.from_pretrained`
    loads; returns the files written."""
    import torch

    pipeline = assemble_pipeline(components, scheduler, **trained)
    pipeline.to(torch.float32)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return sorted(p for p in folder.rglob("*") if p.is_file())
