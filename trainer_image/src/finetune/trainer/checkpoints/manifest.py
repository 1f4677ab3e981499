"""Checkpoints a job can always resume from, and never half-written ones.

Every rank saves its share (DeepSpeed's model and optimizer states, its own
RNG states); then rank 0 writes `manifest.json` last, atomically, listing every
file with its size and SHA-256. Resume takes the newest checkpoint whose
manifest verifies, so a save cut short by a crash is simply skipped.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.trainer.errors import DiskFull
from finetune.trainer.storage.files import file_digest, is_partial, write_text_whole

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)
NO_SPACE = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    step: int

    @property
    def tag(self) -> str:
        return self.folder.name


def describe(folder: Path, names: list[str]) -> list[dict[str, Any]]:
    """Manifest entries (path, bytes, sha256) for these files of `folder`, each made
    durable (fsync) first: a manifest never names bytes still in the page cache."""
    entries = []
    for name in names:
        path = folder / name
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        entries.append({"path": name, "bytes": path.stat().st_size, "sha256": file_digest(path)})
    return entries


def write_manifest_entries(
    folder: Path, step: int, layout: dict[str, Any], entries: list[dict[str, Any]]
) -> None:
    manifest = {
        "step": step,
        "layout": layout,
        "files": sorted(entries, key=lambda e: str(e["path"])),
    }
    write_text_whole(folder / MANIFEST, json.dumps(manifest, indent=1), durable=True)


def write_manifest(folder: Path, step: int, layout: dict[str, Any] | None = None) -> None:
    """`layout`: what a resuming run must share with this one (method, ZeRO stage, ranks)."""
    names = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not is_partial(p.name)
    )
    write_manifest_entries(folder, step, layout or {}, describe(folder, names))


def matches(path: Path, size: int, sha256: str) -> bool:
    """True when `path` exists with exactly this size and SHA-256."""
    try:
        return path.stat().st_size == size and file_digest(path) == sha256
    except OSError:
        return False


def verify(folder: Path) -> int | None:
    """The checkpoint's step when every file matches its manifest, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for entry in manifest["files"]:
            path = folder / entry["path"]
            if path.stat().st_size != entry["bytes"] or file_digest(path) != entry["sha256"]:
                log.warning(
                    "checkpoint %s: %s does not match its manifest; skipped", folder, entry["path"]
                )
                return None
        return int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest(root: Path) -> Checkpoint | None:
    """The newest checkpoint under `root` whose manifest verifies."""
    if not root.is_dir():
        return None
    candidates = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True
    )
    for folder in candidates:
        step = verify(folder)
        if step is not None:
            return Checkpoint(folder, step)
        log.warning("checkpoint %s is incomplete or corrupt; not used for resume", folder)
    return None


def layout_of(checkpoint: Checkpoint) -> dict[str, Any]:
    layout: dict[str, Any] = json.loads((checkpoint.folder / MANIFEST).read_text()).get(
        "layout", {}
    )
    return layout


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (and any older debris)."""
    complete = sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).exists())
    keep = set(complete[-keep_last:])
    newest_kept = min(keep) if keep else None
    for folder in root.iterdir():
        if (
            folder.is_dir()
            and folder not in keep
            and (newest_kept is None or folder.name < newest_kept.name)
        ):
            shutil.rmtree(folder, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank{rank:04d}.pt"


def _no_space(folder: Path) -> OSError | None:
    """Whether `folder`'s file system takes 1 MiB more: torch's writer reports a failed
    write without its errno, so a probe file finds the cause."""
    probe = folder / ".space-probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as handle:
            handle.write(b"\0" * (1 << 20))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return exc if exc.errno in NO_SPACE else None
    finally:
        probe.unlink(missing_ok=True)
    return None


@contextmanager
def space_checked(folder: Path, step: int) -> Iterator[None]:
    """Turn a full disk (or a file-size limit) met while saving into a `DiskFull` that
    says where and what to do; the folder then never gets a manifest."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        cause = exc if isinstance(exc, OSError) and exc.errno in NO_SPACE else None
        if cause is None and not isinstance(exc, OSError):
            cause = _no_space(folder)
        if cause is None:
            raise
        raise DiskFull(
            f"{folder}: no space left to save the checkpoint of step {step} ({cause.strerror}). "
            "The previous checkpoint is intact; give the job more local disk (or lower "
            "spec.checkpointing.keepLast) and run it again to resume"
        ) from exc
