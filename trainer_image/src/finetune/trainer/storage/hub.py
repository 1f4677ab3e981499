"""Snapshots of Hugging Face hub repositories (`hf://org/name[@revision]`), with the
retry policy for an unreachable hub and its refusals named."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.api.pod import HF_TOKEN_ENV, TEACHER_HF_TOKEN_ENV
from finetune.trainer.errors import AccessDenied, JobInputError, Unreachable
from finetune.trainer.storage.retries import RETRY_FOR_ENV, retry_budget, with_retries

# Hub files the trainer never reads: other frameworks' weights and pickles.
IGNORED = ["*.ckpt", "*.bin", "*.msgpack", "*.onnx", "*.h5", "*.pb", "*.xml", "*.png", "*.jpg"]

# The field whose secret a pod gets in each token's variable, for refusals.
TOKEN_FIELDS = {
    HF_TOKEN_ENV: "spec.baseModel.hubTokenSecretRef",
    TEACHER_HF_TOKEN_ENV: "spec.lcm.teacherModel.hubTokenSecretRef",
}


def token(env: str = HF_TOKEN_ENV) -> str | None:
    """The hub token in `env`, else HF_TOKEN's (a teacher without a token of its own
    downloads with the base model's)."""
    return os.environ.get(env) or os.environ.get(HF_TOKEN_ENV) or None


def snapshot(
    uri: str,
    cache_dir: Path,
    ignore: list[str] | None = None,
    token_env: str = HF_TOKEN_ENV,
    field: str | None = None,
    default: bool = False,
) -> Path:
    """A local folder with the files of the repository (and revision) `uri` names, in
    huggingface_hub's cache layout under `cache_dir`, but for those `ignore` matches
    (default `IGNORED`), downloaded with the token in `token_env`. `field`: the spec field
    naming `uri` (`default`: by its default, so the user may not know the job downloads
    it), named in every retry and error, which then say where else it can point."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = uri.removeprefix("hf://").partition("@")
    what = f"{field}{' (the default)' if default else ''}: {uri}" if field else uri
    elsewhere = f"; or point {field} at a local folder or an s3:// copy" if field else ""

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
                token=token(token_env),
                ignore_patterns=IGNORED if ignore is None else ignore,
            )
        )

    try:
        path = with_retries(what, download, transient)
    except GatedRepoError as exc:
        raise AccessDenied(
            f"{what}: the repository is gated; set a token with access "
            f"({TOKEN_FIELDS.get(token_env, token_env)})"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise JobInputError(f"{what}: no such repository on the hub, or no access to it") from exc
    except RevisionNotFoundError as exc:
        raise JobInputError(f"{what}: no revision {revision!r} in the repository") from exc
    except LocalEntryNotFoundError as exc:
        if not constants.HF_HUB_OFFLINE:
            raise Unreachable(
                f"{what}: the hub cannot be reached (retried for "
                f"{retry_budget():.0f} s, ${RETRY_FOR_ENV}); a later try may succeed{elsewhere}"
            ) from exc
        raise JobInputError(
            f"{what}: not in the local cache and the hub is offline{elsewhere}"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):  # the token (HF_TOKEN) is missing, wrong or lacks access
            raise AccessDenied(f"{what}: the hub refused the download ({status})") from exc
        if status == 404:
            raise JobInputError(f"{what}: the hub refused the download ({status})") from exc
        raise Unreachable(f"{what}: the hub answered {status} after retries{elsewhere}") from exc
    return Path(path)
