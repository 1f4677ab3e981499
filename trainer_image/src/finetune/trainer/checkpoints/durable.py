"""Checkpoints that outlive the machine: written locally, uploaded in the background,
durable once their manifest is in the store.

Every rank uploads the files it wrote (on a gang each node has its own disk); rank 0
uploads the manifest (every rank's files with sizes and SHA-256) last, and only once
every rank has uploaded its share: the ranks agree on that with one small all-reduce
per step while a checkpoint is pending. Only then is the checkpoint durable: rank 0
applies keep-last-N retention (in the store, then locally) and reports it. Resume
takes the newest checkpoint whose manifest parses and whose every file matches it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from finetune.trainer.checkpoints import manifest
from finetune.trainer.checkpoints.manifest import MANIFEST, Checkpoint
from finetune.trainer.process import distributed
from finetune.trainer.storage.files import is_partial, write_text_whole
from finetune.trainer.storage.store import Store
from finetune.trainer.storage.uploader import Task, Uploader

log = logging.getLogger(__name__)

PREFIX = "checkpoints/"


def key_for(tag: str, relative: str) -> str:
    return f"{PREFIX}{tag}/{relative}"


def tag_of(key: str) -> str:
    """`step-NNNNNNNN` for a key `checkpoints/step-NNNNNNNN/...`, else ""."""
    parts = key.split("/")
    return parts[1] if len(parts) > 2 and parts[1].startswith("step-") else ""


def local_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not is_partial(p.name)
    )


def owned(mine: list[str], everyone: list[list[str]], rank: int) -> list[str]:
    """The files this rank uploads: those it is the lowest rank to see (on a shared disk
    rank 0 sees them all; on separate disks each rank sees only its own)."""
    first: dict[str, int] = {}
    for index, names in enumerate(everyone):
        for name in names:
            first.setdefault(name, index)
    return [name for name in mine if first[name] == rank]


class DurableCheckpoints:
    def __init__(
        self,
        store: Store,
        root: Path,
        rank: distributed.Rank,
        device: torch.device,
        keep_last: int,
        report: Callable[[str, int], None] | None = None,
    ) -> None:
        self.store = store
        self.root = root
        self.rank = rank
        self.device = device
        self.keep_last = keep_last
        self.report = report
        self.uploader = Uploader(store)
        self.pending: list[int] = []  # saved locally, manifest not yet handed over

    # --- saving --------------------------------------------------------------------

    def saved(self, step: int, layout: dict[str, Any]) -> None:
        """On every rank, once every rank has written its share of the checkpoint."""
        tag = manifest.tag_for(step)
        folder = self.root / tag
        names = local_files(folder)
        mine = owned(names, distributed.all_gather(names), self.rank.rank)
        entries = manifest.describe(folder, mine)
        everything = [e for part in distributed.all_gather(entries) for e in part]
        if self.rank.main:
            manifest.write_manifest_entries(folder, step, layout, everything)
        self.uploader.submit(Task(step, [(folder / name, key_for(tag, name)) for name in mine]))
        self.pending.append(step)

    def poll(self) -> None:
        """On every rank at each step boundary: hand over the manifests of checkpoints
        every rank has uploaded its share of. A collective only while one is pending."""
        self.uploader.check()
        if not self.pending:
            return
        through = distributed.minimum(self.uploader.uploaded_through(), self.device)
        ready = [step for step in self.pending if step <= through]
        self.pending = [step for step in self.pending if step > through]
        if self.rank.main:
            for step in ready:
                tag = manifest.tag_for(step)
                self.uploader.submit(
                    Task(
                        step,
                        [(self.root / tag / MANIFEST, key_for(tag, MANIFEST))],
                        then=lambda step=step: self._durable(step),  # type: ignore[misc]
                        urgent=True,
                    )
                )

    def finish(self) -> None:
        """On every rank: wait until every checkpoint saved so far is durable. Every rank
        walks the same pending list, so each makes the same collectives."""
        while self.pending:
            self.uploader.wait_for(self.pending[0])
            self.poll()
        self.uploader.wait()

    def close(self) -> None:
        self.uploader.close()

    def _durable(self, step: int) -> None:
        """Rank 0's uploader thread, once `step`'s manifest is in the store."""
        tag = manifest.tag_for(step)
        log.info("checkpoint %s is durable in %s", tag, self.store.uri)
        self._retain()
        if self.report is not None:
            self.report(f"{self.store.uri}/{PREFIX}{tag}", step)

    def _retain(self) -> None:
        """Keep the newest `keep_last` durable checkpoints (and anything newer, which may
        still be uploading); delete everything older, in the store and locally."""
        objects = [(key, tag_of(key)) for key, _ in self.store.keys(PREFIX)]
        durable = sorted({tag for key, tag in objects if tag and key.endswith("/" + MANIFEST)})
        if len(durable) <= self.keep_last:
            return
        oldest_kept = durable[-self.keep_last]
        stale = [key for key, tag in objects if tag and tag < oldest_kept]
        # The manifests first: a checkpoint half deleted is never taken for a good one.
        stale.sort(key=lambda key: not key.endswith("/" + MANIFEST))
        self.store.delete(stale)
        for folder in self.root.iterdir() if self.root.is_dir() else []:
            if folder.is_dir() and folder.name.startswith("step-") and folder.name < oldest_kept:
                shutil.rmtree(folder, ignore_errors=True)

    # --- resuming ------------------------------------------------------------------

    def restore(self) -> Checkpoint | None:
        """Rank 0: the newest checkpoint in the store whose manifest parses and whose
        files all match it, fetched into the local folder (files already there with the
        right SHA-256 are not downloaded again)."""
        tags = sorted(
            {tag_of(key) for key, _ in self.store.keys(PREFIX) if key.endswith("/" + MANIFEST)}
            - {""},
            reverse=True,
        )
        for tag in tags:
            found = self.fetch(tag)
            if found is not None:
                return found
            log.warning(
                "checkpoint %s/%s%s is incomplete or corrupt; not used", self.store.uri, PREFIX, tag
            )
        return None

    def fetch(self, tag: str) -> Checkpoint | None:
        """`tag`'s files in the local folder, each checked against the store's manifest;
        None (with a warning naming the object) when one does not match."""
        text = self.store.read_text(key_for(tag, MANIFEST))
        try:
            document = json.loads(text or "")
            step = int(document["step"])
            files = [(str(e["path"]), int(e["bytes"]), str(e["sha256"])) for e in document["files"]]
            if any(Path(path).is_absolute() or ".." in Path(path).parts for path, _, _ in files):
                raise ValueError("a path outside the checkpoint")
        except (ValueError, KeyError, TypeError):
            log.warning("%s/%s: not a readable manifest", self.store.uri, key_for(tag, MANIFEST))
            return None
        folder = self.root / tag
        for relative, size, sha256 in files:
            path = folder / relative
            if manifest.matches(path, size, sha256):
                continue
            self.store.get_file(key_for(tag, relative), path)
            if not manifest.matches(path, size, sha256):
                log.warning(
                    "%s/%s does not match its manifest (size or SHA-256); skipped",
                    self.store.uri,
                    key_for(tag, relative),
                )
                path.unlink(missing_ok=True)
                return None
        write_text_whole(folder / MANIFEST, text or "")
        return Checkpoint(folder, step)
