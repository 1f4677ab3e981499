"""A checkpoint's manifest: every file with its size and SHA-256, written last.

Rank 0 writes `manifest.json` once every rank has saved its share, atomically; a
checkpoint whose files all match its manifest is complete, so one cut short by a
crash (no manifest) is simply never resumed from. One with a manifest whose files no
longer match is corrupt: skipped for an older one, and when every checkpoint is
corrupt, resume refuses rather than start over on top of the run.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.trainer.errors import JobInputError
from finetune.trainer.storage.files import file_digest, is_partial, write_text_whole

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)

# (path relative to the checkpoint folder, bytes, SHA-256)
FileEntry = tuple[str, int, str]


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int:
    """The step of a checkpoint's tag (`tag_for`'s inverse)."""
    return int(tag.removeprefix("step-"))


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
    loss: float | None = None,
) -> None:
    """`layout`: what a resuming run must share with this one (method, ZeRO stage, ranks);
    `validations`: the run's validation scores up to `step` (`evaluation.selection`);
    `loss`: the training loss of `step`, what a run resumed at its end reports."""
    manifest: dict[str, Any] = {
        "step": step,
        "layout": layout,
        "files": sorted(entries, key=lambda e: str(e["path"])),
    }
    if validations:
        manifest["validations"] = validations
    if loss is not None:
        manifest["loss"] = loss
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


class Unusable(Exception):  # noqa: N818 - named like what the checkpoint is
    """Why a checkpoint cannot be resumed from (a file of it, or its manifest)."""


def checked_step(folder: Path) -> int:
    """The checkpoint's step when every file matches its manifest; `Unusable` says why not."""
    try:
        step, files = parse((folder / MANIFEST).read_text())
    except FileNotFoundError as error:
        raise Unusable(f"no {MANIFEST} (a save cut short)") from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise Unusable(f"{MANIFEST} is not a readable manifest") from error
    for relative, size, sha256 in files:
        if not (folder / relative).is_file():
            raise Unusable(f"{relative} is missing")
        if not matches(folder / relative, size, sha256):
            raise Unusable(f"{relative} does not match its manifest (size or SHA-256)")
    return step


def verify(folder: Path) -> int | None:
    """The checkpoint's step when every file matches its manifest, else None (logged)."""
    try:
        return checked_step(folder)
    except Unusable as why:
        log.warning("checkpoint %s: %s; skipped", folder, why)
        return None


@dataclass(frozen=True)
class Scan:
    """What resume found among a run's checkpoints, newest first: the first that verifies,
    and the newer ones whose manifest was written (so they counted once) but that do not
    verify now, with why. One without a manifest is a save cut short, never a checkpoint."""

    found: Checkpoint | None
    corrupt: dict[str, str]  # tag -> why it is unusable

    def resumable(self, where: str) -> Checkpoint | None:
        """`found`, or None when there are no checkpoints; when every checkpoint of
        `where` is corrupt, JobInputError: starting over would overwrite the run."""
        if self.found is not None or not self.corrupt:
            return self.found
        reasons = "; ".join(f"{tag}: {why}" for tag, why in sorted(self.corrupt.items()))
        raise JobInputError(
            f"{where}: none of the run's checkpoints can be resumed from ({reasons}); restore "
            f"them, or remove {where} to start the run over from step 0"
        )


def scan(root: Path) -> Scan:
    """The newest checkpoint under `root` whose manifest verifies, and the corrupt newer ones."""
    corrupt: dict[str, str] = {}
    if not root.is_dir():
        return Scan(None, corrupt)
    candidates = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True
    )
    for folder in candidates:
        try:
            return Scan(Checkpoint(folder, checked_step(folder)), corrupt)
        except Unusable as why:
            log.warning("checkpoint %s is not used for resume: %s", folder, why)
            if (folder / MANIFEST).exists():
                corrupt[folder.name] = str(why)
    return Scan(None, corrupt)


def latest(root: Path) -> Checkpoint | None:
    """The newest checkpoint under `root` whose manifest verifies; JobInputError when
    there are checkpoints but none verifies."""
    return scan(root).resumable(str(root))


def validations_of(folder: Path) -> list[dict[str, Any]]:
    """The validation scores a checkpoint's manifest carries; none when it has no manifest."""
    try:
        found = json.loads((folder / MANIFEST).read_text()).get("validations", [])
    except (OSError, ValueError, AttributeError):
        return []
    return found if isinstance(found, list) else []


def loss_of(folder: Path) -> float | None:
    """The training loss of the checkpoint's step; None when its manifest has none (one
    written before losses were recorded) or cannot be read."""
    try:
        loss = json.loads((folder / MANIFEST).read_text()).get("loss")
    except (OSError, ValueError, AttributeError):
        return None
    return float(loss) if isinstance(loss, int | float) else None


def layout_of(checkpoint: Checkpoint) -> dict[str, Any]:
    layout: dict[str, Any] = json.loads((checkpoint.folder / MANIFEST).read_text()).get(
        "layout", {}
    )
    return layout
