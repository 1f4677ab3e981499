"""A job's inputs as local folders: the one place a spec's input URIs are resolved.

A local path is used where it is; an `s3://` prefix is mirrored into the cache once and
checked; an `hf://` model is a hub snapshot in the cache. The launcher resolves every
input here before any worker starts, so a bad URI fails in seconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from finetune.api.common import is_hub, is_s3
from finetune.api.pod import HF_TOKEN_ENV
from finetune.trainer.errors import JobInputError
from finetune.trainer.process import flock, stopping
from finetune.trainer.storage import hub
from finetune.trainer.storage.files import (
    PARTIAL,
    cache_key,
    file_digest,
    file_for_key,
    written_whole,
)
from finetune.trainer.storage.s3 import S3Settings, S3Store

log = logging.getLogger(__name__)

# What an input is, which names its folder in the cache (`s3-models`, `s3-data`).
InputKind = Literal["models", "data"]


def local_folder(
    uri: str,
    cache_dir: Path,
    settings: S3Settings,
    kind: InputKind,
    token_env: str = HF_TOKEN_ENV,
) -> Path:
    """A local folder holding the files of `uri`, downloaded into `cache_dir` when remote.
    Only models come from the hub (the API refuses `hf://` for data), with the token in
    `token_env`."""
    if is_hub(uri) and kind == "models":
        return hub.snapshot(uri, cache_dir / "hub", token_env=token_env)
    if is_s3(uri):
        return download_prefix(uri, cache_dir / f"s3-{kind}" / cache_key(uri), settings)
    return Path(uri).expanduser()


def intact(path: Path, size: int, etag: str) -> bool:
    """`path` holds the object: same size and, where the ETag is the MD5 of the bytes
    (a single-part upload), the same MD5. A multipart ETag is checked by size."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    return "-" in etag or len(etag) != 32 or file_digest(path, "md5") == etag


@contextmanager
def cache_folder_held(folder: Path, uri: str) -> Iterator[None]:
    """`folder` of the cache for this process alone while it is filled: runs started
    together (a sweep) that mirror the same `uri` take turns, the later one finding the
    files there, instead of writing the same `.partial` files at once."""

    def announce() -> None:
        log.warning("%s: waiting for another run filling the cache with it", uri)

    with flock.held(folder.with_name(folder.name + ".lock"), announce):
        yield


def download_prefix(uri: str, destination: Path, settings: S3Settings) -> Path:
    """Mirror every object under `uri` into `destination`, each checked against its size
    and ETag. A marker beside the folder records what was verified, so a restarted job
    reuses its cache without downloading (or hashing) anything again; an interrupted
    download leaves `.partial` files only and is simply resumed."""
    with cache_folder_held(destination, uri):
        return _download_prefix(uri, destination, settings)


def _download_prefix(uri: str, destination: Path, settings: S3Settings) -> Path:
    store = S3Store(uri, settings)
    marker = destination.with_name(destination.name + ".verified.json")
    try:
        verified: dict[str, list[Any]] = json.loads(marker.read_text())
    except (OSError, ValueError):
        verified = {}
    now: dict[str, list[Any]] = {}
    for key, size, etag in store.objects():
        target = file_for_key(destination, key)
        if target is None:
            raise JobInputError(
                f"{store.uri_of(key)}: an object key with an empty, '.' or '..' part "
                "(a doubled slash?) is no file name: rename the object"
            )
        now[key] = [size, etag]
        known = verified.get(key) == [size, etag] and target.is_file()
        if (known and target.stat().st_size == size) or intact(target, size, etag):
            continue
        stopping.raise_if_requested()  # between files: a stop leaves whole files only
        with kept_apart(target, store.uri_of(key)), written_whole(target) as partial:
            store.download(key, partial)
            if not intact(partial, size, etag) and not store.encrypted(key):
                partial.unlink(missing_ok=True)
                raise JobInputError(
                    f"{store.uri_of(key)}: the download does not match the object's "
                    "size and ETag; it changed while downloading, or the transfer was corrupted"
                )
    if not now:
        raise JobInputError(f"{uri}: no objects under this S3 prefix")
    drop_deleted(destination, now)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(now))
    return destination


@contextmanager
def kept_apart(target: Path, uri: str) -> Iterator[None]:
    """An object whose name is also a folder's (`photos/a` beside `photos/a/b.png`) has
    no place in a folder: refused, naming it."""
    try:
        yield
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise JobInputError(
            f"{uri}: its name is both a file and a folder under the prefix, which a "
            f"folder cannot mirror ({exc.strerror}): rename one of them"
        ) from exc


def drop_deleted(destination: Path, keys: Iterable[str]) -> None:
    """Remove the files of `destination` whose objects are gone from the prefix: a photo
    deleted from S3 is not trained on from a stale cache (nor a bad one refused again)."""
    listed = {destination / key for key in keys}  # keys `file_for_key` took
    for path in sorted(destination.rglob("*"), reverse=True):  # files before their folders
        if PARTIAL in path.name:
            continue  # being written (by another run sharing the cache, maybe)
        if path.is_file() or path.is_symlink():
            if path not in listed:
                path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


@contextmanager
def said_as(folder: Path, uri: str | None) -> Iterator[None]:
    """Refusals about the files of `folder`, the local copy of `uri`, name them by `uri`:
    a user knows `s3://bucket/photos/a.png`, not where the cache keeps it."""
    try:
        yield
    except JobInputError as exc:
        if uri is None or not is_s3(uri) or str(folder) not in str(exc):
            raise
        said = str(exc).replace(str(folder), uri.rstrip("/"))
        raise type(exc)(said).with_traceback(exc.__traceback__) from None
