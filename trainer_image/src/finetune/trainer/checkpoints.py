"""Checkpoints a job can always resume from, and never half-written ones.

Every rank saves its share (DeepSpeed's model and optimizer states, its own
RNG states); then rank 0 writes `manifest.json` last, atomically, listing every
file with its size and SHA-256. Resume takes the newest checkpoint whose
manifest verifies, so a save cut short by a crash is simply skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    step: int

    @property
    def tag(self) -> str:
        return self.folder.name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int, layout: dict[str, Any] | None = None) -> None:
    """`layout`: what a resuming run must share with this one (method, ZeRO stage, ranks)."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".partial")
    )
    for path in files:  # durable before the manifest says so
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    manifest = {
        "step": step,
        "layout": layout or {},
        "files": [
            {
                "path": p.relative_to(folder).as_posix(),
                "bytes": p.stat().st_size,
                "sha256": _sha256(p),
            }
            for p in files
        ],
    }
    partial = folder / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1))
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    partial.replace(folder / MANIFEST)


def verify(folder: Path) -> int | None:
    """The checkpoint's step when every file matches its manifest, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for entry in manifest["files"]:
            path = folder / entry["path"]
            if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
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
