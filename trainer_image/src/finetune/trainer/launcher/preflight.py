"""Checks the launcher makes before any worker starts: the process count, the output and
the folders class images are generated into.

Each failure names what to fix: `--nproc`, `spec.output.uri` (a file, a folder that
cannot be written or holds files no run wrote, an S3 prefix that refuses a small
write-and-delete probe), or a concept's `classImages.uri`.
"""

from __future__ import annotations

import errno
import os
import socket
import uuid
from pathlib import Path

from finetune.api.common import is_s3
from finetune.trainer.checkpoints.record import TRAIN_LOG
from finetune.trainer.data.class_homes import FOLDER as CLASS_IMAGES
from finetune.trainer.errors import DiskFull, JobInputError
from finetune.trainer.launcher.lease import LOCAL_LEASE, RUN_FOLDER
from finetune.trainer.storage.s3 import S3Settings, S3Store

FIELD = "spec.output.uri"


def checked_nproc(nproc: int | None, gpus: int) -> int:
    """The number of training processes on this machine: `--nproc` if it fits, one per
    GPU (or one on a CPU) by default."""
    if nproc is None:
        return max(1, gpus)
    limit, what = (gpus, "GPUs") if gpus else (os.cpu_count() or 1, "CPU cores")
    if nproc < 1 or nproc > limit:
        raise JobInputError(
            f"--nproc {nproc}: must be between 1 and {limit} (this machine has {limit} {what})"
        )
    return nproc


def make_folder(folder: Path, field: str) -> None:
    """`folder` is a folder, made if missing; refusals name `field`."""
    if folder.exists() and not folder.is_dir():
        raise JobInputError(f"{field}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise JobInputError(f"{field}: {folder} cannot be written ({reason})") from exc


def check_local_output(folder: Path) -> None:
    """`folder` is (or can be made) a folder this process can write to."""
    make_folder(folder, FIELD)
    try:
        probe = folder / f".probe-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"{FIELD}: {folder}: no space left to write the results") from exc
        reason = exc.strerror or type(exc).__name__
        raise JobInputError(f"{FIELD}: {folder} cannot be written ({reason})") from exc


def check_s3_output(uri: str, settings: S3Settings) -> None:
    check_s3_writable(uri, settings, FIELD, f"{RUN_FOLDER}/probe-{uuid.uuid4().hex}")
    check_prefix_holds_only_runs(uri, S3Store(uri, settings).top_level())


def check_s3_writable(uri: str, settings: S3Settings, field: str, key: str) -> None:
    """The credentials are there and accepted, and the prefix takes a write and a delete
    (of `key`, under it). S3's refusals raise `JobInputError`/`AccessDenied` naming
    `field`; an endpoint that stays unreachable past the retries raises what boto3
    raised (exit 1)."""
    try:
        store = S3Store(uri, settings)  # credentials that cannot be complete fail here
        store.write_text(key, "probe")
        store.delete([key])
    except JobInputError as exc:  # named by the prefix, not by the probe's key
        message = str(exc).replace(f"{uri.rstrip('/')}/{key}", uri.rstrip("/"))
        raise type(exc)(f"{field}: {message}") from exc


# What runs keep in their output: a name taken by something else would fail a run midway.
RUN_FOLDERS = (RUN_FOLDER, "checkpoints", "samples", CLASS_IMAGES, "logs")
RUN_FILES = (LOCAL_LEASE, TRAIN_LOG)
# The names a run writes before its first checkpoint (and its train log) go up.
RUN_NAMES = frozenset(RUN_FOLDERS) | {TRAIN_LOG}


def check_run_layout(folder: Path) -> None:
    """What a run writes into `folder` can be written: its folders are folders, its
    files are files (a `checkpoints` file would fail the first checkpoint)."""
    for name in RUN_FOLDERS:
        if (folder / name).exists() and not (folder / name).is_dir():
            raise JobInputError(f"{FIELD}: {folder / name} is a file; runs keep a folder there")
    for name in RUN_FILES:
        if (folder / name).is_dir():
            raise JobInputError(f"{FIELD}: {folder / name} is a folder; runs keep a file there")


def check_holds_only_runs(folder: Path) -> None:
    """A folder no run has written into (no `.run/`) holds nothing but hidden files: a
    run would replace a README.md or weights of the user's own, and mix its log and
    checkpoints with whatever else is there."""
    if (folder / RUN_FOLDER).exists():
        return
    found = sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
    if found:
        raise JobInputError(
            f"{FIELD}: {folder} holds files no finetune run wrote ({shown(found)}); "
            "choose a new or empty folder"
        )


def check_prefix_holds_only_runs(uri: str, names: list[str]) -> None:
    """An S3 prefix holding anything but what runs write is refused, as a folder is. A
    finished run's prefix holds no `.run/` (its lease is gone): its train log marks it,
    and one killed before its first checkpoint holds run folders (class images) only."""
    visible = [name for name in names if not name.startswith(".")]
    if RUN_FOLDER in names or TRAIN_LOG in names or set(visible) <= RUN_NAMES:
        return
    found = [name for name in visible if name not in RUN_NAMES]
    raise JobInputError(
        f"{FIELD}: {uri} holds objects no finetune run wrote ({shown(found)}); "
        "choose a new or empty prefix"
    )


def shown(names: list[str]) -> str:
    """The first few of `names`, and how many more."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_output(output: str, work_dir: Path, settings: S3Settings) -> None:
    if is_s3(output):
        check_local_output(work_dir)  # the local staging folder in the cache
        check_s3_output(output, settings)
    else:
        check_local_output(work_dir)
        check_holds_only_runs(work_dir)
    check_run_layout(work_dir)
