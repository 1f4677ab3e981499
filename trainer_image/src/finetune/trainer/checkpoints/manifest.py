"""A checkpoint's manifest: every file with its size and SHA-256, written last.

Rank 0 writes `manifest.json` once every rank has saved its share, atomically; a
checkpoint whose files all match its manifest is complete, so one cut short by a
crash (no manifest, or files that do not match) is simply never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.trainer.storage.files import file_digest, is_partial, write_text_whole

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)

# (path relative to the checkpoint folder, bytes, SHA-256)
FileEntry = tuple[str, int, str]


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    step: int

    @property
    def tag(self) -> str:
        return self.folder.name


def files_in(folder: Path) -> list[str]:
    """The checkpoint's files a manifest lists: all but the manifest and unfinished writes."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not is_partial(p.name)
    )


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


def write_manifest(
    folder: Path,
    step: int,
    layout: dict[str, Any],
    entries: list[dict[str, Any]],
    validations: list[dict[str, Any]] | None = None,
) -> None:
    """`layout`: what a resuming run must share with this one (method, ZeRO stage, ranks);
    `validations`: the run's validation scores up to `step` (`evaluation.selection`)."""
    manifest: dict[str, Any] = {
        "step": step,
        "layout": layout,
        "files": sorted(entries, key=lambda e: str(e["path"])),
    }
    if validations:
        manifest["validations"] = validations
    write_text(folder, json.dumps(manifest, indent=1))


def write_text(folder: Path, text: str) -> None:
    """The manifest's text in place, atomically and durably."""
    write_text_whole(folder / MANIFEST, text, durable=True)


def parse(text: str) -> tuple[int, list[FileEntry]]:
    """A manifest's step and files; ValueError (KeyError, TypeError) when it is not one,
    or names a path outside its checkpoint."""
    document = json.loads(text)
    files = [(str(e["path"]), int(e["bytes"]), str(e["sha256"])) for e in document["files"]]
    if any(Path(path).is_absolute() or ".." in Path(path).parts for path, _, _ in files):
        raise ValueError("a path outside the checkpoint")
    return int(document["step"]), files


def matches(path: Path, size: int, sha256: str) -> bool:
    """True when `path` exists with exactly this size and SHA-256."""
    try:
        return path.stat().st_size == size and file_digest(path) == sha256
    except OSError:
        return False


def verify(folder: Path) -> int | None:
    """The checkpoint's step when every file matches its manifest, else None."""
    try:
        step, files = parse((folder / MANIFEST).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for relative, size, sha256 in files:
        if not matches(folder / relative, size, sha256):
            log.warning("checkpoint %s: %s does not match its manifest; skipped", folder, relative)
            return None
    return step


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


def validations_of(folder: Path) -> list[dict[str, Any]]:
    """The validation scores a checkpoint's manifest carries; none when it has no manifest."""
    try:
        found = json.loads((folder / MANIFEST).read_text()).get("validations", [])
    except (OSError, ValueError, AttributeError):
        return []
    return found if isinstance(found, list) else []


def layout_of(checkpoint: Checkpoint) -> dict[str, Any]:
    layout: dict[str, Any] = json.loads((checkpoint.folder / MANIFEST).read_text()).get(
        "layout", {}
    )
    return layout
